"""ONNX graphs whose quantized linears are ONNX Runtime ``com.microsoft.MatMulNBits`` nodes holding our codes.

The graph maps ``input_ids`` and ``attention_mask`` (int64 ``[batch, sequence]``, both dynamic) to ``logits``
(float32 ``[batch, sequence, vocab]``) in one pass, without a KV cache (each generated token re-runs the whole
prefix; position ids are ``0 .. sequence - 1``, so pad on the right). It is traced by ``torch.onnx.export``
(dynamo) from the transformers model, with every quantized linear replaced by a module holding only its packed
tensors and calling a custom op that is translated straight into ``MatMulNBits`` — so no float copy of a quantized
weight ever exists, in memory or in the file, and ONNX Runtime's ``MatMulNBitsQuantizer`` never re-rounds anything.

Per quantized linear ``M`` ``[N = out, K = in]`` with blocks of ``block_size`` inputs (``n_blocks = K / block``):

* ``M.qweight`` uint8 ``[N, n_blocks, block_size * bits / 8]``: each row's codes as a least-significant-bit-first
  stream (low nibble first for 4 bits), i.e. the canonical ``pack_bits`` stream cut into blocks;
* ``M.scales`` float32 ``[N, n_blocks]`` (our float16 scales, exactly);
* ``M.zero_points``: integer zero points packed the same way, uint8 ``[N, ceil(n_blocks * bits / 8)]``; fractional
  (HQQ) zero points as float32 ``[N, n_blocks]`` (ONNX Runtime's unpacked form); absent for symmetric schemes,
  whose zero point ``2**(bits-1)`` is MatMulNBits' default.

The node computes ``A @ ((code - zero) * scale)^T`` in float32 (``accuracy_level`` unset), the same weights as the
canonical checkpoint. Blocks must be powers of two >= 16, so per-channel / per-tensor scales fit only where
``in_features`` is one; act-order (g_idx, deprecated in the operator) is refused. The graph is float32 whatever the
source dtype (what ONNX Runtime's CPU kernels run); non-quantized tensors (embeddings, norms, lm_head) are stored
in float32 too. Mixed precision is natural: every node carries its own ``bits`` and ``block_size``.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch

from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.formats.base import (
    FormatError, refuse_experts, has_act_order, iter_shards, register_format, schemes, source_config, write_json,
)
from turboquant.io.skeleton import build_skeleton, materialize
from turboquant.tensor import PER_TENSOR, QuantizedTensor, QuantScheme, pack_bits, unpack_bits

#: Bit widths ONNX Runtime's MatMulNBits CPU kernel runs (onnxruntime 1.31; the schema allows 2..8), and those it
#: runs with float (fractional, HQQ) zero points — its "unpacked compute" path.
ORT_CPU_BITS = (2, 4, 8)
ORT_FLOAT_ZERO_BITS = (2, 4)
MIN_BLOCK_SIZE = 16
MS_DOMAIN = "com.microsoft"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"


def block_size(scheme: QuantScheme, in_features: int) -> int:
    """The MatMulNBits block of a module: its group, or the whole row for per-channel / per-tensor scales."""
    return scheme.group_size if scheme.group_size > 0 else in_features


def check(ckpt: QuantizedCheckpoint, options: dict[str, Any]) -> None:
    refuse_experts(ckpt, "onnx", "torch.export cannot trace the data-dependent expert routing")
    if not schemes(ckpt):
        raise FormatError(f"{ckpt.path} holds no quantized weights (method '{ckpt.method}')",
                          "quantize with a weight method (rtn, gptq, awq, hqq) before exporting to onnx")
    if has_act_order(ckpt):
        raise FormatError("the checkpoint uses act-order groups (g_idx); MatMulNBits' g_idx input is deprecated "
                          "and not written here",
                          "export it to gptq, or re-quantize GPTQ with --option static_groups=true")
    found = schemes(ckpt)
    odd = sorted({s.bits for s in found} - set(ORT_CPU_BITS))
    if len(found) > 1 and odd:
        raise FormatError(f"this mixed-precision checkpoint has {', '.join(map(str, odd))}-bit layers; ONNX Runtime's "
                          f"MatMulNBits CPU kernel runs {', '.join(map(str, ORT_CPU_BITS))}-bit",
                          "re-quantize with --candidate-bits 2,4,8, or export to mlx / compressed-tensors")
    for module, info in ckpt.modules.items():
        check_module(module, ckpt.scheme(module), info["shape"][1], bool(info.get("fractional_zero")))
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise FormatError(f"the onnx export needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'}"
                          " not installed", "pip install onnx onnxscript (and onnxruntime to run the graph)")


def check_module(module: str, scheme: QuantScheme, in_features: int, fractional_zero: bool) -> None:
    """Refuse one linear whose bits, zero points or block the MatMulNBits CPU kernel cannot run."""
    bits = scheme.bits
    if bits not in ORT_CPU_BITS:
        raise FormatError(f"{module} has {bits}-bit codes; ONNX Runtime's MatMulNBits CPU kernel runs "
                          f"{', '.join(map(str, ORT_CPU_BITS))}-bit",
                          "re-quantize with --bits 4 (or 2, 8), or export to gguf / gptq / mlx")
    if fractional_zero and bits not in ORT_FLOAT_ZERO_BITS:
        raise FormatError(f"{module} has fractional (HQQ) zero points with {bits}-bit codes; ONNX Runtime runs "
                          f"float zero points with {' or '.join(map(str, ORT_FLOAT_ZERO_BITS))}-bit codes only",
                          "re-quantize with --bits 4, or with --option integer_zero=true")
    block = block_size(scheme, in_features)
    if block < MIN_BLOCK_SIZE or block & (block - 1):
        what = (f"groups of {block}" if scheme.group_size > 0
                else f"one scale per {scheme.granularity} ({in_features} inputs)")
        raise FormatError(f"{module} ({scheme.describe()}) has {what}; MatMulNBits blocks are powers of two "
                          f">= {MIN_BLOCK_SIZE}", "re-quantize with --group-size 128 (or 64, 32, 16)")


# ---------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------


def pack_module(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """``qweight``, ``scales`` and (asymmetric only) ``zero_points`` of one linear, as MatMulNBits reads them."""
    out_f, in_f = qt.shape
    bits, block = qt.scheme.bits, block_size(qt.scheme, in_f)
    n_blocks = in_f // block
    scale, zero = qt.scale, qt.zero
    if qt.scheme.group_size == PER_TENSOR:
        scale, zero = scale.expand(out_f, 1), zero.expand(out_f, 1)
    packed = {
        "qweight": pack_bits(qt.codes, bits).reshape(out_f, n_blocks, block * bits // 8),
        "scales": scale.float().contiguous(),
    }
    if not qt.integer_zero:
        packed["zero_points"] = zero.float().contiguous()
    elif not qt.scheme.symmetric:
        packed["zero_points"] = pack_bits(zero, bits)[:, : (n_blocks * bits + 7) // 8].contiguous()
    return packed


def unpack_weight(qweight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                  K: int, bits: int) -> torch.Tensor:
    """The float32 weight ``[N, K]`` a MatMulNBits node's inputs stand for (the operator's own formula)."""
    N, n_blocks = scales.shape
    codes = unpack_bits(qweight.reshape(N, -1), bits, K).float()
    if zero_points is None:
        zero = torch.full_like(scales, float(1 << (bits - 1)))
    elif zero_points.dtype == torch.uint8:
        zero = unpack_bits(zero_points, bits, n_blocks).float()
    else:
        zero = zero_points.float()
    idx = torch.arange(K) // (K // n_blocks)
    return (codes - zero[:, idx]) * scales.float()[:, idx]


# ---------------------------------------------------------------------------------------------------------------
# The custom op (torch reference implementation + ONNX translation) and the module that calls it
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def matmul_nbits_op():
    """``turboquant::matmul_nbits``, registered on first use (importing the format registers nothing in torch)."""

    @torch.library.custom_op("turboquant::matmul_nbits", mutates_args=())
    def matmul_nbits(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                     K: int, N: int, bits: int, block_size: int) -> torch.Tensor:
        return x @ unpack_weight(qweight, scales, zero_points, K, bits).to(x.dtype).t()

    @matmul_nbits.register_fake
    def _(x, qweight, scales, zero_points, K, N, bits, block_size):
        return x.new_empty((*x.shape[:-1], N))

    return torch.ops.turboquant.matmul_nbits.default


@functools.cache
def matmul_nbits_schema():
    """The ``com.microsoft.MatMulNBits`` schema, registered with onnx once (onnxscript builds nodes from schemas,
    and onnx itself knows only the standard domains). It declares the inputs and attributes this exporter emits."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("MatMulNBits", MS_DOMAIN):
        return onnx.defs.get_schema("MatMulNBits", 1, MS_DOMAIN)
    optional = OpSchema.FormalParameterOption.Optional
    ints = OpSchema.AttrType.INT
    schema = OpSchema(
        "MatMulNBits", MS_DOMAIN, 1, "ONNX Runtime's block-quantized weight MatMul (declared by turboquant).",
        inputs=[OpSchema.FormalParameter("A", "T1"), OpSchema.FormalParameter("B", "T2"),
                OpSchema.FormalParameter("scales", "T1"),
                OpSchema.FormalParameter("zero_points", "T3", param_option=optional)],
        outputs=[OpSchema.FormalParameter("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], "activations and scales"),
                          ("T2", ["tensor(uint8)"], "packed codes"),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], "zero points")],
        attributes=[OpSchema.Attribute(name, ints, required=True) for name in ("K", "N", "bits", "block_size")],
    )
    onnx.defs.register_schema(schema)
    return schema


def translate_matmul_nbits(x, qweight, scales, zero_points, K: int, N: int, bits: int, block_size: int):
    """ONNX translation of ``turboquant::matmul_nbits``: one ``com.microsoft.MatMulNBits`` node."""
    from onnxscript.values import Op, Opset

    op = Op(Opset(MS_DOMAIN, 1), "MatMulNBits", matmul_nbits_schema())
    inputs = (x, qweight, scales) if zero_points is None else (x, qweight, scales, zero_points)
    return op(*inputs, K=K, N=N, bits=bits, block_size=block_size)


class NBitsLinear(torch.nn.Module):
    """A linear layer holding only MatMulNBits' packed tensors (plus an optional float bias)."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.bits, self.block_size = qt.scheme.bits, block_size(qt.scheme, qt.shape[1])
        packed = pack_module(qt)
        self.register_buffer("qweight", packed["qweight"])
        self.register_buffer("scales", packed["scales"])
        self.register_buffer("zero_points", packed.get("zero_points"))
        self.bias = None if bias is None else torch.nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = matmul_nbits_op()(x, self.qweight, self.scales, self.zero_points,
                              self.in_features, self.out_features, self.bits, self.block_size)
        return y if self.bias is None else y + self.bias


class LogitsOnly(torch.nn.Module):
    """``(input_ids, attention_mask) -> logits`` without a KV cache: the graph's whole interface."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def build_model(ckpt: QuantizedCheckpoint) -> torch.nn.Module:
    """The transformers model in float32 with every quantized linear an ``NBitsLinear`` (read shard by shard)."""
    model = build_skeleton(ckpt.path, dtype=torch.float32, real_buffers=True)
    plain: dict[str, torch.Tensor] = {}
    for shard in iter_shards(ckpt):
        tensors = dict(shard.plain)
        for module, qt in shard.quantized.items():
            parent, _, child = module.rpartition(".")
            setattr(model.get_submodule(parent), child, NBitsLinear(qt, tensors.pop(f"{module}.bias", None)))
        plain.update(tensors)
    materialize(model, plain, dtype=torch.float32)
    return model


#: Warnings torch's exporter emits on every export that say nothing about the artifact (its own deprecations, and
#: that the two inputs share the ``batch`` / ``sequence`` dimensions, which is the intent).
_EXPORTER_NOISE = (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"# The axis name: \w+ will not be used")


def export_graph(model: torch.nn.Module, path: Path) -> None:
    """Trace ``model`` with dynamic batch and sequence and save it with external data beside ``path``."""
    example = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        for message in _EXPORTER_NOISE:
            warnings.filterwarnings("ignore", message=message)
        program = torch.onnx.export(
            LogitsOnly(model).eval(), example, dynamo=True, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
            dynamic_shapes=(dims, dims), custom_translation_table={matmul_nbits_op(): translate_matmul_nbits},
            optimize=True, verbose=False,
        )
    tidy(program.model)
    program.save(str(path), external_data=True)


def tidy(model: Any) -> None:
    """Name initializers and MatMulNBits nodes after the model's modules (``model.layers.0.mlp.up_proj.qweight``,
    not the wrapper's ``model.model...``) and drop the tracer's per-node metadata (source paths and stack traces,
    which would make the file depend on where it was built)."""
    graph = model.graph
    for value in list(graph.initializers.values()):
        value.name = value.name.removeprefix("model.")
    for node in graph:
        node.metadata_props.clear()
        if node.domain == MS_DOMAIN and node.op_type == "MatMulNBits":
            node.name = node.inputs[1].name.removesuffix(".qweight") + "/MatMulNBits"


@register_format("onnx", description="ONNX graph (input_ids -> logits, no KV cache) with MatMulNBits int weights",
                 runtime="onnxruntime (CPU; MatMulNBits contrib op)", check=check)
def write(ckpt: QuantizedCheckpoint, out: Path, options: dict[str, Any]) -> None:
    export_graph(build_model(ckpt), out / MODEL_FILE)
    write_json(out / "config.json", source_config(ckpt))

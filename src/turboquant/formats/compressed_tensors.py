"""compressed-tensors "pack-quantized" checkpoints: the format vLLM loads natively (and transformers reads).

Per quantized linear ``M`` ``[out, in]``, as written by compressed-tensors' own ``PackedQuantizationCompressor``:

* ``M.weight_packed`` int32 ``[out, in * bits / 32]``: the signed integer ``q = code - 2**(bits-1)`` stored with
  that offset added back (so exactly our code), as one LSB-first bit stream per output row;
* ``M.weight_scale`` ``[out, G]``; ``M.weight_shape`` int64 ``[2]``;
* asymmetric schemes: ``M.weight_zero_point`` int32 ``[out * bits / 32, G]``, the signed zero point packed the same
  way along the *output* dimension; act-order: ``M.weight_g_idx`` int32 ``[in]``.

Dequantization is ``(q - zp) * scale = (code - zero) * scale``: codes and zero points are copied, never
re-rounded, and packed with compressed-tensors' packer. Scales are float16-exact; they are stored in the model's
dtype when that holds them exactly (float16, float32) and as float16 otherwise. One config group per distinct
scheme, so mixed-precision checkpoints are representable; linears left in float are listed in ``ignore``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from turboquant.formats.base import (FormatError, has_fractional_zero, register_format, schemes, source_config,
                                     write_json, write_packed_shards)
from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.io.skeleton import build_skeleton
from turboquant.tensor import PER_CHANNEL, PER_TENSOR, QuantizedTensor, QuantScheme

FORMAT = "pack-quantized"


def check(ckpt: QuantizedCheckpoint, options: dict[str, Any]) -> None:
    if not schemes(ckpt):
        raise FormatError(f"{ckpt.path} holds no quantized weights (method '{ckpt.method}')",
                          "quantize with a weight method (rtn, gptq, awq, hqq) before exporting to compressed-tensors")
    if has_fractional_zero(ckpt):
        raise FormatError("the checkpoint has fractional zero points (HQQ), which compressed-tensors cannot store",
                          "re-quantize with --option integer_zero=true, or export to mlx (scale + bias)")
    _require_library()


def _require_library():
    try:
        import compressed_tensors
    except ImportError:
        raise FormatError("the compressed-tensors package is not installed",
                          "pip install compressed-tensors (it is part of turboquant's dependencies)") from None
    return compressed_tensors


def _strategy(scheme: QuantScheme) -> dict[str, Any]:
    if scheme.group_size > 0:
        return {"strategy": "group", "group_size": scheme.group_size}
    return {"strategy": "channel", "group_size": None}  # per-tensor is stored as its per-channel repetition


def scheme_args(scheme: QuantScheme, act_order: bool) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` for the weights of one scheme."""
    return {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric, **_strategy(scheme),
            "actorder": "group" if act_order else None, "dynamic": False, "observer": "minmax"}


def pack_module(qt: QuantizedTensor, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    bits, offset = qt.scheme.bits, 1 << (qt.scheme.bits - 1)
    scale, zero = qt.scale, qt.zero
    if qt.scheme.group_size in (PER_TENSOR, PER_CHANNEL) and scale.shape[0] != qt.shape[0]:
        scale, zero = scale.expand(qt.shape[0], -1), zero.expand(qt.shape[0], -1)
    out = {
        "weight_packed": pack_to_int32((qt.codes.to(torch.int16) - offset).to(torch.int8), bits),
        "weight_scale": scale.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor(list(qt.shape), dtype=torch.int64),
    }
    if not qt.scheme.symmetric:
        out["weight_zero_point"] = pack_to_int32((zero.to(torch.int16) - offset).to(torch.int8).contiguous(),
                                                 bits, packed_dim=0).contiguous()
    if qt.g_idx is not None:
        out["weight_g_idx"] = qt.g_idx.to(torch.int32)
    return out


def quantization_config(ckpt: QuantizedCheckpoint, linears: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` block: one group per (scheme, act-order), validated by compressed-tensors."""
    ct = _require_library()
    from compressed_tensors.quantization import QuantizationConfig

    groups: dict[str, list[str]] = {}
    for module, info in sorted(ckpt.modules.items()):
        key = (QuantScheme.from_dict(info["scheme"]), bool(info.get("act_order")))
        groups.setdefault(repr(key), []).append(module)
    uniform = len(groups) == 1
    config_groups = {}
    for i, (key, modules) in enumerate(sorted(groups.items())):
        info = ckpt.modules[modules[0]]
        args = scheme_args(QuantScheme.from_dict(info["scheme"]), bool(info.get("act_order")))
        config_groups[f"group_{i}"] = {"targets": ["Linear"] if uniform else modules, "weights": args,
                                       "input_activations": None, "output_activations": None, "format": FORMAT}
    ignore = sorted(set(linears) - set(ckpt.modules))
    qc = QuantizationConfig(config_groups=config_groups, format=FORMAT, quantization_status="compressed",
                            ignore=ignore)
    out = qc.model_dump(exclude_none=False)
    out["quant_method"] = "compressed-tensors"
    out["version"] = ct.__version__
    return out


def _scale_dtype(ckpt: QuantizedCheckpoint) -> torch.dtype:
    dtypes = {info["dtype"] for info in ckpt.modules.values()}
    return torch.float32 if dtypes == {"float32"} else torch.float16


def _float_linears(ckpt: QuantizedCheckpoint) -> list[str]:
    """Names of the model's Linear modules (quantized or not), read off the skeleton on the meta device."""

    model = build_skeleton(ckpt.path)
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@register_format("compressed-tensors", description="compressed-tensors pack-quantized (int32 weight_packed + scales)",
                 runtime="vLLM, transformers + compressed-tensors", check=check)
def write(ckpt: QuantizedCheckpoint, out: Path, options: dict[str, Any]) -> None:
    scale_dtype = _scale_dtype(ckpt)
    write_packed_shards(ckpt, out, lambda qt: pack_module(qt, scale_dtype))
    config = source_config(ckpt)
    config["quantization_config"] = quantization_config(ckpt, _float_linears(ckpt))
    write_json(out / "config.json", config)

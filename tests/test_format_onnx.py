"""ONNX export: MatMulNBits nodes holding our exact codes, onnxruntime logits vs our model, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import splice
from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.formats import FormatError, export
from turboquant.formats.onnx import (
    DATA_FILE, MODEL_FILE, ORT_CPU_BITS, ORT_FLOAT_ZERO_BITS, block_size, build_model, pack_module,
)
from turboquant.fsutil import sha256_file
from turboquant.methods import make_config
from turboquant.quantize.pipeline import quantize
from turboquant.tensor import QuantizedTensor, QuantScheme
from turboquant.io.tiny import save_tiny_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.usefixtures("one_thread")

# Measured on the tiny model (|logits| <= ~0.7): max |logit diff| 2.4e-7 (float32 graph vs our float32 model).
LOGIT_TOL = 1e-5


@pytest.fixture(scope="module")
def qdirs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    specs = {
        "w4g32asym": ("rtn", dict(bits=4, group_size=32, symmetric=False)),
        "w8chan": ("rtn", dict(bits=8, group_size=-1, symmetric=True)),
        "hqq": ("hqq", dict(bits=4, group_size=32)),
        "w3g32": ("rtn", dict(bits=3, group_size=32)),
        "w4g8": ("rtn", dict(bits=4, group_size=8)),
        "hqq8": ("hqq", dict(bits=8, group_size=32)),
        "fp16": ("fp16", {}),
    }
    qdirs = {k: quantize(tiny_model, make_config(m, **kw), root / k, progress=False) for k, (m, kw) in specs.items()}
    # block 0: HQQ 4-bit g32 (float zero points); block 1: 8-bit per-channel symmetric (blocks of 64 / 128)
    qdirs["mixed"] = splice(qdirs["hqq"], qdirs["w8chan"], root / "mixed", layer=1)
    return qdirs


@pytest.fixture(scope="module")
def qwen_biased(tmp_path_factory):
    """A 1-layer Qwen2 (q/k/v projections with biases, set non-zero here) quantized to 4-bit g32 asymmetric."""
    root = tmp_path_factory.mktemp("qwen")
    src = save_tiny_model(root / "qwen", model_type="qwen2", hidden=64, intermediate=128, layers=1, heads=4,
                          kv_heads=2, vocab=512)
    state = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    state.update({k: torch.randn(v.shape, generator=g) * 0.5 for k, v in state.items() if k.endswith(".bias")})
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    return quantize(src, make_config("rtn", bits=4, group_size=32, symmetric=False), root / "q", progress=False)


@pytest.fixture(scope="module")
def exported(qdirs, qwen_biased, tmp_path_factory):
    """The exports (the costly step, ~5-10 s each): asymmetric 4-bit, the mixed checkpoint, Qwen2 with biases."""
    root = tmp_path_factory.mktemp("onnx")
    qdirs = {**qdirs, "qwen": qwen_biased}
    return {key: export(qdirs[key], "onnx", root / key) for key in ("w4g32asym", "mixed", "qwen")}


def _stream_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Codes of ``bits`` bits read LSB-first from each row's bytes (MatMulNBits' packing), independently of ours."""
    b = np.unpackbits(packed.reshape(packed.shape[0], -1), axis=1, bitorder="little")[:, : n * bits]
    return (b.reshape(len(b), n, bits).astype(np.int64) << np.arange(bits)).sum(-1)


def _node_model(qt: QuantizedTensor):
    """A one-node graph: ``Y = A @ W^T`` with W as MatMulNBits holding ``qt``'s packed tensors."""
    from onnx import TensorProto, helper, numpy_helper

    out_f, in_f = qt.shape
    packed = pack_module(qt)
    inits = [numpy_helper.from_array(v.numpy(), k) for k, v in packed.items()]
    node = helper.make_node("MatMulNBits", ["A", *packed], ["Y"], domain="com.microsoft", K=in_f, N=out_f,
                            bits=qt.scheme.bits, block_size=block_size(qt.scheme, in_f))
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, in_f])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, out_f])], inits)
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def _random_qt(bits: int, zero_kind: str, group: int = 32, shape=(24, 96)) -> QuantizedTensor:
    """Random codes / scales / zeros (96 inputs in groups of 32: an odd number of blocks, so zero points pad)."""
    g = torch.Generator().manual_seed(bits)
    n_groups = shape[1] // group
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
    scale = (torch.rand(shape[0], n_groups, generator=g) * 0.1 + 0.01).half()
    zero = {"sym": torch.full((shape[0], n_groups), 1 << (bits - 1), dtype=torch.uint8),
            "asym": torch.randint(0, 1 << bits, (shape[0], n_groups), generator=g, dtype=torch.uint8),
            "float": (torch.rand(shape[0], n_groups, generator=g) * ((1 << bits) - 1)).half()}[zero_kind]
    return QuantizedTensor(codes, scale, zero, QuantScheme(bits, group, zero_kind == "sym"))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("zero_kind", ["sym", "asym", "float"])
def test_one_node_computes_our_weights_and_the_bit_table_is_the_runtimes(bits, zero_kind):
    """Every packing MatMulNBits runs gives A @ W^T with our W; the others fail in the installed onnxruntime."""
    qt = _random_qt(bits, zero_kind)
    A = np.random.default_rng(bits).standard_normal((3, qt.shape[1])).astype(np.float32)
    supported = bits in ORT_CPU_BITS and (zero_kind != "float" or bits in ORT_FLOAT_ZERO_BITS)
    try:
        Y = ort.InferenceSession(_node_model(qt), providers=["CPUExecutionProvider"]).run(None, {"A": A})[0]
    except Exception as e:  # onnxruntime raises its own Fail / RuntimeException types
        assert not supported, f"onnxruntime refused a packing we export: {e}"
        return
    assert supported, f"onnxruntime runs {bits}-bit / {zero_kind} zero points: widen ORT_CPU_BITS / ORT_FLOAT_ZERO_BITS"
    ref = A.astype(np.float64) @ qt.dequantize(torch.float64).numpy().T
    assert np.abs(Y - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 0, False), (8, -1, True), (2, -1, False)])
def test_per_tensor_and_per_channel_scales_are_one_block_per_row(bits, group_size, symmetric):
    """With ``in_features`` a power of two, one scale per row (or per tensor, repeated) is one block of K."""
    g = torch.Generator().manual_seed(bits)
    scheme, rows = QuantScheme(bits, group_size, symmetric), 1 if group_size == 0 else 24
    zero = (torch.full((rows, 1), 1 << (bits - 1), dtype=torch.uint8) if symmetric
            else torch.randint(0, 1 << bits, (rows, 1), generator=g, dtype=torch.uint8))
    qt = QuantizedTensor(torch.randint(0, 1 << bits, (24, 64), generator=g, dtype=torch.uint8),
                         (torch.rand(rows, 1, generator=g) * 0.1 + 0.01).half(), zero, scheme)
    A = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    Y = ort.InferenceSession(_node_model(qt), providers=["CPUExecutionProvider"]).run(None, {"A": A})[0]
    ref = A.astype(np.float64) @ qt.dequantize(torch.float64).numpy().T
    assert pack_module(qt)["qweight"].shape == (24, 1, 64 * bits // 8)
    assert np.abs(Y - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("key", ["w4g32asym", "mixed"])
def test_graph_holds_our_codes_scales_and_zeros_exactly(qdirs, exported, key):
    ckpt = QuantizedCheckpoint.open(qdirs[key])
    model = onnx.load(str(exported[key] / MODEL_FILE))  # external data is read from model.onnx.data
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {n.input[1].removesuffix(".qweight"): n for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert set(nodes) == set(ckpt.modules)
    quantized_shapes = set()
    for module, qt in ckpt.iter_quantized():
        node, (out_f, in_f) = nodes[module], qt.shape
        quantized_shapes |= {(out_f, in_f), (in_f, out_f)}
        attrs = {a.name: a.i for a in node.attribute}
        block = qt.scheme.group_size if qt.scheme.group_size > 0 else in_f
        assert node.domain == "com.microsoft" and attrs == {"K": in_f, "N": out_f, "bits": qt.scheme.bits,
                                                            "block_size": block}
        qweight, scales = inits[node.input[1]], inits[node.input[2]]
        assert qweight.dtype == np.uint8 and qweight.shape == (out_f, in_f // block, block * qt.scheme.bits // 8)
        assert np.array_equal(_stream_codes(qweight, qt.scheme.bits, in_f), qt.codes.numpy())
        assert scales.dtype == np.float32 and np.array_equal(scales, qt.scale.float().numpy())
        if not qt.integer_zero:  # HQQ: float zero points, unpacked
            zeros = inits[node.input[3]]
            assert zeros.dtype == np.float32 and np.array_equal(zeros, qt.zero.float().numpy())
        elif qt.scheme.symmetric:  # MatMulNBits' default zero point 2**(bits-1) is ours
            assert len(node.input) == 3
        else:
            zeros = inits[node.input[3]]
            assert zeros.dtype == np.uint8 and zeros.shape == (out_f, (in_f // block * qt.scheme.bits + 7) // 8)
            assert np.array_equal(_stream_codes(zeros, qt.scheme.bits, in_f // block), qt.zero.numpy())
    # no float copy of any quantized weight, as an initializer or a Constant
    packed = {name for node in nodes.values() for name in node.input[1:]}
    floats = [a for name, a in inits.items() if name not in packed and np.issubdtype(a.dtype, np.floating)]
    floats += [onnx.numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant"
               for a in n.attribute if a.name == "value"]
    assert not [a.shape for a in floats if tuple(a.shape) in quantized_shapes]
    # the float matrices left are the embedding and lm_head (transposed by the exporter's constant folding)
    assert sorted(a.shape for a in floats if a.ndim == 2) == [(64, 4096), (4096, 64)]
    assert "model.embed_tokens.weight" in inits


IDS = torch.tensor([[0, 312, 45, 102, 7, 99, 248, 13, 56, 3], [0, 17, 80, 400, 21, 5, 66, 1, 1, 1]])


@pytest.mark.parametrize("key", ["w4g32asym", "mixed", "qwen"])
def test_onnxruntime_logits_match_our_model(qdirs, qwen_biased, exported, key):
    session = ort.InferenceSession(str(exported[key] / MODEL_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    ids, mask = IDS, torch.ones_like(IDS)
    mask[1, 7:] = 0  # right padding
    model = QuantizedCheckpoint.open({**qdirs, "qwen": qwen_biased}[key]).load_model(torch.float32)
    worst = 0.0
    for batch_ids, batch_mask in ((ids, mask), (ids[:1, :5], mask[:1, :5])):  # dynamic batch and sequence
        logits = session.run(None, {"input_ids": batch_ids.numpy(), "attention_mask": batch_mask.numpy()})[0]
        with torch.no_grad():
            ref = model(batch_ids, attention_mask=batch_mask).logits.numpy()
        assert logits.shape == ref.shape == (*batch_ids.shape, model.config.vocab_size)
        valid = batch_mask.numpy().astype(bool)
        worst = max(worst, float(np.abs(logits - ref)[valid].max()))
    assert worst <= LOGIT_TOL, f"max |logit diff| {worst:.3g}"


@pytest.mark.parametrize("key", ["mixed", "qwen"])
def test_torch_twin_of_the_graph_is_our_model(qdirs, qwen_biased, key):
    """The module the graph is traced from (packed buffers + the custom op's reference kernel, biases) computes
    exactly our dequantized model."""
    ckpt = QuantizedCheckpoint.open({**qdirs, "qwen": qwen_biased}[key])
    with torch.no_grad():
        twin = build_model(ckpt)(IDS).logits
        ref = ckpt.load_model(torch.float32)(IDS).logits
    assert float((twin - ref).abs().max()) <= 1e-6


def test_export_is_byte_for_byte_reproducible(qwen_biased, exported, tmp_path):
    again = export(qwen_biased, "onnx", tmp_path / "again")
    for name in (MODEL_FILE, DATA_FILE):
        assert sha256_file(again / name) == sha256_file(exported["qwen"] / name)


def test_initializer_names_and_files(exported):
    out = exported["w4g32asym"]
    assert {MODEL_FILE, DATA_FILE, "config.json", "tokenizer.json", "manifest.json"} <= {p.name for p in out.iterdir()}
    model = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    names = {t.name for t in model.graph.initializer}
    assert "model.layers.0.self_attn.q_proj.qweight" in names and not any(n.startswith("model.model.") for n in names)
    assert all(not n.metadata_props for n in model.graph.node)  # no build paths or stack traces in the file


@pytest.mark.parametrize("key,needle", [
    ("w3g32", r"3-bit codes; ONNX Runtime's MatMulNBits CPU kernel runs 2, 4, 8-bit.*--bits 4"),
    ("w4g8", r"groups of 8; MatMulNBits blocks are powers of two >= 16"),
    ("chan96", r"one scale per channel \(192 inputs\); MatMulNBits blocks are powers of two"),
    ("hqq8", r"fractional \(HQQ\) zero points with 8-bit codes.*integer_zero=true"),
    ("act_order", "act-order"),
    ("fp16", "holds no quantized weights"),
])
def test_impossible_combinations_fail_before_any_work(qdirs, refused, tmp_path, key, needle):
    with pytest.raises(FormatError, match=needle):
        export({**qdirs, **refused}[key], "onnx", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))


@pytest.mark.slow
def test_trained_reference_model_logits(ref_model, heldout_text, tmp_path):
    """On the trained reference model (|logits| up to ~16), 256 held-out tokens. Measured: max |logit diff| 2.0e-5,
    top-1 agreement 100%."""
    from turboquant.io.loaders import load_tokenizer

    qdir = quantize(ref_model, make_config("rtn", bits=4, group_size=128, symmetric=False), tmp_path / "q",
                    progress=False)
    ids = torch.tensor([load_tokenizer(ref_model)(heldout_text.read_text()[:3000])["input_ids"][:256]])
    session = ort.InferenceSession(str(export(qdir, "onnx", tmp_path / "onnx") / MODEL_FILE),
                                   providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())})[0][0]
    with torch.no_grad():
        ref = QuantizedCheckpoint.open(qdir).load_model(torch.float32)(ids).logits[0].numpy()
    assert np.abs(logits - ref).max() <= 1e-4
    assert np.mean(logits.argmax(-1) == ref.argmax(-1)) >= 0.99

"""MLX export: packing against mx.quantize, stored values against our weights, mlx-lm load/generate/logits, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import splice
from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.formats import FormatError, export
from turboquant.formats.mlx import MLX_BITS, MLX_GROUP_SIZES
from turboquant.methods import make_config
from turboquant.quantize.pipeline import quantize
from turboquant.tensor import pack_words
from turboquant.io.tiny import save_tiny_model

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [0, 312, 45, 1022, 7, 99, 2048, 13, 560, 3]  # token ids (the tiny model's vocabulary is 4096)
# Measured on the tiny model (|logits| <= ~0.7): 2.4e-7 (float32 artifact), 1.1e-3 (float16 artifact: float16
# activations, weights and rounded biases vs our float32 model). The bounds leave headroom for other CPUs.
LOGIT_TOL = {"float32": 1e-5, "float16": 5e-3}


@pytest.fixture(scope="module")
def qdirs(tiny_model, tmp_path_factory):
    """Canonical checkpoints of the tiny model (hidden 64, intermediate 128) under a few schemes."""
    root = tmp_path_factory.mktemp("q")
    specs = {
        "w4g32sym": ("rtn", dict(bits=4, group_size=32, symmetric=True)),
        "w4g32asym": ("rtn", dict(bits=4, group_size=32, symmetric=False)),
        "w3g64asym": ("rtn", dict(bits=3, group_size=64, symmetric=False)),
        "w8chan": ("rtn", dict(bits=8, group_size=-1, symmetric=True)),
        "w5tensor": ("rtn", dict(bits=5, group_size=0, symmetric=False)),
        "w4g16": ("rtn", dict(bits=4, group_size=16, symmetric=True)),
        "hqq": ("hqq", dict(bits=4, group_size=32)),
        "fp16": ("fp16", {}),
    }
    return {k: quantize(tiny_model, make_config(m, **kw), root / k, progress=False) for k, (m, kw) in specs.items()}


def _load(out) -> dict[str, np.ndarray]:
    arrays = {}
    for f in sorted(out.glob("model*.safetensors")):
        arrays.update({k: np.array(v.astype(mx.float32) if v.dtype in (mx.float16, mx.bfloat16) else v)
                       for k, v in mx.load(str(f)).items()})
    return arrays


def _torch_logits(qdir, ids: list[int]) -> np.ndarray:
    model = QuantizedCheckpoint.open(qdir).load_model(torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("bits", MLX_BITS)
def test_packing_is_mx_quantize_packing(bits):
    """Our uint32 words are exactly mx.quantize's for the same codes, 3/5/6-bit straddling included."""
    rng = np.random.default_rng(bits)
    for group in MLX_GROUP_SIZES:
        W = mx.array(rng.standard_normal((8, 256)).astype(np.float32))
        wq, scales, biases = mx.quantize(W, group_size=group, bits=bits)
        unit = dict(group_size=group, bits=bits)
        codes = np.array(mx.dequantize(wq, mx.ones_like(scales), mx.zeros_like(biases), **unit))
        assert codes.min() >= 0 and codes.max() <= (1 << bits) - 1 and np.array_equal(codes, np.round(codes))
        ours = pack_words(torch.from_numpy(codes).to(torch.uint8), bits, torch.int32).view(torch.uint32).numpy()
        assert ours.dtype == np.uint32 and np.array_equal(ours, np.array(wq))
        # and the other way round: mlx unpacks our words to our codes
        back = mx.dequantize(mx.array(ours), mx.ones_like(scales), mx.zeros_like(biases), **unit)
        assert np.array_equal(np.array(back), codes)


@pytest.mark.parametrize("key", ["w4g32sym", "w4g32asym", "w3g64asym", "hqq", "w8chan", "w5tensor"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_stored_values_reproduce_our_weights(qdirs, tmp_path, key, dtype):
    out = export(qdirs[key], "mlx", tmp_path / "mlx", dtype=dtype)
    ckpt = QuantizedCheckpoint.open(qdirs[key])
    arrays = _load(out)
    config = json.loads((out / "config.json").read_text())
    worst = 0.0
    for module, qt in ckpt.iter_quantized():
        out_f, in_f = qt.shape
        q = config["quantization"].get(module, config["quantization"])
        group, bits = q["group_size"], q["bits"]
        assert bits == qt.scheme.bits and group == (qt.scheme.group_size if qt.scheme.group_size > 0 else in_f)
        weight, scales, biases = (arrays[f"{module}.{k}"] for k in ("weight", "scales", "biases"))
        assert weight.dtype == np.uint32 and weight.shape == (out_f, in_f * bits // 32)
        assert scales.shape == biases.shape == (out_f, in_f // group)
        scale, zero = (t.float().expand(out_f, -1) for t in (qt.scale, qt.zero))  # per-tensor: one per row
        assert np.array_equal(scales, scale.numpy())  # float16 scales are stored exactly
        # mlx's own dequantize (in float32, so that only the stored values matter) against ours
        W_mlx = np.array(mx.dequantize(mx.array(weight), mx.array(scales), mx.array(biases), group_size=group,
                                       bits=bits))
        W = qt.dequantize(torch.float32).numpy()
        exact_bias = -(zero * scale).numpy()
        if dtype == "float32" or (qt.scheme.symmetric and qt.integer_zero):
            assert np.array_equal(biases, exact_bias) and np.array_equal(W_mlx, W)
        else:  # the float16 rounding of -zero*scale, half an ulp at most, is the only error
            bound = np.maximum(np.abs(exact_bias) * 2.0**-11, 2.0**-25)
            assert np.all(np.abs(biases - exact_bias) <= bound)
            err = np.abs(W_mlx - W)
            assert np.all(err <= np.repeat(bound, group, axis=1) + np.abs(W) * 2.0**-24)  # + float32 rounding
            worst = max(worst, float((err / np.repeat(scale.numpy(), group, axis=1)).max()))
        assert f"{module}.weight" in arrays and not np.issubdtype(arrays[f"{module}.weight"].dtype, np.floating)
    assert worst <= ((1 << qt.scheme.bits) - 1) / 2048 * 1.001  # at most qmax/2048 of a quantization step
    float_dtype = {"float16": mx.float16, "float32": mx.float32}[dtype]
    rest = mx.load(str(sorted(out.glob("model*.safetensors"))[-1]))  # the last shard holds embeddings and norm
    assert rest["model.norm.weight"].dtype == rest["lm_head.weight"].dtype == float_dtype


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_mlx_lm_loads_generates_and_matches_our_logits(qdirs, tmp_path, dtype):
    out = export(qdirs["w4g32asym"], "mlx", tmp_path / "mlx", dtype=dtype)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    model, tokenizer = mlx_lm.load(str(out))
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
    logits = np.array(model(mx.array([PROMPT])).astype(mx.float32))[0]
    ref = _torch_logits(qdirs["w4g32asym"], PROMPT)
    diff = float(np.abs(logits - ref).max())
    assert diff <= LOGIT_TOL[dtype], f"max |logit diff| {diff:.3g}"
    text = mlx_lm.generate(model, tokenizer, prompt=PROMPT, max_tokens=6, verbose=False)
    assert isinstance(text, str) and text
    if dtype == "float32":  # greedy decoding follows our model token for token
        torch_model = QuantizedCheckpoint.open(qdirs["w4g32asym"]).load_model(torch.float32)
        with torch.no_grad():
            greedy = torch_model.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False,
                                          pad_token_id=1)[0, len(PROMPT):].tolist()
        assert text == tokenizer.decode(greedy)


def test_mixed_precision_writes_per_layer_overrides(qdirs, tmp_path):
    """Block 0 at 4-bit g32 asym, block 1 at 8-bit per-channel (MLX groups of 64 / 128 = the whole row)."""
    mixed = splice(qdirs["w4g32asym"], qdirs["w8chan"], tmp_path / "mixed", layer=1)
    out = export(mixed, "mlx", tmp_path / "mlx", dtype="float32")
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["group_size"], q["bits"]) == (32, 4)
    overrides = {k: v for k, v in q.items() if isinstance(v, dict)}
    assert set(overrides) == {m for m in QuantizedCheckpoint.open(mixed).modules if m.startswith("model.layers.1.")}
    assert overrides["model.layers.1.self_attn.q_proj"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert overrides["model.layers.1.mlp.down_proj"] == {"group_size": 128, "bits": 8, "mode": "affine"}
    model, _ = mlx_lm.load(str(out))
    assert (model.model.layers[1].mlp.down_proj.bits, model.model.layers[1].mlp.down_proj.group_size) == (8, 128)
    assert (model.model.layers[0].mlp.down_proj.bits, model.model.layers[0].mlp.down_proj.group_size) == (4, 32)
    logits = np.array(model(mx.array([PROMPT])))[0]
    diff = float(np.abs(logits - _torch_logits(mixed, PROMPT)).max())
    assert diff <= LOGIT_TOL["float32"], f"max |logit diff| {diff:.3g}"


def test_linear_biases_are_carried(tmp_path):
    """A Qwen2 (q/k/v projections with biases, set non-zero here): mlx-lm adds the float biases we carry."""
    src = save_tiny_model(tmp_path / "qwen", model_type="qwen2", hidden=64, intermediate=128, layers=1, heads=4,
                          kv_heads=2, vocab=512)
    state = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    state.update({k: torch.randn(v.shape, generator=g) * 0.5 for k, v in state.items() if k.endswith(".bias")})
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    qdir = quantize(src, make_config("rtn", bits=4, group_size=32, symmetric=False), tmp_path / "q", progress=False)
    out = export(qdir, "mlx", tmp_path / "mlx", dtype="float32")
    model, _ = mlx_lm.load(str(out))
    assert np.array_equal(np.array(model.model.layers[0].self_attn.q_proj.bias),
                          state["model.layers.0.self_attn.q_proj.bias"].numpy())
    ids = [0, 31, 45, 102, 7, 99, 248, 13]
    diff = float(np.abs(np.array(model(mx.array([ids])))[0] - _torch_logits(qdir, ids)).max())
    assert diff <= LOGIT_TOL["float32"], f"max |logit diff| {diff:.3g}"


@pytest.mark.parametrize("key,options,needle", [
    ("chan96", {}, r"one scale per channel \(192 inputs\); MLX groups.*--group-size 64"),
    ("w4g16", {}, "has groups of 16; MLX groups are 32, 64, 128"),
    ("act_order", {}, "act-order"),
    ("fp16", {}, "holds no quantized weights"),
    ("w4g32sym", {"dtype": "bfloat16"}, "not an MLX artifact dtype"),
])
def test_impossible_combinations_fail_before_any_work(qdirs, refused, tmp_path, key, options, needle):
    qdir = {**qdirs, **refused}[key]
    with pytest.raises(FormatError, match=needle):
        export(qdir, "mlx", tmp_path / "x", **options)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))


@pytest.mark.slow
def test_trained_reference_model_logits(ref_model, heldout_text, tmp_path):
    """On the trained reference model (|logits| up to ~16), 64 held-out tokens (mlx's float16 kernels are slow on
    x86: ~0.4 s a token here). Measured on 256 tokens: max |logit diff| 1.9e-5 (float32 artifact) and 7.6e-2
    (float16: float16 activations), top-1 agreement 100% in both."""
    from turboquant.io.loaders import load_tokenizer

    qdir = quantize(ref_model, make_config("rtn", bits=4, group_size=128, symmetric=False), tmp_path / "q",
                    progress=False)
    ids = load_tokenizer(ref_model)(heldout_text.read_text()[:3000])["input_ids"][:64]
    ref = _torch_logits(qdir, ids)
    for dtype, tol in (("float32", 1e-4), ("float16", 0.25)):
        model, _ = mlx_lm.load(str(export(qdir, "mlx", tmp_path / dtype, dtype=dtype)))
        logits = np.array(model(mx.array([ids])).astype(mx.float32))[0]
        assert np.abs(logits - ref).max() <= tol
        assert np.mean(logits.argmax(-1) == ref.argmax(-1)) >= 0.99

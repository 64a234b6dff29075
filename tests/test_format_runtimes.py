"""GPTQ, AWQ and compressed-tensors artifacts loaded by their real consumers on CPU, logits against ours.

The reference model (trained, so logits are meaningful) is quantized once per scheme; each artifact is loaded by
transformers (which hands GPTQ and AWQ layers to GPTQModel's CPU kernels and compressed-tensors checkpoints to
compressed-tensors) and its next-token distributions are compared with our dequantized model on held-out text.
Measured (max |Δlogit|, KL): see the tolerances below; the kernels compute in float16/bfloat16 internally, ours in
float32, which is what the tolerances absorb.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import HELDOUT, REF_MODEL
from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.formats import export
from turboquant.methods import make_config
from turboquant.quantize.pipeline import quantize

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
pytestmark = pytest.mark.slow

KL_MAX = 2e-4       # mean KL(ours || runtime) per token
TOP1_MIN = 0.98     # next-token argmax agreement


@pytest.fixture(scope="module")
def ids():
    from turboquant.io.loaders import load_tokenizer, read_text, tokenize

    return tokenize(load_tokenizer(REF_MODEL), read_text(HELDOUT))[:512].reshape(2, 256)


@pytest.fixture(scope="module")
def qroot(tmp_path_factory):
    return tmp_path_factory.mktemp("rt")


def _quantized(qroot, name, method, **kw):
    out = qroot / name
    if not out.exists():
        quantize(REF_MODEL, make_config(method, **kw), out, progress=False)
    return out


@torch.no_grad()
def _compare(qdir, logits: torch.Tensor, ids: torch.Tensor) -> dict:
    ours = QuantizedCheckpoint.open(qdir).load_model(torch.float32)(ids).logits.float()
    theirs = logits.float()
    logp, logq = torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    r = {"kl": kl, "top1": top1, "max_abs": (ours - theirs).abs().max().item(), "scale": ours.std().item()}
    print(f"{qdir.name}: {r}")
    return r


@torch.no_grad()
def _transformers_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32).eval()
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith("self_attn.q_proj")}
    return model(ids).logits, kinds


@pytest.mark.parametrize("name,method,kw,fmt_opts", [
    ("w4g32sym", "rtn", dict(bits=4, group_size=32, symmetric=True), {}),
    ("w3g128sym", "rtn", dict(bits=3, group_size=128, symmetric=True), {}),
    ("w8chan", "rtn", dict(bits=8, group_size=-1, symmetric=True), {}),
    ("w4g128asym-v2", "rtn", dict(bits=4, group_size=128, symmetric=False), {"checkpoint_format": "gptq_v2"}),
])
def test_gptq_loads_in_transformers_gptqmodel(qroot, tmp_path, ids, name, method, kw, fmt_opts):
    qdir = _quantized(qroot, name, method, **kw)
    logits, kinds = _transformers_logits(export(qdir, "gptq", tmp_path / "gptq", **fmt_opts), ids)
    assert kinds and all(k != "Linear" for k in kinds), kinds  # a GPTQModel quantized linear, not a float one
    r = _compare(qdir, logits, ids)
    assert r["kl"] < KL_MAX and r["top1"] > TOP1_MIN, r


def test_gptq_act_order_g_idx_loads(tmp_path, tiny_model, ids):
    """Real GPTQ with act-order (dynamic groups: g_idx is not monotone) through GPTQModel's kernel."""
    from turboquant.io.calibration import CalibrationRecipe, CalibrationSet

    calib_ids = torch.randint(3, 4096, (8, 64), generator=torch.Generator().manual_seed(0))
    calib = CalibrationSet(calib_ids, CalibrationRecipe(("synthetic",), n_samples=8, seqlen=64))
    qdir = quantize(tiny_model, make_config("gptq", bits=4, group_size=32, act_order=True, static_groups=False), tmp_path / "q",
                    calib=calib, progress=False)
    g_idx = QuantizedCheckpoint.open(qdir).quantized_tensor("model.layers.0.mlp.down_proj").g_idx
    assert g_idx is not None and not bool((g_idx[1:] >= g_idx[:-1]).all())
    small = ids[:, :64] % 4096
    logits, kinds = _transformers_logits(export(qdir, "gptq", tmp_path / "g"), small)
    assert kinds and "Linear" not in kinds
    r = _compare(qdir, logits, small)
    assert r["max_abs"] < 1e-2 and r["top1"] > 0.95, r


def test_awq_loads_in_transformers_gptqmodel(qroot, tmp_path, ids):
    qdir = _quantized(qroot, "w4g32asym", "rtn", bits=4, group_size=32, symmetric=False)
    logits, kinds = _transformers_logits(export(qdir, "awq", tmp_path / "awq"), ids)
    assert kinds and all("Awq" in k for k in kinds), kinds
    r = _compare(qdir, logits, ids)
    assert r["kl"] < KL_MAX and r["top1"] > TOP1_MIN, r


def test_compressed_tensors_symmetric_loads_in_transformers(qroot, tmp_path, ids):
    qdir = _quantized(qroot, "w4g128sym", "rtn", bits=4, group_size=128, symmetric=True)
    logits, _ = _transformers_logits(export(qdir, "compressed-tensors", tmp_path / "ct"), ids)
    r = _compare(qdir, logits, ids)
    assert r["max_abs"] < 1e-3 and r["kl"] < 1e-6, r  # decompressed to float32 weights: exact up to matmul order


def test_an_asymmetric_compressed_tensors_artifact_validates_in_its_decompressing_runtime(qroot, tmp_path):
    """transformers cannot load it (below), so validation decompresses it with compressed-tensors itself: the
    same distributions as the canonical checkpoint's, and the runtime says what it was."""
    from turboquant.quality.validate import validate

    qdir = _quantized(qroot, "w4g128asym", "rtn", bits=4, group_size=128, symmetric=False)
    art = export(qdir, "compressed-tensors", tmp_path / "ct")
    ours = validate(art, REF_MODEL, HELDOUT, ctx=256, max_tokens=1024, speed=False)
    canonical = validate(qdir, REF_MODEL, HELDOUT, ctx=256, max_tokens=1024, speed=False)
    assert ours["runtime"] == "compressed-tensors (decompressed in torch)" and ours["verdict"]["passed"]
    assert ours["kl"] == pytest.approx(canonical["kl"], rel=1e-5) and 0 < ours["kl"] < 0.01


def test_compressed_tensors_asymmetric_decompresses_exactly(qroot, tmp_path):
    """compressed-tensors' own decompressor reproduces our weights bit for bit, packed zero points included.

    (transformers 5.23 cannot load asymmetric pack-quantized checkpoints — it sizes ``weight_zero_point`` unpacked
    before decompressing, for llm-compressor's own asymmetric output too — so this checks the layout through the
    library that vLLM's loader mirrors.)
    """
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    qdir = _quantized(qroot, "w4g32asym", "rtn", bits=4, group_size=32, symmetric=False)
    out = export(qdir, "compressed-tensors", tmp_path / "ct")
    import json

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qcfg["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    state = {}
    for f in out.glob("*.safetensors"):
        state.update(load_file(f))
    ckpt = QuantizedCheckpoint.open(qdir)
    for module in ckpt.modules:
        local = {k.removeprefix(module + "."): v for k, v in state.items() if k.startswith(module + ".")}
        W = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert torch.equal(W.float(), ckpt.quantized_tensor(module).dequantize(torch.float32)), module

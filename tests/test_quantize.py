import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from turboquant.io.checkpoint import METADATA_FILE, QuantizedCheckpoint
from turboquant.errors import ConfigError, ModelLoadError, OutputError
from turboquant.methods import make_config
from turboquant.methods.rtn import rtn_quantize
from turboquant.quantize.pipeline import quantize


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, True), (3, 64, False), (2, -1, False), (8, 0, True)])
def test_quantize_checkpoint_reload_is_bit_exact(tmp_path, tiny_model, bits, group_size, symmetric):
    out = quantize(tiny_model, make_config("rtn", bits=bits, group_size=group_size, symmetric=symmetric),
                   tmp_path / "q", progress=False)
    original = load_file(tiny_model / "model.safetensors")
    ckpt = QuantizedCheckpoint.open(out)
    assert ckpt.method == "rtn" and len(ckpt.modules) == 2 * 7
    for module, qt in ckpt.iter_quantized():
        expected = rtn_quantize(original[f"{module}.weight"], qt.scheme)
        assert torch.equal(qt.codes, expected.codes)
        assert torch.equal(qt.scale, expected.scale) and torch.equal(qt.zero, expected.zero)
        assert torch.equal(qt.dequantize(), expected.dequantize())
    for name in ckpt.plain_names():
        assert torch.equal(ckpt.tensors.load([name])[name], original[name])
    state = ckpt.dequantized_state_dict()
    assert set(state) == set(original)


def test_checkpoint_layout_and_metadata(tmp_path, tiny_model):
    out = quantize(tiny_model, make_config("rtn", bits=4, group_size=32), tmp_path / "q", progress=False)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", METADATA_FILE,
            "model.safetensors.index.json", "model-00001-of-00003.safetensors",
            "model-00003-of-00003.safetensors"} <= files
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["method"] == "rtn" and meta["scheme"] == {"bits": 4, "group_size": 32, "symmetric": True}
    assert meta["source"]["path"] == str(tiny_model.resolve())
    q = meta["modules"]["model.layers.0.self_attn.q_proj"]
    assert q["shape"] == [64, 64] and q["dtype"] == "float32"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard0 = load_file(out / "model-00001-of-00003.safetensors")
    assert shard0["model.layers.0.self_attn.q_proj.qcodes"].shape == (64, 32)  # 64 4-bit codes -> 32 bytes
    assert all(k.startswith("model.layers.0.") for k in shard0)
    assert index["weight_map"]["model.norm.weight"] == "model-00003-of-00003.safetensors"
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("method,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_cast_output_is_a_plain_hf_checkpoint(tmp_path, tiny_model, method, dtype):
    out = quantize(tiny_model, make_config(method), tmp_path / method, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == dtype
    original = load_file(tiny_model / "model.safetensors")
    w = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w, original["model.layers.0.mlp.up_proj.weight"].to(dtype))


def test_failure_mid_run_leaves_nothing(tmp_path, tiny_model, monkeypatch):
    calls = {"n": 0}
    real = rtn_quantize

    def flaky(weight, scheme, cfg=None):
        calls["n"] += 1
        if calls["n"] > 9:
            raise OSError(28, "No space left on device")
        return real(weight, scheme, cfg)

    monkeypatch.setattr("turboquant.methods.rtn.rtn_quantize", flaky)
    with pytest.raises(OSError):
        quantize(tiny_model, make_config("rtn", group_size=32), tmp_path / "q", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path, tiny_model):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("earlier artifact")
    with pytest.raises(OutputError, match="already exists.*--overwrite"):
        quantize(tiny_model, make_config("rtn", group_size=32), out, progress=False)
    assert (out / "keep.txt").read_text() == "earlier artifact"
    quantize(tiny_model, make_config("rtn", group_size=32), out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / METADATA_FILE).is_file()


def test_group_size_not_dividing_fails_before_any_work(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="group_size 128 does not divide the input dimension 64"):
        quantize(tiny_model, make_config("rtn", group_size=128), tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_nan_weights_are_caught_naming_the_tensor(tmp_path, tiny_model_copy):
    f = tiny_model_copy / "model.safetensors"
    state = load_file(f)
    state["model.layers.1.mlp.gate_proj.weight"][3, 5] = float("nan")
    save_file(state, f)
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.gate_proj.weight holds 1 NaN/Inf"):
        quantize(tiny_model_copy, make_config("rtn", group_size=32), tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_loaded_quantized_model_runs(tmp_path, tiny_model):
    out = quantize(tiny_model, make_config("rtn", bits=8, group_size=32), tmp_path / "q", progress=False)
    model = QuantizedCheckpoint.open(out).load_model()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert torch.allclose(a, b, atol=1e-2), (a - b).abs().max()  # 8-bit RTN: ~3e-3 typical, 5.3e-3 seen

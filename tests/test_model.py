import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from turboquant.errors import ModelLoadError
from turboquant.io.hub import check_repo_id
from turboquant.io.arch import ARCHITECTURES
from turboquant.io.model import LazyCheckpoint, open_model, resolve_model
from turboquant.io.tiny import save_tiny_model

from conftest import REF_MODEL


def test_opens_lazily_and_walks_blocks(tiny_model):
    m = open_model(tiny_model)
    assert m.arch.name == "llama" and m.n_layers == 2 and m.source.commit_sha is None
    block = m.block(1)
    assert all(n.startswith("model.layers.1.") for n in block)
    assert {f"model.layers.1.{lin}.weight" for lin in m.arch.linears} <= set(block)
    assert "model.embed_tokens.weight" in m.checkpoint.non_block_names(m.arch)
    assert {p.name for p in m.aux_files()} >= {"config.json", "tokenizer.json", "generation_config.json"}


def test_sharded_checkpoint_with_index(tmp_path, tiny_model):
    state = load_file(tiny_model / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    shards = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for f, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / f)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (tmp_path / "config.json").write_text((tiny_model / "config.json").read_text())
    m = open_model(tmp_path)
    assert torch.equal(m.block(0)["model.layers.0.mlp.up_proj.weight"], state["model.layers.0.mlp.up_proj.weight"])
    os.remove(tmp_path / "b.safetensors")
    with pytest.raises(ModelLoadError, match="shard b.safetensors named in model.safetensors.index.json is missing"):
        open_model(tmp_path)


def test_pickle_only_checkpoint_is_refused_unless_allowed(tmp_path, tiny_model):
    state = load_file(tiny_model / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((tiny_model / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="only pickle weights.*--allow-pickle"):
        open_model(tmp_path)
    m = open_model(tmp_path, allow_pickle=True)
    assert torch.equal(m.block(0)["model.layers.0.self_attn.q_proj.weight"],
                       state["model.layers.0.self_attn.q_proj.weight"])


def test_unknown_architecture_is_refused_naming_transformers(tiny_model_copy):
    cfg = json.loads((tiny_model_copy / "config.json").read_text())
    cfg["model_type"] = "no_such_family"
    (tiny_model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"'no_such_family' is not a causal LM that transformers [\d.]+ implements"):
        open_model(tiny_model_copy)


def test_config_missing_or_invalid(tiny_model_copy):
    (tiny_model_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        open_model(tiny_model_copy)
    (tiny_model_copy / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        open_model(tiny_model_copy)


def test_truncated_safetensors_is_refused(tiny_model_copy):
    f = tiny_model_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors.*(truncated|not a readable)"):
        open_model(tiny_model_copy)


def test_missing_block_weights_are_reported(tiny_model_copy):
    f = tiny_model_copy / "model.safetensors"
    state = load_file(f)
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, f)
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.down_proj.weight is missing"):
        open_model(tiny_model_copy)


def test_remote_code_is_never_needed(tiny_model_copy):
    cfg = json.loads((tiny_model_copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (tiny_model_copy / "config.json").write_text(json.dumps(cfg))
    (tiny_model_copy / "evil.py").write_text("raise SystemExit('remote code executed')\n")
    m = open_model(tiny_model_copy)
    assert m.arch.name == "llama"


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_other_families_open(tmp_path, model_type):
    path = save_tiny_model(tmp_path / model_type, model_type=model_type, hidden=64, intermediate=128, layers=1,
                           vocab=4096, tokenizer_from=REF_MODEL)
    m = open_model(path)
    assert m.arch.name == model_type and set(m.arch.linears) == set(ARCHITECTURES["llama"].linears)


@pytest.mark.parametrize("bad", ["../etc/passwd", "org/../../x", "a/b/c", "org/name with space", "org/-x", "x" * 200,
                                 "org/name..", "org/na$me"])
def test_repo_id_validation(bad):
    with pytest.raises(ModelLoadError, match="neither a local model directory nor a valid Hub repo id"):
        check_repo_id(bad)


def test_hub_offline_uses_cache_and_returns_commit(tmp_path, monkeypatch, tiny_model):
    """A repo in the local HF cache resolves offline to its snapshot and commit sha."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / "models--org--tiny"
    snap = repo_dir / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in tiny_model.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # read at call time, as users set it
    src = resolve_model("org/tiny")
    assert src.commit_sha == sha and src.repo_id == "org/tiny" and (src.path / "config.json").is_file()
    with pytest.raises(ModelLoadError, match="not in the local cache"):
        resolve_model("org/absent")


def test_lazy_checkpoint_reads_only_requested_tensors(tiny_model):
    ckpt = LazyCheckpoint.open(tiny_model)
    got = ckpt.load(["model.norm.weight"])
    assert list(got) == ["model.norm.weight"]
    with pytest.raises(ModelLoadError, match="tensor nope is missing"):
        ckpt.load(["nope"])


@pytest.mark.parametrize("quant,needle", [({"quant_method": "gptq", "bits": 4}, r"already quantized \(gptq\)"),
                                          ({"quant_method": "bitsandbytes"}, r"already quantized \(bitsandbytes\)"),
                                          ({"quant_method": "awq", "bits": 4}, r"already quantized \(awq\)"),
                                          ({"quant_method": "compressed-tensors"},
                                           r"already quantized \(compressed-tensors\)")])
def test_prequantized_sources_are_refused_with_the_fix(tiny_model_copy, quant, needle):
    cfg = json.loads((tiny_model_copy / "config.json").read_text())
    (tiny_model_copy / "config.json").write_text(json.dumps({**cfg, "quantization_config": quant}))
    with pytest.raises(ModelLoadError, match=needle):
        open_model(tiny_model_copy)

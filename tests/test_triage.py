"""Triage before download: a Hub release is judged per (quantization, format) from its config and file list,
and an unsupported one costs no weight download."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from turboquant.cli import app
from turboquant.io.tiny import save_tiny_model
from turboquant.pipeline.plan import Plan
from turboquant.pipeline.triage import triage

from conftest import HELDOUT, REF_MODEL


def _plan(tmp_path, model_id: str) -> Plan:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"id": model_id}],
        "calibration": {"data": [str(HELDOUT)], "n_samples": 2, "seqlen": 32},
        "evaluation": {"text": str(HELDOUT)},
        "quantize": [{"name": "rtn4", "method": "rtn", "options": {"bits": 4, "group_size": 32},
                      "formats": ["gptq", "gguf", "mlx"]},
                     {"name": "awq4", "method": "awq", "options": {"bits": 4, "group_size": 32},
                      "formats": ["gptq"]}],
    }))
    return Plan.from_yaml(path)


def _publish(hub, tmp_path, repo_id: str, family: str, **config_changes) -> None:
    path = save_tiny_model(tmp_path / repo_id.replace("/", "--"), model_type=family, hidden=64, intermediate=128,
                           layers=2, vocab=4096, tokenizer_from=REF_MODEL, tie_embeddings=None)
    if config_changes:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(config_changes)
        (path / "config.json").write_text(json.dumps(cfg))
    hub.create_repo(repo_id, {p.name: p for p in path.iterdir() if p.is_file()})


def test_triage_judges_every_artifact_from_the_config_alone(tmp_path, hub_server):
    hub = hub_server.state
    _publish(hub, tmp_path, "org/tiny-llama", "llama")
    _publish(hub, tmp_path, "org/tiny-gemma2", "gemma2", query_pre_attn_scalar=256)  # llama.cpp's scale differs
    _publish(hub, tmp_path, "org/tiny-gptq", "llama", quantization_config={"quant_method": "gptq", "bits": 4})
    _publish(hub, tmp_path, "org/tiny-fp8", "llama", quantization_config={"quant_method": "fp8"})
    _publish(hub, tmp_path, "org/tiny-olmo2", "olmo2")  # norms after q/k: nothing AWQ can fold into
    plan = _plan(tmp_path, "org/tiny-gemma2")

    ok = triage(plan, "org/tiny-llama")
    assert ok.processable and ok.sha == hub.repos["org/tiny-llama"].head.oid and len(ok.artifacts) == 4

    gemma = triage(plan, "org/tiny-gemma2")
    assert not gemma.processable and gemma.unsupported is None
    assert gemma.reasons() == ["rtn4 -> gguf: unsupported: gemma2: query_pre_attn_scalar=256 differs from head_dim 16, "
                               "and llama.cpp scales queries by 1/sqrt(head_dim). Fix: use another format for this "
                               "model (its GGUF would score differently in llama.cpp)."]

    pre = triage(plan, "org/tiny-gptq")
    assert pre.reasons() == ["unsupported: the checkpoint is already quantized (gptq). Fix: quantize the original "
                             "float16 / bfloat16 checkpoint it was made from."]
    fp8 = triage(plan, "org/tiny-fp8")  # FP8 releases are dequantized on read: judged like any other
    assert fp8.processable and fp8.unsupported is None, fp8.reasons()
    olmo2 = triage(plan, "org/tiny-olmo2")
    assert not olmo2.processable and olmo2.unsupported is None
    [reason] = olmo2.reasons()
    assert reason.startswith("awq4 -> gptq: unsupported: AWQ cannot fold scales into the input of self_attn.q_proj, "
                             "self_attn.k_proj, self_attn.v_proj in 'olmo2'"), reason
    assert [k for k, e in olmo2.artifacts.items() if e is None] == [("rtn4", "gptq"), ("rtn4", "gguf"), ("rtn4", "mlx")]
    assert hub_server.state.count("GET", r"\.safetensors") == 0  # not one weight byte was fetched

    res = CliRunner().invoke(app, ["plan", str(tmp_path / "params.yaml")])
    assert res.exit_code == 2, res.output
    assert "IMPOSSIBLE: gemma2: query_pre_attn_scalar=256 differs from head_dim 16" in res.output
    assert "1 planned artifact(s) cannot be made; first org/tiny-gemma2 rtn4 -> gguf" in res.output


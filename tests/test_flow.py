"""The quantize_model flow end to end in Prefect's embedded mode: plan → artifacts → validation → report,
and a re-run of the unchanged plan served from the task cache."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import HELDOUT, REF_MODEL
from prefect_server import prefect_env

pytestmark = pytest.mark.slow


READ_ARTIFACT = """
import asyncio
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

async def main():
    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["quantization-report"])))
        for a in found:
            print(a.data)

asyncio.run(main())
"""


def _env(tmp_path):
    return prefect_env(tmp_path / "prefect")


def _run(tmp_path, params, run_dir):
    return subprocess.run([sys.executable, "-m", "turboquant.cli", "run", str(params), "--run-dir", str(run_dir)],
                          capture_output=True, text=True, env=_env(tmp_path), timeout=900, cwd=tmp_path)


def test_flow_runs_the_plan_and_caches_a_rerun(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "models": [{"id": str(REF_MODEL)}],
        "evaluation": {"text": str(HELDOUT), "ctx": 256, "max_tokens": 2048},
        "quantize": [{"method": "rtn", "options": {"bits": 4, "group_size": 32},
                      "formats": ["gptq", {"format": "gguf", "gguf_type": "Q4_0"}]}],
    }))
    run = tmp_path / "run"
    res = _run(tmp_path, params, run)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "2 of 2 artifacts passed their gates" in res.stdout
    model = run / REF_MODEL.name
    assert (model / "quantized" / "rtn-w4-g32" / "turboquant.json").is_file()
    for label in ("gptq", "gguf-Q4_0"):
        assert (model / "artifacts" / f"rtn-w4-g32-{label}" / "manifest.json").is_file()
        v = json.loads((model / "eval" / f"rtn-w4-g32-{label}.json").read_text())
        assert v["verdict"]["passed"] and v["n_scored"] > 1000
    gguf = json.loads((model / "eval" / "rtn-w4-g32-gguf-Q4_0.json").read_text())
    assert gguf["runtime"] == "llama.cpp"
    # speed against the float model in the same runtime: an F16 GGUF in llama.cpp, the float model in torch
    speed = gguf["speed"]
    assert speed["artifact"]["runtime"] == speed["reference"]["runtime"] == "llama.cpp"
    assert speed["reference"]["path"].endswith("gguf-gguf_type=F16") and speed["artifact"]["decode_tokens"] == 32
    assert speed["artifact"]["decode_tok_s"] > 0 and speed["artifact"]["model_rss_bytes"] > 0
    assert speed["decode_speedup"] == speed["artifact"]["decode_tok_s"] / speed["reference"]["decode_tok_s"]
    gptq = json.loads((model / "eval" / "rtn-w4-g32-gptq.json").read_text())["speed"]
    assert gptq["artifact"]["runtime"] == "transformers + GPTQModel" and gptq["reference"]["runtime"] == "torch"
    report = (model / "report.md").read_text()
    assert "| rtn-w4-g32-gguf-Q4_0 | gguf | llama.cpp |" in report and "decode tok/s (× float)" in report
    assert f"{speed['artifact']['decode_tok_s']:.1f} ({speed['decode_speedup']:.2f}×)" in report
    attached = subprocess.run([sys.executable, "-c", READ_ARTIFACT], capture_output=True, text=True, timeout=300,
                              env=_env(tmp_path), cwd=tmp_path)
    assert "| rtn-w4-g32-gptq | gptq |" in attached.stdout, attached.stderr[-2000:]  # the report, on the flow run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for label in ("gptq", "gguf-Q4_0"):  # an artifact the flow made rebuilds byte for byte, from another directory
        rebuilt = subprocess.run([sys.executable, "-m", "turboquant.cli", "reproduce",
                                  str(model / "artifacts" / f"rtn-w4-g32-{label}" / "manifest.json")],
                                 capture_output=True, text=True, cwd=elsewhere, timeout=900)
        same = re.search(r"(\d+) of (\d+) files identical", rebuilt.stdout)
        assert rebuilt.returncode == 0 and same and same[1] == same[2], rebuilt.stdout[-2000:] + rebuilt.stderr[-2000:]
    stamp = (model / "quantized" / "rtn-w4-g32" / "turboquant.json").stat().st_mtime_ns
    again = _run(tmp_path, params, run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (model / "quantized" / "rtn-w4-g32" / "turboquant.json").stat().st_mtime_ns == stamp  # cached, not redone


def test_a_failing_artifact_blocks_only_itself(tmp_path):
    """GPTQ v1 cannot store the zero point 0 a positive-only group gets (known only once quantized): that export
    fails, the AWQ export of the same checkpoint is still validated and reported, and the run exits 3."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(REF_MODEL, model)
    weights = next(model.glob("*.safetensors"))
    state = load_file(weights)
    state["model.layers.0.self_attn.q_proj.weight"][0] = state["model.layers.0.self_attn.q_proj.weight"][0].abs()
    save_file({k: v.contiguous() for k, v in state.items()}, weights, metadata={"format": "pt"})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "models": [{"id": str(model)}],
        "evaluation": {"text": str(HELDOUT), "ctx": 256, "max_tokens": 1024, "speed": False},
        "quantize": [{"method": "rtn", "options": {"bits": 4, "group_size": 32, "symmetric": False},
                      "formats": ["gptq", "awq"]}],
    }))
    run = tmp_path / "run"
    res = _run(tmp_path, params, run)
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-3000:]
    assert "1 of 2 artifacts passed" in res.stdout and "gptq_v2" in res.stderr
    out = run / "model"
    assert not (out / "artifacts" / "rtn-w4-g32-asym-gptq").exists()
    assert json.loads((out / "eval" / "rtn-w4-g32-asym-awq.json").read_text())["verdict"]["passed"]
    assert "rtn-w4-g32-asym-awq" in (out / "report.md").read_text()


def test_sigkill_mid_run_then_rerun_resumes_without_redoing_finished_tasks(tmp_path):
    """Kill the run (SIGKILL) once exports have started; the re-run reuses the finished quantization, completes
    every artifact, and no partial directory survives."""
    import signal
    import time

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "models": [{"id": str(REF_MODEL)}],
        "evaluation": {"text": str(HELDOUT), "ctx": 256, "max_tokens": 1024, "speed": False},
        "quantize": [{"method": "rtn", "options": {"bits": 4, "group_size": 32},
                      "formats": ["gptq", "awq", {"format": "gguf", "gguf_type": "Q4_0"}]}],
    }))
    run = tmp_path / "run"
    model = run / REF_MODEL.name
    proc = subprocess.Popen([sys.executable, "-m", "turboquant.cli", "run", str(params), "--run-dir", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(tmp_path), cwd=tmp_path,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (model / "artifacts").is_dir():
        time.sleep(0.05)
    assert (model / "artifacts").is_dir(), "the run never reached the exports"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: the CLI and its embedded Prefect server
    proc.wait()
    stamp = (model / "quantized" / "rtn-w4-g32" / "turboquant.json").stat().st_mtime_ns
    res = _run(tmp_path, params, run)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "3 of 3 artifacts passed" in res.stdout
    assert (model / "quantized" / "rtn-w4-g32" / "turboquant.json").stat().st_mtime_ns == stamp
    leftovers = [p for p in run.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []
    for label in ("gptq", "awq", "gguf-Q4_0"):
        assert (model / "artifacts" / f"rtn-w4-g32-{label}" / "manifest.json").is_file()


def test_a_failed_gate_rolls_back_its_artifact_and_keeps_its_verdict(tmp_path, tiny_model):
    """Export + validate (+ publish) of one artifact is one transaction: a gate failure removes the exported
    directory (nothing left that could be published), the verdict and its reasons stay in eval/ and the report."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "models": [{"id": str(tiny_model)}],
        "evaluation": {"text": str(HELDOUT), "ctx": 64, "max_tokens": 512, "speed": False},
        "quantize": [{"method": "rtn", "options": {"bits": 8, "group_size": 32}, "formats": ["gptq"]},
                     {"method": "rtn", "options": {"bits": 2, "group_size": 32}, "formats": ["gptq"]}],
        "gates": {"max_kl": 0.05},
    }))
    run = tmp_path / "run"
    res = _run(tmp_path, params, run)
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-3000:]
    model = run / tiny_model.name
    assert (model / "artifacts" / "rtn-w8-g32-gptq" / "manifest.json").is_file()
    assert not (model / "artifacts" / "rtn-w2-g32-gptq").exists()  # rolled back
    failed = json.loads((model / "eval" / "rtn-w2-g32-gptq.json").read_text())
    assert not failed["verdict"]["passed"] and any(w in r for r in failed["verdict"]["reasons"] for w in ("KL", "top-1")), failed["verdict"]
    assert "rtn-w2-g32-gptq" in (model / "report.md").read_text()
    assert [p for p in run.rglob("*") if ".tmp-" in p.name] == []
    log = res.stdout + res.stderr
    assert "rtn rtn-w2-g32: shard 3/3 done" in log  # the engine's per-block lines reach the Prefect logs
    assert "plan: 100%|" in log and "7/7" in log  # the whole-plan bar: fetch, baseline, 2 quantize, 2 ship, report

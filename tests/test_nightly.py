"""The nightly flow against the local Hub-compatible server: a watched author's new release is quantized,
validated and published once; an unchanged release is skipped (by the Hub's record even without the local
ledger); a new commit is a new release."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import HELDOUT, HUB_TOKEN
from prefect_server import prefect_env

pytestmark = pytest.mark.slow


@pytest.fixture
def api(prefect_api) -> str:
    """The session's Prefect server (``conftest.prefect_api``)."""
    return prefect_api


def _env(tmp_path, api: str):
    """The Hub server's endpoint, but no HF_TOKEN: the token comes from the Prefect Secret block the plan names,
    saved in the session's Prefect server (``prefect_api``), which every run of these tests talks to."""
    env = prefect_env(tmp_path / "prefect", api)
    env.pop("HF_TOKEN", None)
    return env


def _nightly(tmp_path, watch, params, api):
    return subprocess.run([sys.executable, "-m", "turboquant.cli", "nightly", "--watch", str(watch), "--params",
                           str(params), "--runs-root", str(tmp_path / "nightly")], capture_output=True, text=True,
                          env=_env(tmp_path, api), cwd=tmp_path, timeout=900)


def test_nightly_processes_each_release_once_and_publishes_it(tmp_path, hub_server, tiny_model, api):
    hub = hub_server.state
    hub.create_repo("org/tiny-llama", {p.name: p for p in tiny_model.iterdir() if p.is_file()})
    hub.create_repo("org/unrelated-model", {"README.md": "not watched"})
    prequantized = {p.name: p for p in tiny_model.iterdir() if p.is_file()}
    cfg = json.loads((tiny_model / "config.json").read_text())
    prequantized["config.json"] = json.dumps({**cfg, "quantization_config": {"quant_method": "awq", "bits": 4}})
    hub.create_repo("org/tiny-llama-AWQ", prequantized)  # watched too: triaged from its config, never downloaded
    watch = tmp_path / "watch.yaml"
    watch.write_text(yaml.safe_dump({"watch": [{"author": "org", "name_contains": "tiny"}]}))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "models": [{"id": "org/replaced-by-each-release"}],
        "evaluation": {"text": str(HELDOUT), "ctx": 64, "max_tokens": 256, "speed": False},
        "quantize": [{"method": "rtn", "options": {"bits": 8, "group_size": 32}, "formats": ["gptq"]}],
        "gates": {"min_top1": 0.0},
        "publish": {"enabled": True, "namespace": "tq", "token_secret": "hf-write-token"},
    }))
    saved = subprocess.run([sys.executable, "-c", "import sys; from prefect.blocks.system import Secret; "
                            "Secret(value=sys.argv[1]).save('hf-write-token')", HUB_TOKEN],
                           capture_output=True, text=True, env=_env(tmp_path, api), timeout=300)
    assert saved.returncode == 0, saved.stderr[-2000:]
    first_sha = hub.repos["org/tiny-llama"].head.oid

    res = _nightly(tmp_path, watch, params, api)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"processed org/tiny-llama@{first_sha[:12]} (1 approved)" in res.stdout
    published = [c for c in hub.commits("tq/tiny-llama-GPTQ-Int8") if "TurboQuant-Idempotency-Key" in c.message]
    assert len(published) == 1
    assert {"model.safetensors.index.json", "manifest.json", "README.md"} <= set(hub.files("tq/tiny-llama-GPTQ-Int8"))
    assert "unrelated" not in res.stdout
    awq_sha = hub.repos["org/tiny-llama-AWQ"].head.oid
    assert (f"unsupported org/tiny-llama-AWQ@{awq_sha[:12]}: unsupported: the checkpoint is already quantized (awq)"
            in res.stdout)
    assert hub.count("GET", r"tiny-llama-AWQ/.*\.safetensors") == 0

    (tmp_path / "nightly" / "processed.jsonl").unlink()  # the Hub's commit history alone says it is done
    again = _nightly(tmp_path, watch, params, api)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"skipped   org/tiny-llama@{first_sha[:12]}" in again.stdout
    assert len(hub.commits("tq/tiny-llama-GPTQ-Int8")) == len(published) + 1  # repo creation + the one publish
    assert sorted(p.name for p in (tmp_path / "nightly").iterdir() if "@" in p.name) == [f"tiny-llama@{first_sha[:12]}"]

    new_sha = hub.push("org/tiny-llama", {"README.md": "# tiny-llama v2\n"}, message="release v2")
    third = _nightly(tmp_path, watch, params, api)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert f"processed org/tiny-llama@{new_sha[:12]}" in third.stdout
    assert (tmp_path / "nightly" / f"tiny-llama@{new_sha[:12]}" / "tiny-llama" / "artifacts" / "rtn-w8-g32-gptq").is_dir()
    keys = [c.message for c in hub.commits("tq/tiny-llama-GPTQ-Int8") if "TurboQuant-Idempotency-Key" in c.message]
    assert len(keys) == 2 and keys[0] != keys[1]  # the new release's artifact (its manifest names the new sha)
    for out in (res, again, third):  # the Secret block's token is never printed or written
        assert HUB_TOKEN not in out.stdout + out.stderr
    for path in (tmp_path / "nightly").rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert HUB_TOKEN.encode() not in path.read_bytes(), path
    for repo in hub.repos:
        assert all(HUB_TOKEN.encode() not in data for data in hub.files(repo).values()), repo


def test_nightly_runs_releases_concurrently_within_the_limit_and_isolates_a_failure(tmp_path, hub_server,
                                                                                    tiny_model, api):
    """Ten watched releases at once under a limit of 3: runs overlap, never more than 3 at a time, and the one
    release whose weights hold a NaN has its artifact rejected, naming it, while the nine others pass."""
    from safetensors.torch import load_file, save_file

    hub = hub_server.state
    files = {p.name: p for p in tiny_model.iterdir() if p.is_file()}
    broken = tmp_path / "broken.safetensors"
    weights = next(n for n in files if n.endswith(".safetensors"))
    state = load_file(files[weights])
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, broken, metadata={"format": "pt"})
    for i in range(10):
        hub.create_repo(f"fleet/tiny-{i:02d}", {**files, weights: broken} if i == 5 else files)
    watch = tmp_path / "watch.yaml"
    watch.write_text(yaml.safe_dump({"watch": [{"author": "fleet", "name_contains": "tiny", "limit": 20}]}))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "models": [{"id": "fleet/replaced-by-each-release"}],
        "evaluation": {"text": str(HELDOUT), "ctx": 32, "max_tokens": 128, "speed": False},
        "quantize": [{"method": "rtn", "options": {"bits": 8, "group_size": 32},
                      "formats": [{"format": "gguf", "gguf_type": "Q8_0"}]}],
        "gates": {"min_top1": 0.0},
    }))
    res = subprocess.run([sys.executable, "-m", "turboquant.cli", "nightly", "--watch", str(watch), "--params",
                          str(params), "--runs-root", str(tmp_path / "nightly"), "--max-concurrent", "3"],
                         capture_output=True, text=True, env=_env(tmp_path, api), cwd=tmp_path, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    outcomes = {o["repo_id"]: o for o in json.loads((tmp_path / "nightly" / "last-nightly.json").read_text())}
    assert len(outcomes) == 10 and {o["status"] for o in outcomes.values()} == {"processed"}
    broken_run = outcomes.pop("fleet/tiny-05")  # its one artifact is rejected, naming the NaN; the others pass
    assert broken_run["passed"] == 0 and "NaN" in " ".join(broken_run["rejected"]["rtn-w8-g32-gguf-Q8_0"])
    assert all(o["passed"] == 1 and not o["rejected"] for o in outcomes.values())
    assert "processed fleet/tiny-05@" in res.stdout and "(0 approved)" in res.stdout, res.stderr[-3000:]
    outcomes = [broken_run, *outcomes.values()]
    events = sorted([(o["started"], 1) for o in outcomes] + [(o["finished"], -1) for o in outcomes])
    running, most = 0, 0
    for _, step in events:
        running += step
        most = max(most, running)
    assert 2 <= most <= 3, most  # they overlap, and the limit held
    ledger = (tmp_path / "nightly" / "processed.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["repo_id"] for line in ledger) == sorted(o["repo_id"] for o in outcomes)

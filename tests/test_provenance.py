"""DVC provenance end to end: `dvc repro` of the plan in a temporary git + DVC repo, push to a local remote, delete
outputs and cache, clone fresh, `dvc pull` + `turboquant reproduce` → identical sha256s; a params change re-runs only
the affected stages; `dvc metrics show` / `dvc plots show` return the evaluation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CALIB, HELDOUT

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _env(tmp: Path) -> dict[str, str]:
    """HOME-independent DVC and git: site cache, global and system config in the test's tmp, no analytics."""
    env = dict(os.environ)
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", DVC_SITE_CACHE_DIR=str(tmp / "dvc-site"),
               DVC_GLOBAL_CONFIG_DIR=str(tmp / "dvc-global"), DVC_SYSTEM_CONFIG_DIR=str(tmp / "dvc-system"),
               DVC_NO_ANALYTICS="1", DVC_NO_UPDATER="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               GIT_CONFIG_GLOBAL=str(tmp / "gitconfig"), GIT_CONFIG_NOSYSTEM="1")
    return env


def sh(cwd: Path, env: dict, *cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
    if ok and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def params(tiny_model: Path, rtn_options: dict) -> dict:
    return {
        "models": [{"id": str(tiny_model)}],
        "calibration": {"data": [str(CALIB / "tiny.txt")], "n_samples": 4, "seqlen": 32, "seed": 0},
        "evaluation": {"text": str(HELDOUT), "ctx": 64, "max_tokens": 256, "tasks": [], "speed": False},
        "quantize": [
            {"name": "gptq4", "method": "gptq", "options": {"bits": 4, "group_size": 32},
             "formats": [{"format": "gguf", "gguf_type": "Q4_0"}]},
            {"name": "rtn8", "method": "rtn", "options": rtn_options,
             "formats": [{"format": "gguf", "gguf_type": "Q8_0"}]},
        ],
        "gates": {},
        "publish": {"enabled": False},
    }


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def project(tiny_model, tmp_path_factory):
    """A git + DVC project with this repository's dvc.yaml and a tiny plan, reproduced and pushed once."""
    tmp = tmp_path_factory.mktemp("dvcproj")
    env = _env(tmp)
    repo = tmp / "repo"
    repo.mkdir()
    sh(repo, env, "git", "init", "-q")
    sh(repo, env, sys.executable, "-m", "dvc", "init", "-q")
    shutil.copyfile(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    sh(repo, env, sys.executable, "-m", "dvc", "remote", "add", "-f", "-d", "local", str(tmp / "remote"))
    shutil.copyfile(ROOT / "dvc.yaml", repo / "dvc.yaml")
    (repo / "params.yaml").write_text(yaml.safe_dump(params(tiny_model, {"bits": 8, "group_size": 32})))
    sh(repo, env, "turboquant", "stage", "sync", "params.yaml")
    first = sh(repo, env, sys.executable, "-m", "dvc", "repro")
    sh(repo, env, "git", "add", "-A")
    sh(repo, env, "git", "commit", "-qm", "first run")
    sh(repo, env, sys.executable, "-m", "dvc", "push", "-q")
    return {"repo": repo, "env": env, "tmp": tmp, "first": first.stdout}


def test_repro_runs_every_stage_and_records_manifests(project):
    repo = project["repo"]
    assert ran(project["first"]) == {
        "plan", "calibrate@tiny-llama", "quantize@tiny-llama--gptq4", "quantize@tiny-llama--rtn8",
        "export@tiny-llama--gptq4--gguf-Q4_0", "export@tiny-llama--rtn8--gguf-Q8_0",
        "evaluate@tiny-llama--gptq4--gguf-Q4_0", "evaluate@tiny-llama--rtn8--gguf-Q8_0", "report"}
    m = json.loads((repo / "pipeline/tiny-llama/artifacts/gptq4-gguf-Q4_0/manifest.json").read_text())
    calib = repo / "pipeline/tiny-llama/calibration.safetensors"
    from turboquant.io.provenance import md5_file

    assert m["calibration"]["dvc_md5"] == md5_file(calib) and m["calibration"]["file"] == \
        "pipeline/tiny-llama/calibration.safetensors"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    out = lock["stages"]["calibrate@tiny-llama"]["outs"][0]
    assert out["md5"] == m["calibration"]["dvc_md5"]  # the manifest names the DVC version of the calibration set
    assert len(m["source"]["content_sha256"]) == 64 and m["source"]["repo_id"] is None
    assert m["method"] == "gptq" and m["method_config"]["group_size"] == 32 and m["scheme"]["bits"] == 4 and m["seed"] == 0
    assert m["code"]["turboquant_version"] and "git_sha" in m["code"]
    assert m["libraries"]["torch"] and m["libraries"]["gguf"] and m["machine"]["device"] == "cpu"
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert str(Path.home()) not in json.dumps({k: v for k, v in m.items() if k != "source"})


def test_metrics_and_plots_show(project):
    repo, env = project["repo"], project["env"]
    metrics = json.loads(sh(repo, env, sys.executable, "-m", "dvc", "metrics", "show", "--json").stdout)
    data = metrics[""]["data"]
    assert data["metrics/tiny-llama/gptq4-gguf-Q4_0.json"]["data"]["ppl"] > 1
    plots = json.loads(sh(repo, env, sys.executable, "-m", "dvc", "plots", "show", "--json").stdout)
    assert not plots.get("errors"), plots.get("errors")
    rows = [r for entries in plots["data"].values() for e in entries for r in e.get("content", {}).get("data", {}).get("values", [])]
    assert {"gptq4-gguf-Q4_0", "rtn8-gguf-Q8_0"} <= {r.get("artifact") for r in rows}


def test_params_change_reruns_only_the_affected_stages(project, tiny_model):
    repo, env = project["repo"], project["env"]
    lock_before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params(tiny_model, {"bits": 8, "group_size": 32,
                                                                         "mse_clip": True})))
    res = sh(repo, env, sys.executable, "-m", "dvc", "repro")
    assert ran(res.stdout) == {"plan", "quantize@tiny-llama--rtn8", "export@tiny-llama--rtn8--gguf-Q8_0",
                               "evaluate@tiny-llama--rtn8--gguf-Q8_0", "report"}, res.stdout
    lock_after = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage in ("calibrate@tiny-llama", "quantize@tiny-llama--gptq4", "export@tiny-llama--gptq4--gguf-Q4_0"):
        assert lock_after[stage] == lock_before[stage]
    assert lock_after["quantize@tiny-llama--rtn8"]["outs"] != lock_before["quantize@tiny-llama--rtn8"]["outs"]
    sh(repo, env, "git", "add", "-A")
    sh(repo, env, "git", "commit", "-qm", "mse clip")
    sh(repo, env, sys.executable, "-m", "dvc", "push", "-q")


def test_fresh_clone_pull_and_reproduce_is_byte_identical(project):
    from typer.testing import CliRunner

    from turboquant.cli import app

    repo, env, tmp = project["repo"], project["env"], project["tmp"]
    shutil.rmtree(repo / "pipeline")
    shutil.rmtree(repo / ".dvc" / "cache")
    clone = tmp / "clone"
    sh(tmp, env, "git", "clone", "-q", str(repo), str(clone))
    sh(clone, env, sys.executable, "-m", "dvc", "pull", "-q")
    art = clone / "pipeline/tiny-llama/artifacts/gptq4-gguf-Q4_0"
    assert (art / "manifest.json").is_file() and (clone / "pipeline/tiny-llama/calibration.safetensors").is_file()
    os.environ["DVC_SITE_CACHE_DIR"] = env["DVC_SITE_CACHE_DIR"]
    try:
        res = CliRunner().invoke(app, ["reproduce", str(art / "manifest.json")])
        assert res.exit_code == 0, res.output
        assert "DIFFERENT" not in res.output and "1 of 1" not in res.output
        assert all(line.startswith("identical") for line in res.output.splitlines()
                   if not line.startswith(("note", "turboquant")) and " of " not in line)
        # the calibration set is fetched at its recorded version when missing: dvc pull from the remote
        (clone / "pipeline/tiny-llama/calibration.safetensors").unlink()
        shutil.rmtree(clone / ".dvc" / "cache")
        res = CliRunner().invoke(app, ["reproduce", str(art / "manifest.json")])
        assert res.exit_code == 0, res.output
        # a tampered artifact file is caught by name
        gguf = next(art.glob("*.gguf"))
        gguf.chmod(0o644)
        data = bytearray(gguf.read_bytes())
        data[-1] ^= 0xFF
        gguf.write_bytes(bytes(data))
        res = CliRunner().invoke(app, ["reproduce", str(art / "manifest.json")])
        assert res.exit_code == 4 and f"artifact copy modified" in res.output and gguf.name in res.output
    finally:
        os.environ.pop("DVC_SITE_CACHE_DIR", None)
    assert not Path("/var/tmp/dvc").exists() or not any(Path("/var/tmp/dvc").iterdir())


def test_the_prefect_flow_tracks_and_pushes_what_it_produced(tiny_model, tmp_path):
    """`turboquant run` inside a git + DVC project: the calibration set and the approved artifact end up in DVC's
    cache and the remote (run directories are git-ignored, so their pointers go under dvc/tracked/)."""
    from prefect_server import prefect_env

    env = prefect_env(tmp_path / "prefect", base=_env(tmp_path))
    repo = tmp_path / "repo"
    repo.mkdir()
    sh(repo, env, "git", "init", "-q")
    sh(repo, env, sys.executable, "-m", "dvc", "init", "-q")
    sh(repo, env, sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"))
    (repo / ".gitignore").write_text("runs/\n")
    plan = params(tiny_model, {"bits": 8, "group_size": 32})
    plan["quantize"] = plan["quantize"][:1]  # gptq4 → GGUF Q4_0 (calibrated: the calibration set is tracked too)
    plan["gates"] = {"min_top1": 0.5}  # a random tiny model: agreement is not what this test is about
    (repo / "params.yaml").write_text(yaml.safe_dump(plan))
    res = sh(repo, env, sys.executable, "-m", "turboquant.cli", "run", "params.yaml", "--run-dir", "runs/x",
             "--no-progress")
    assert "1 of 1 artifacts passed" in res.stdout
    tracked = repo / "dvc" / "tracked"
    calib = yaml.safe_load((tracked / "runs--x--tiny-llama--calibration.safetensors.dvc").read_text())["outs"][0]
    art = yaml.safe_load((tracked / "runs--x--tiny-llama--artifacts--gptq4-gguf-Q4_0.dvc").read_text())["outs"][0]
    from turboquant.io.provenance import md5_file

    assert calib["md5"] == md5_file(repo / "runs/x/tiny-llama/calibration.safetensors")
    assert art["md5"].endswith(".dir") and art["nfiles"] >= 3
    pushed = {p.parent.name + p.name for p in (tmp_path / "remote" / "files" / "md5").rglob("*") if p.is_file()}
    assert calib["md5"] in pushed and art["md5"] in pushed

"""Prefect against real servers: deployments from deployments/prefect.yaml, process workers on two pools picking up
the per-method runs of a plan, and the same flow on a server backed by PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CALIB, HELDOUT
from prefect_server import Postgres, PrefectServer

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server(tmp_path):
    home = tmp_path / "prefect"
    home.mkdir()
    s = PrefectServer(home)
    yield s
    s.stop()


def _plan(tmp_path, model: Path) -> Path:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "models": [{"id": str(model)}],
        "calibration": {"data": [str(CALIB / "tiny.txt")], "n_samples": 4, "seqlen": 64, "seed": 0},
        "evaluation": {"text": str(HELDOUT), "ctx": 64, "max_tokens": 256, "speed": False},
        "quantize": [{"method": "rtn", "options": {"bits": 8, "group_size": 32}, "formats": ["gptq"]},
                     {"method": "gptq", "options": {"bits": 8, "group_size": 32}, "formats": ["gptq"]}],
        "gates": {"min_top1": 0.0},
    }))
    return params


def _turboquant_run(server: PrefectServer, params: Path, run: Path, cwd: Path, **env: str):
    return subprocess.run([sys.executable, "-m", "turboquant.cli", "run", str(params), "--run-dir", str(run),
                           "--placement", "pools", "--no-progress"], capture_output=True, text=True,
                          env={**server.env, **env}, cwd=cwd, timeout=600)


async def _flow_runs(api_url: str) -> list[dict]:
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api_url) as client:
        runs = await client.read_flow_runs()
        flows = {f.id: f.name for f in await client.read_flows()}
        return [{"flow": flows[r.flow_id], "pool": r.work_pool_name, "state": r.state.name,
                 "parent_task_run_id": r.parent_task_run_id, "parameters": r.parameters} for r in runs]


def test_workers_on_two_pools_run_the_per_method_flows_and_the_parent_collects_them(tmp_path, server, tiny_model):
    for pool in ("cpu", "cuda"):
        res = server.cli("work-pool", "create", pool, "--type", "process")
        assert res.returncode == 0, res.stderr[-2000:]
    res = server.cli("deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "quantize-method-cpu",
                     "--name", "quantize-method-cuda", cwd=ROOT, env={"TURBOQUANT_HOME": str(ROOT)})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    for pool in ("cpu", "cuda"):
        server.start_worker(pool, env={"TURBOQUANT_HOME": str(ROOT), "OMP_NUM_THREADS": "1"})

    run = tmp_path / "run"
    res = _turboquant_run(server, _plan(tmp_path, tiny_model), run, tmp_path, TURBOQUANT_POOLS="cpu,cuda")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 of 2 artifacts passed their gates" in res.stdout

    runs = asyncio.run(_flow_runs(server.api_url))
    children = sorted((r for r in runs if r["flow"] == "quantize_method"), key=lambda r: r["pool"])
    # rtn needs only a CPU; GPTQ prefers CUDA, and the cuda pool has a worker: each ran where the table puts it
    assert [(r["pool"], json.loads(r["parameters"]["config_json"])["method"], r["state"]) for r in children] == [
        ("cpu", "rtn", "Completed"), ("cuda", "gptq", "Completed")]
    assert all(r["parent_task_run_id"] for r in children)  # linked under the parent's task runs
    assert [r["state"] for r in runs if r["flow"] == "quantize_model"] == ["Completed"]
    model = run / tiny_model.name
    for name in ("rtn-w8-g32", "gptq-w8-g32"):
        assert (model / "quantized" / name / "turboquant.json").is_file()  # written by the workers
        assert (model / "artifacts" / f"{name}-gptq" / "manifest.json").is_file()  # exported by the parent


def test_workers_sharing_no_directory_hand_over_checkpoints_through_storage_by_url(tmp_path, server, tiny_model):
    """Each worker runs in its own directory with its own scratch; the parent in a third. The calibration file
    goes to the workers and each checkpoint comes back only through the storage URL, checked by sha256."""
    import hashlib

    store = tmp_path / "store"
    for pool in ("cpu", "cuda"):
        assert server.cli("work-pool", "create", pool, "--type", "process").returncode == 0
    res = server.cli("deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "quantize-method-cpu",
                     "--name", "quantize-method-cuda", cwd=ROOT, env={"TURBOQUANT_HOME": str(ROOT)})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    for pool in ("cpu", "cuda"):
        own = tmp_path / f"machine-{pool}"
        own.mkdir()
        server.start_worker(pool, cwd=own, env={"TURBOQUANT_HOME": str(ROOT), "OMP_NUM_THREADS": "1",
                                                "TURBOQUANT_SCRATCH": str(own / "scratch"),
                                                "TURBOQUANT_STORAGE": store.as_uri()})
    parent = tmp_path / "machine-parent"
    parent.mkdir()
    run = parent / "run"
    res = _turboquant_run(server, _plan(tmp_path, tiny_model), run, parent, TURBOQUANT_POOLS="cpu,cuda",
                          TURBOQUANT_STORAGE=store.as_uri())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 of 2 artifacts passed their gates" in res.stdout

    children = [r for r in asyncio.run(_flow_runs(server.api_url)) if r["flow"] == "quantize_method"]
    assert len(children) == 2 and all(r["state"] == "Completed" for r in children)
    for r in children:  # the worker was told keys and URLs, never a path on the parent's disk
        p = r["parameters"]
        assert p["storage"] == store.as_uri() and str(parent) not in json.dumps(p)
        assert not p["out"].startswith("/") and (p["calib_path"] is None or p["calib_path"].startswith("file://"))
    sha = lambda f: hashlib.sha256(f.read_bytes()).hexdigest()  # noqa: E731
    model = run / tiny_model.name
    for name, pool in (("rtn-w8-g32", "cpu"), ("gptq-w8-g32", "cuda")):
        key = next(r["parameters"]["out"] for r in children if r["parameters"]["out"].endswith(name))
        index = json.loads((store / key / ".turboquant-files.json").read_text())["files"]
        arrived = model / "quantized" / name
        assert index and {f.relative_to(arrived).as_posix(): sha(f) for f in arrived.rglob("*") if f.is_file()} \
            == index  # every file arrived, byte for byte
        made = tmp_path / f"machine-{pool}" / "scratch" / "turboquant-scratch" / key / "checkpoint"
        assert {f.relative_to(made).as_posix(): sha(f) for f in made.rglob("*") if f.is_file()} == index
        assert (model / "artifacts" / f"{name}-gptq" / "manifest.json").is_file()  # exported by the parent


def test_without_a_worker_for_the_needed_pool_the_plan_fails_before_work(tmp_path, server, tiny_model):
    """A method whose devices have no pool with workers fails as one line before Prefect starts."""
    res = _turboquant_run(server, _plan(tmp_path, tiny_model), tmp_path / "run", tmp_path, TURBOQUANT_POOLS="apple")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "turboquant: error: method rtn needs one of cpu but only pool(s) apple have workers. "
        "Fix: start a worker on pool cpu or add it to TURBOQUANT_POOLS.")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("manifest.json"))


@pytest.mark.skipif(Postgres.available() is not None, reason=str(Postgres.available()))
def test_the_flow_runs_the_same_against_a_server_on_postgresql(tmp_path, tiny_model):
    pg = Postgres()
    home = tmp_path / "prefect"
    home.mkdir()
    server = PrefectServer(home, database_url=pg.url)
    try:
        params = _plan(tmp_path, tiny_model)
        run = tmp_path / "run"
        res = subprocess.run([sys.executable, "-m", "turboquant.cli", "run", str(params), "--run-dir", str(run),
                              "--no-progress"], capture_output=True, text=True, env=server.env, cwd=tmp_path,
                             timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        runs = asyncio.run(_flow_runs(server.api_url))
        assert [r["state"] for r in runs if r["flow"] == "quantize_model"] == ["Completed"]
        rows = subprocess.run([*pg.as_user, "psql", "-h", "127.0.0.1", "-p", str(pg.port), "-U", pg.USER, "-d",
                               "prefect", "-tAc", "select count(*) from task_run where state_type = 'COMPLETED'"],
                              capture_output=True, text=True, timeout=60)
        assert rows.returncode == 0, rows.stderr
        assert int(rows.stdout.strip()) >= 8  # fetch, calibration, baseline, 2 quantize, 2 ship (+nested), report
        assert (run / tiny_model.name / "artifacts" / "gptq-w8-g32-gptq" / "manifest.json").is_file()
    finally:
        server.stop()
        pg.stop()

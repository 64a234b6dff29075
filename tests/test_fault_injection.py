"""A whole run killed (SIGKILL) at 20 points over its task boundaries and inside the writers: after each kill a
re-run completes, work that had finished is not redone, no partial directory survives, and the final artifacts
are byte-identical to those of an uninterrupted run.

The kill points are ``turboquant.faults.point`` calls (``TURBOQUANT_FAULT=<point>[:<n>]``): the process kills
itself there, exactly as an OOM killer or a lost machine would. One ``prefect server start`` serves every run (an
embedded server per run would triple the time), and each kill point runs in its own run directory, so that the
task cache of one pair never serves another.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import HELDOUT

pytestmark = pytest.mark.slow

#: (kill point, whether quantization had certainly finished when the process died).
KILL_POINTS = [
    ("task.fetch.start", False),
    ("task.baseline.start", False),
    ("task.baseline.end", False),
    ("task.quantize.start", False),
    ("quantize.shard_written:1", False),
    ("quantize.shard_written:3", False),
    ("quantize.before_metadata", False),
    ("atomic.before_rename:1", False),
    ("task.quantize.end", False),
    ("task.export.start:1", True),
    ("export.shard_written:2", True),
    ("gguf.header_written", True),
    ("gguf.shard_written:2", True),
    ("export.before_manifest:2", True),
    ("atomic.before_rename:3", True),
    ("atomic.renamed:3", True),
    ("task.export.end:2", True),
    ("task.validate.start:1", True),
    ("task.validate.end:2", True),
    ("task.report.start", True),
]
LABELS = ("rtn-w8-g32-compressed-tensors", "rtn-w8-g32-gguf-Q8_0")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from prefect_server import PrefectServer

    home = tmp_path_factory.mktemp("prefect-faults")
    s = PrefectServer(home)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def params(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fault-plan") / "params.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"id": str(tiny_model)}],
        "evaluation": {"text": str(HELDOUT), "ctx": 32, "max_tokens": 128, "speed": False},
        "quantize": [{"method": "rtn", "options": {"bits": 8, "group_size": 32},
                      "formats": ["compressed-tensors", {"format": "gguf", "gguf_type": "Q8_0"}]}],
    }))
    return path


def _run(server, params: Path, run_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**server.env, "OMP_NUM_THREADS": "1", "TURBOQUANT_FAULT": fault or ""}
    return subprocess.run([sys.executable, "-m", "turboquant.cli", "run", str(params), "--run-dir", str(run_dir),
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=300,
                          cwd=params.parent)


def _artifacts(model_dir: Path) -> dict[str, str]:
    """sha256 of every file of the final artifacts (and of the canonical checkpoint they came from)."""
    out = {}
    for sub in ("artifacts", "quantized"):
        for p in sorted((model_dir / sub).rglob("*")):
            if p.is_file():
                out[p.relative_to(model_dir).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _partials(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def reference(server, params, tiny_model, tmp_path_factory) -> dict[str, str]:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    res = _run(server, params, run_dir)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    files = _artifacts(run_dir / tiny_model.name)
    assert {f"artifacts/{label}/manifest.json" for label in LABELS} <= set(files)
    return files


@pytest.mark.parametrize("point,quantized_before", KILL_POINTS, ids=[p for p, _ in KILL_POINTS])
def test_killed_run_resumes_to_identical_artifacts(server, params, tiny_model, reference, tmp_path, point,
                                                   quantized_before):
    run_dir = tmp_path / "run"
    model_dir = run_dir / tiny_model.name
    killed = _run(server, params, run_dir, fault=point)
    assert killed.returncode == -9, f"{point} was not reached: {killed.returncode}\n{killed.stderr[-2000:]}"
    stamp = None
    meta = model_dir / "quantized" / "rtn-w8-g32" / "turboquant.json"
    if quantized_before:
        assert meta.is_file(), f"quantization had not finished before {point}"
        stamp = meta.stat().st_mtime_ns
    finished_exports = {label: (model_dir / "artifacts" / label / "manifest.json").stat().st_mtime_ns
                        for label in LABELS if (model_dir / "artifacts" / label / "manifest.json").is_file()}
    time.sleep(0.01)  # mtimes of redone work would differ
    again = _run(server, params, run_dir)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "2 of 2 artifacts passed their gates" in again.stdout
    assert _partials(run_dir) == []
    if stamp is not None:
        assert meta.stat().st_mtime_ns == stamp, f"quantization was redone after a kill at {point}"
    if point.startswith("task.report"):
        # artifacts whose transaction (export → validate → gate → publish) had committed before the kill are served
        # from the cache. A kill inside a transaction (e.g. during validation) leaves it uncommitted: its export is
        # redone on the re-run, to the same bytes.
        for label, mtime in finished_exports.items():
            assert (model_dir / "artifacts" / label / "manifest.json").stat().st_mtime_ns == mtime, label
    assert _artifacts(model_dir) == reference

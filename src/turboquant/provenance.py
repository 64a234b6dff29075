"""Provenance facts for manifests and rebuilds: content hashes, code and library versions, the machine — and the
``dvc`` command line, which DVC-tracked inputs and outputs go through.

The engine never imports ``dvc``: ``Dvc`` runs ``python -m dvc`` (the interpreter's own DVC) as a subprocess,
with its site cache kept inside the project (``.dvc/tmp/site-cache``) and analytics off, so that no command
writes to ``/var/tmp/dvc`` or phones home.
"""

from __future__ import annotations

import hashlib
import json
import importlib.metadata
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from turboquant.errors import TurboQuantError

#: Libraries whose versions can change the bytes of an artifact (recorded in every manifest).
LIBRARIES = ("torch", "transformers", "safetensors", "numpy", "gguf", "llama_cpp_python", "compressed-tensors",
             "mlx", "mlx-lm", "onnx", "onnxruntime")
#: What a rebuild must match for a byte-identical result (a difference is reported, not refused).
BIT_EXACT_LIBRARIES = ("torch", "safetensors", "numpy", "gguf", "llama_cpp_python")
if TYPE_CHECKING:
    from turboquant.calibration import CalibrationSet

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ProvenanceError(TurboQuantError):
    """An input whose recorded version cannot be found or verified, or a DVC command that failed."""


def md5_file(path: str | Path) -> str:
    """Plain md5 of a file's bytes: what DVC records as the ``md5`` of a tracked file."""
    h = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=32)
def _content_hash(path: str, stamp: tuple) -> str:
    from turboquant.model import ModelSource

    return ModelSource(path=Path(path)).content_hash()


def model_content_hash(path: str | Path) -> str:
    """``ModelSource.content_hash`` of a local model directory, memoised on the files' sizes and mtimes (several
    exports of one run hash the model once)."""
    path = Path(path)
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.iterdir()) if p.is_file())
    return _content_hash(str(path.resolve()), stamp)


def source_record(source: dict[str, Any] | None) -> dict[str, Any] | None:
    """The model's identity: Hub repo + resolved commit sha, or a local directory + its content hash.

    A Hub snapshot's cache path is dropped (it names the user's home, not the model)."""
    if not source:
        return source
    out = {k: source.get(k) for k in ("repo_id", "revision", "commit_sha")}
    if source.get("repo_id"):
        return out
    path = Path(source.get("path") or "")
    out["path"] = relative_to_cwd(path)
    out["name"] = path.name
    out["content_sha256"] = model_content_hash(path) if path.is_dir() else None
    return out


def relative_to_cwd(path: str | Path) -> str:
    """``path`` relative to the working directory when inside it (stable across clones), else absolute."""
    p = Path(path).resolve()
    try:
        return p.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return p.as_posix()


def load_calibration(path: str | Path) -> "CalibrationSet":
    """``CalibrationSet.load`` plus the file's identity (path, md5) in its provenance, which ``quantize`` copies
    into the checkpoint and the manifest records as the calibration data's DVC md5."""
    from turboquant.calibration import CalibrationSet

    calib = CalibrationSet.load(path)
    calib.provenance = {**calib.provenance, "file": relative_to_cwd(path), "file_md5": md5_file(path)}
    return calib


def code_version() -> dict[str, Any]:
    """TurboQuant's version and the git commit (with a dirty flag) of the source it runs from."""
    import turboquant

    sha, dirty = "unknown", None
    try:
        sha = _git(["rev-parse", "HEAD"], PROJECT_ROOT)
        dirty = bool(_git(["status", "--porcelain", "--untracked-files=no"], PROJECT_ROOT))
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"turboquant_version": turboquant.__version__, "git_sha": sha, "git_dirty": dirty}


def _git(args: list[str], cwd: Path) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.strip()


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape an artifact's bytes (None when not installed)."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict[str, Any]:
    """The machine kind: OS, architecture, Python, and the accelerator torch would use."""
    import torch

    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = "mps"
    return {"system": platform.system(), "machine": platform.machine(), "python": platform.python_version(),
            "device": device}


# ---------------------------------------------------------------------------------------------------------------
# The dvc command line
# ---------------------------------------------------------------------------------------------------------------


def find_dvc_root(path: str | Path) -> Path | None:
    """The nearest directory at or above ``path`` holding a ``.dvc`` directory."""
    p = Path(path).resolve()
    for d in (p, *p.parents):
        if (d / ".dvc").is_dir():
            return d
    return None


def dvc_env(root: Path) -> dict[str, str]:
    """Environment for ``dvc``: the site cache inside the project, no analytics, no update checks."""
    env = dict(os.environ)
    env.setdefault("DVC_SITE_CACHE_DIR", str(root / ".dvc" / "tmp" / "site-cache"))
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("DVC_NO_UPDATER", "1")
    return env


@dataclass(frozen=True)
class Dvc:
    """The ``dvc`` CLI of this interpreter, run in one repository (``root``)."""

    root: Path

    @classmethod
    def at(cls, path: str | Path) -> "Dvc":
        root = find_dvc_root(path)
        if root is None:
            raise ProvenanceError(f"{path} is not inside a DVC repository",
                                  "run `git init && dvc init` in the project, or pass a path inside one")
        return cls(root)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "dvc", *args]
        res = subprocess.run(cmd, cwd=self.root, env=dvc_env(self.root), capture_output=True, text=True)
        if check and res.returncode != 0:
            last = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise ProvenanceError(f"`dvc {' '.join(args)}` failed: {last[0]}",
                                  "check the DVC remote configuration (`dvc remote list`) and the paths")
        return res

    def rel(self, path: str | Path) -> str:
        return Path(os.path.relpath(Path(path).resolve(), self.root)).as_posix()

    def is_git_ignored(self, path: str | Path) -> bool:
        res = subprocess.run(["git", "check-ignore", "-q", self.rel(path)], cwd=self.root, capture_output=True)
        return res.returncode == 0

    def track(self, path: str | Path) -> Path:
        """Put ``path`` (file or directory) under DVC (content-addressed in the cache); returns its .dvc file.

        ``dvc add`` writes ``PATH.dvc`` beside it; when that file would be git-ignored (a run directory), the
        pointer goes to ``dvc/tracked/<path with / as -->.dvc`` instead — flat, so that an ignore rule on a
        directory name (``runs/``) cannot match the pointer too — and ``dvc commit`` fills in its hash."""
        path = Path(path).resolve()
        sibling = path.with_name(path.name + ".dvc")
        if not self.is_git_ignored(sibling):
            self.run("add", "-q", self.rel(path))
            return sibling
        pointer = self.root / "dvc" / "tracked" / (self.rel(path).replace("/", "--") + ".dvc")
        if self.is_git_ignored(pointer):
            raise ProvenanceError(f"{self.rel(pointer)} would be git-ignored, so DVC refuses it",
                                  "remove the .gitignore rule that matches dvc/tracked/")
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.write_text(f"outs:\n- path: {Path(os.path.relpath(path, pointer.parent)).as_posix()}\n")
        self.run("commit", "-q", "-f", self.rel(pointer))
        return pointer

    def push(self, targets: list[str | Path], remote: str | None = None) -> None:
        self.run("push", "-q", *(["-r", remote] if remote else []), *[self.rel(t) for t in targets])

    def pull(self, targets: list[str | Path], remote: str | None = None) -> subprocess.CompletedProcess:
        return self.run("pull", *(["-r", remote] if remote else []), *[self.rel(t) for t in targets], check=False)

    def cache_object(self, md5: str) -> Path:
        """Where DVC 3 keeps the object with this md5 in the local cache."""
        return self.root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


# ---------------------------------------------------------------------------------------------------------------
# The DVC pipeline: the plan expanded into per-stage slices
# ---------------------------------------------------------------------------------------------------------------
#
# dvc.yaml's stages are ``foreach`` groups over ``dvc/plan.yaml`` (the list of stage keys and their paths, committed;
# ``turboquant stage sync`` rewrites it when entries are added or renamed). Each stage reads one slice,
# ``dvc/params/<stage>/<key>.json``, and depends on it, so editing one quantize entry of params.yaml changes only
# that entry's slices and DVC re-runs only its quantize / export / evaluate stages (and the report).

PLAN_FILE = "dvc/plan.yaml"
SLICES_DIR = "dvc/params"
PIPELINE_DIR = "pipeline"
METRICS_DIR = "metrics"
REPORTS_DIR = "reports"


def model_key(model_id: str) -> str:
    """A stage-name-safe key for a model: the last component of its id or path, [A-Za-z0-9_-] only."""
    name = Path(model_id.rstrip("/")).name or "model"
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)


def expand_pipeline(plan: Any, params_path: str = "params.yaml") -> tuple[dict[str, Any], dict[str, dict]]:
    """``(plan.yaml content, {slice path: slice})`` for a validated ``Plan`` (paths relative to the project)."""
    from turboquant.methods import get_method

    stages: dict[str, dict[str, Any]] = {k: {} for k in ("calibrate", "quantize", "export", "evaluate")}
    slices: dict[str, dict] = {}
    ev = dict(plan.evaluation)
    for m in plan.models:
        mk = model_key(m["id"])
        run = f"{PIPELINE_DIR}/{mk}"
        model_slice = f"{SLICES_DIR}/models/{mk}.json"
        slices[model_slice] = {"id": m["id"], "revision": m.get("revision")}
        model_dep = m["id"] if Path(m["id"]).expanduser().is_dir() else model_slice
        calib_out = None
        if any(get_method(q.config.method).needs_calibration for q in plan.quantize):
            calib_out = f"{run}/calibration.safetensors"
            c = plan.calibration
            sl = f"{SLICES_DIR}/calibrate/{mk}.json"
            slices[sl] = {"model": m["id"], "revision": m.get("revision"), "data": list(c.get("data") or []),
                          "n_samples": c.get("n_samples", 128), "seqlen": c.get("seqlen", 2048),
                          "seed": c.get("seed", 0), "sources_sha256": _sources_sha256(c.get("data") or []),
                          "out": calib_out}
            stages["calibrate"][mk] = {"slice": sl, "model": model_dep, "out": calib_out}
        for q in plan.quantize:
            qk, qout = f"{mk}--{q.name}", f"{run}/quantized/{q.name}"
            needs = get_method(q.config.method).needs_calibration
            sl = f"{SLICES_DIR}/quantize/{qk}.json"
            slices[sl] = {"model": m["id"], "revision": m.get("revision"), "config": json.loads(q.config.to_json()),
                          "calibration": calib_out if needs else None, "out": qout}
            stages["quantize"][qk] = {"slice": sl, "model": model_dep,
                                      "calibration": calib_out if needs else sl, "out": qout}
            for t in q.formats:
                label = f"{q.name}-{t.label}"
                ek, art = f"{qk}--{t.label}", f"{run}/artifacts/{label}"
                sl = f"{SLICES_DIR}/export/{ek}.json"
                slices[sl] = {"quantized": qout, "format": t.format, "options": dict(t.options), "out": art}
                stages["export"][ek] = {"slice": sl, "quantized": qout, "out": art}
                sl = f"{SLICES_DIR}/evaluate/{ek}.json"
                metrics = f"{METRICS_DIR}/{mk}/{label}.json"
                slices[sl] = {"artifact": art, "model": m["id"], "revision": m.get("revision"), "evaluation": ev,
                              "gates": dict(plan.gates), "baseline_cache": f"{run}/baseline-cache/baseline.safetensors",
                              "out": metrics}
                stages["evaluate"][ek] = {"slice": sl, "artifact": art, "model": model_dep,
                                          "text": ev.get("text") or sl, "out": metrics}
    slices[f"{SLICES_DIR}/report.json"] = {"runs": {model_key(m["id"]): f"{PIPELINE_DIR}/{model_key(m['id'])}"
                                                    for m in plan.models},
                                           "metrics": METRICS_DIR, "out": REPORTS_DIR}
    header = {"params": params_path}
    return {"pipeline": {**header, **stages}}, slices


def _sources_sha256(sources: list[str]) -> dict[str, str]:
    """sha256 of local calibration sources, so that a changed data file changes the calibrate slice."""
    from turboquant.fsutil import sha256_file

    return {s: sha256_file(Path(s)) for s in sources if Path(s).is_file()}

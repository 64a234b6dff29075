"""Provenance facts for manifests and rebuilds: content hashes, code and library versions, the machine."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from turboquant._version import __version__
from turboquant.io.model import ModelSource


#: Libraries whose versions can change the bytes of an artifact (recorded in every manifest).
LIBRARIES = ("torch", "transformers", "safetensors", "numpy", "gguf", "llama_cpp_python", "compressed-tensors",
             "mlx", "mlx-lm", "onnx", "onnxruntime")
#: What a rebuild must match for a byte-identical result (a difference is reported, not refused).
BIT_EXACT_LIBRARIES = ("torch", "safetensors", "numpy", "gguf", "llama_cpp_python")

PROJECT_ROOT = Path(__file__).resolve().parents[3]


def md5_file(path: str | Path) -> str:
    """Plain md5 of a file's bytes: what DVC records as the ``md5`` of a tracked file."""
    h = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=32)
def _content_hash(path: str, stamp: tuple) -> str:
    return ModelSource(path=Path(path)).content_hash()


def model_content_hash(path: str | Path) -> str:
    """``ModelSource.content_hash`` of a local model directory, memoised on the files' sizes and mtimes (several
    exports of one run hash the model once)."""
    path = Path(path)
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.iterdir()) if p.is_file())
    return _content_hash(str(path.resolve()), stamp)


def source_record(source: dict[str, Any] | None) -> dict[str, Any] | None:
    """The model's identity: Hub repo + resolved commit sha, or a local directory + its content hash.

    A Hub snapshot's cache path is dropped (it names the user's home, not the model). An encoded (FP8 / MXFP4)
    source keeps its ``source_encoding``: how it was stored and what it was dequantized to."""
    if not source:
        return source
    out = {k: source.get(k) for k in ("repo_id", "revision", "commit_sha")}
    if source.get("source_encoding"):
        out["source_encoding"] = source["source_encoding"]
    if source.get("repo_id"):
        return out
    path = Path(source.get("path") or "")
    out["path"] = relative_to_cwd(path)
    out["abs_path"] = str(path.resolve())
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


def code_version() -> dict[str, Any]:
    """TurboQuant's version and the git commit (with a dirty flag) of the source it runs from."""
    sha, dirty = "unknown", None
    try:
        sha = _git(["rev-parse", "HEAD"], PROJECT_ROOT)
        dirty = bool(_git(["status", "--porcelain", "--untracked-files=no"], PROJECT_ROOT))
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"turboquant_version": __version__, "git_sha": sha, "git_dirty": dirty}


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



"""``manifest.json``: what an artifact is, where it came from and the sha256 of every file in it.

Written last into every exported artifact (and checked by publish / reproduce), so that a file changed after
export is caught by name. Besides the files it records everything ``turboquant reproduce`` needs to rebuild the
artifact and to judge whether the rebuild can be byte-identical: the source model (Hub repo + commit sha, or a
local directory's content hash), the calibration recipe and the DVC md5 of the calibration file, the method
config and scheme, the format and its options, the seed, TurboQuant's version and git commit, the versions of the
libraries that shape the bytes, and the machine kind. Paths are relative to the working directory where they can
be, and nothing secret (tokens) is ever read into it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from turboquant._version import __version__
from turboquant.errors import DataError, ModelLoadError
from turboquant.fsutil import sha256_file
from turboquant.io.checkpoint import QuantizedCheckpoint
from turboquant.io.provenance import code_version, library_versions, machine, source_record

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 2


def file_hashes(root: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {sha256, size}}`` of every file under ``root`` except the manifest, sorted."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != MANIFEST_FILE:
            out[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return out


def _plain(v: Any) -> Any:
    return str(v) if isinstance(v, Path) else v


def calibration_record(calibration: dict[str, Any] | None) -> dict[str, Any] | None:
    """The checkpoint's calibration provenance with ``dvc_md5`` (the calibration file's md5, as DVC records it)
    always present: set when the set was loaded with ``provenance.load_calibration``, else None."""
    if not calibration:
        return calibration
    return {**calibration, "dvc_md5": calibration.get("file_md5")}


def build_manifest(root: Path, ckpt: QuantizedCheckpoint, fmt: str, options: dict[str, Any],
                   details: dict[str, Any] | None = None) -> dict[str, Any]:

    meta = ckpt.meta
    schemes = sorted({json.dumps(info["scheme"], sort_keys=True) for info in ckpt.modules.values()})
    calibration = calibration_record(meta.get("calibration"))
    return {
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "format_options": {k: _plain(v) for k, v in sorted(options.items())},
        "format_details": {k: _plain(v) for k, v in sorted((details or {}).items())},
        "source": source_record(meta.get("source")),
        "method": meta.get("method"),
        "method_config": meta.get("config"),
        "scheme": meta.get("scheme"),
        "schemes": [json.loads(s) for s in schemes],
        "mixed_precision": _mixed_summary(meta.get("mixed_precision")),
        "fallbacks": list(meta.get("fallbacks") or []),
        "experts": meta.get("experts"),
        "calibration": calibration,
        "seed": ((calibration or {}).get("recipe") or {}).get("seed"),
        "quantized_checkpoint": {"turboquant_version": meta.get("turboquant_version"),
                                 "torch_version": meta.get("torch_version"),
                                 "device": meta.get("device", "cpu")},
        "turboquant_version": __version__,
        "torch_version": torch.__version__,
        "code": code_version(),
        "libraries": library_versions(),
        "machine": machine(),
        "files": file_hashes(root),
    }


def _mixed_summary(mixed: dict[str, Any] | None) -> dict[str, Any] | None:
    """The per-layer allocation's outcome (achieved bits per weight, layers per width), not its sensitivity table."""
    if not mixed:
        return None
    return {k: mixed[k] for k in ("target_bpw", "bits_per_weight", "layers_per_bits") if k in mixed}


def write_manifest(root: Path, ckpt: QuantizedCheckpoint, fmt: str, options: dict[str, Any],
                   details: dict[str, Any] | None = None) -> Path:
    path = Path(root) / MANIFEST_FILE
    manifest = build_manifest(Path(root), ckpt, fmt, options, details)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return path


def find_manifest(artifact: str | Path) -> dict[str, Any] | None:
    """The manifest of an artifact directory, or None when it has none (canonical checkpoints, bitsandbytes)."""
    path = Path(artifact) / MANIFEST_FILE
    return read_manifest(path) if path.is_file() else None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """An artifact's ``manifest.json`` (the file, or the artifact directory holding it) — the one reader, used by
    validation, publishing and reproduction; a missing, unreadable or incomplete manifest is one ``DataError``."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist", "pass an artifact's manifest.json (dvc pull it first)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e})", "restore the manifest from git / DVC") from None
    for key in ("format", "method_config", "files"):
        if not isinstance(data, dict) or key not in data:
            raise DataError(f"{path} has no '{key}'", "use artifacts written by `turboquant export`")
    return data


def verify_files(root: Path) -> dict[str, str]:
    """Per-file verdict against the manifest: ``ok``, ``modified``, ``missing`` or ``unlisted``."""
    root = Path(root)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ModelLoadError(f"{root} has no {MANIFEST_FILE}", "export the artifact with `turboquant export`")
    listed = read_manifest(path)["files"]
    present = file_hashes(root)
    verdict = {}
    for name, info in listed.items():
        if name not in present:
            verdict[name] = "missing"
        else:
            verdict[name] = "ok" if present[name]["sha256"] == info["sha256"] else "modified"
    for name in present.keys() - listed.keys():
        verdict[name] = "unlisted"
    return dict(sorted(verdict.items()))

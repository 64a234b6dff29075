"""Rebuild an artifact from its ``manifest.json`` and compare the rebuild, file by file, with what was recorded.

``turboquant reproduce MANIFEST`` fetches the exact model (a Hub repo at the recorded commit sha; a local directory
only if its content hash matches), gets the calibration file at the recorded DVC md5 (the file on disk, else
``dvc pull``, else DVC's local cache — all through the ``dvc`` command line, never an import), re-runs quantize
with the recorded method config and export with the recorded format options into a fresh directory, and compares
sha256s. On CPU with the recorded library versions every method and native writer is deterministic, so the
verdict is ``identical`` for every file; where a library version or the device differs the report says the rebuild
may not be bit-exact, and for differing weight files it reports the largest absolute difference of the
(dequantized) tensors instead of a bare "different".
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from turboquant.device import resolve_device
from turboquant.errors import ConfigError, DataError, ModelLoadError, ProvenanceError
from turboquant.formats import export
from turboquant.fsutil import sha256_file
from turboquant.io.calibration import build_calibration, CalibrationRecipe, load_calibration
from turboquant.io.hub import fetch_snapshot
from turboquant.io.manifest import MANIFEST_FILE, read_manifest, verify_files
from turboquant.io.provenance import BIT_EXACT_LIBRARIES, library_versions, machine, md5_file, model_content_hash
from turboquant.methods.base import make_config
from turboquant.quantize.pipeline import quantize
from turboquant.release.dvc import Dvc, find_dvc_root


@dataclass
class FileVerdict:
    """One recorded file: ``identical``, ``DIFFERENT`` (with the numeric difference when computable) or
    ``missing`` in the rebuild; ``on_disk`` says whether the artifact's own copy still matches the manifest."""

    name: str
    verdict: str
    detail: str = ""
    on_disk: str | None = None

    @property
    def ok(self) -> bool:
        return self.verdict == "identical" and self.on_disk in (None, "ok")

    def line(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        disk = f"; artifact copy {self.on_disk}" if self.on_disk not in (None, "ok") else ""
        return f"{self.verdict:10s} {self.name}{extra}{disk}"


@dataclass
class Reproduction:
    """The per-file verdicts of one rebuild, and why it may legitimately differ (versions, device)."""

    manifest: Path
    rebuilt: Path
    files: list[FileVerdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Files of the artifact itself that no longer match its manifest: ``modified``, ``missing`` or ``unlisted``.
    tampered: dict[str, str] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return bool(self.files) and all(f.ok for f in self.files) and not self.tampered


def project_root(manifest_path: Path) -> Path:
    """Where the manifest's relative paths start: the DVC repository holding it, else the working directory."""
    return find_dvc_root(manifest_path) or Path.cwd()


def recorded_paths(rel: str | None, absolute: str | None, root: Path, manifest_dir: Path) -> list[Path]:
    """Where a recorded input may be now, most likely first: relative to the project root (the DVC repository,
    else the working directory), at its recorded absolute path, or relative to a folder above the manifest (a run
    reproduced from another working directory). The caller checks each against its recorded hash."""
    out: list[Path] = []
    if rel:
        out.append(Path(rel) if Path(rel).is_absolute() else root / rel)
    if absolute:
        out.append(Path(absolute))
    if rel and not Path(rel).is_absolute():
        out += [a / rel for a in manifest_dir.resolve().parents]
    return list(dict.fromkeys(out))


def recorded_model(manifest: dict[str, Any], root: Path, override: Path | None = None,
                   manifest_dir: Path | None = None) -> Path:
    """The model the artifact was made from: the Hub repo at its recorded commit, or a local directory whose
    content hash matches the recorded one."""
    source = manifest.get("source") or {}
    if source.get("repo_id") and override is None:
        sha = source.get("commit_sha")
        path, got = fetch_snapshot(source["repo_id"], sha)
        if sha and got != sha:
            raise ModelLoadError(f"the Hub returned commit {got} of {source['repo_id']}, not the recorded {sha}",
                                 "check HF_ENDPOINT / the local cache")
        return path
    want = source.get("content_sha256")
    if override is not None:
        candidates = [override]
    else:
        candidates = recorded_paths(source.get("path"), source.get("abs_path"), root, manifest_dir or root)
    found = [p for p in candidates if p.is_dir()]
    if not found:
        raise ModelLoadError(f"the source model {source.get('path')} is not there",
                             "restore it at that path or pass --model DIR holding the same files")
    for path in found:
        if not want or model_content_hash(path) == want:
            return path
    raise ModelLoadError(f"the model at {found[0]} does not match the manifest (content sha256 {want[:12]}…)",
                         "restore the exact model files the artifact was made from")


def recorded_calibration(manifest: dict[str, Any], root: Path, pull: bool = True, model_dir: Path | None = None,
                         manifest_dir: Path | None = None):
    """The calibration set the artifact was made with (None for calibration-free methods): the recorded file at
    its DVC md5 (on disk, ``dvc pull``, or DVC's cache), or — for a set built on the fly (``--data``) — rebuilt
    from its recipe once every source file's sha256 and the tokenizer's match what was recorded."""
    calib = manifest.get("calibration")
    if not calib:
        return None
    manifest_dir = manifest_dir or root
    if not calib.get("file"):
        return _rebuilt_calibration(calib, root, manifest_dir, model_dir)
    md5, rel = calib.get("dvc_md5"), calib["file"]
    candidates = recorded_paths(rel, calib.get("file_abs"), root, manifest_dir)
    path = next((p for p in candidates if p.is_file() and md5_file(p) == md5), None)
    if path is None and pull and find_dvc_root(candidates[0]):
        Dvc.at(candidates[0]).pull([candidates[0]])
        path = candidates[0] if candidates[0].is_file() and md5_file(candidates[0]) == md5 else None
    if path is None:
        dvc_root = find_dvc_root(candidates[0]) or find_dvc_root(root)
        cached = Dvc(dvc_root).cache_object(md5) if dvc_root else None
        if cached is None or not cached.is_file():
            raise ProvenanceError(f"calibration {rel} at md5 {md5} is neither on disk, in the DVC remote nor cache",
                                  f"check out the commit that made the artifact ({(manifest.get('code') or {}).get('git_sha')}) and `dvc pull`")
        path = cached
    loaded = load_calibration(path)
    loaded.provenance["file"] = rel  # where it lives in the project, whichever copy was read
    return loaded


def _rebuilt_calibration(calib: dict[str, Any], root: Path, manifest_dir: Path, model_dir: Path | None):
    """The calibration set of an artifact quantized with ``--data``: the same recipe on the same bytes."""
    recipe = calib.get("recipe")
    if not recipe or model_dir is None:
        raise DataError("the manifest records neither a calibration file nor a recipe to rebuild it from",
                        "re-make the artifact with `turboquant calibrate` + `--calib`, or through the flow / DVC")
    want = calib.get("sources_sha256") or {}
    resolved = []
    for src in recipe["sources"]:
        if want.get(src) == "hub-dataset":
            resolved.append(src)
            continue
        found = next((p for p in recorded_paths(src, (calib.get("sources_abs") or {}).get(src), root, manifest_dir)
                      if p.is_file() and sha256_file(p) == want.get(src)), None)
        if found is None:
            raise ProvenanceError(f"calibration source {src} with sha256 {str(want.get(src))[:12]}… is not on disk",
                                  "restore the exact source file (or run reproduce from the directory the artifact "
                                  "was made in)")
        resolved.append(str(found))
    original = CalibrationRecipe.from_dict(recipe)
    rebuilt = build_calibration(CalibrationRecipe(**{**original.to_dict(), "sources": tuple(resolved)}), model_dir)
    if calib.get("tokenizer_sha256") and rebuilt.provenance["tokenizer_sha256"] != calib["tokenizer_sha256"]:
        raise ProvenanceError("the model's tokenizer differs from the one the calibration set was built with",
                              "reproduce with the exact source model")
    rebuilt.recipe = original
    rebuilt.provenance = {k: v for k, v in calib.items() if k not in ("recipe", "sequential", "dvc_md5")}
    return rebuilt


def version_notes(manifest: dict[str, Any]) -> list[str]:
    """Why this rebuild may not be bit-exact: library versions or the device that differ from the recorded ones."""
    notes = []
    recorded, now = manifest.get("libraries") or {}, library_versions()
    for lib in BIT_EXACT_LIBRARIES:
        if lib in recorded and recorded[lib] != now.get(lib):
            notes.append(f"{lib} {recorded[lib]} was recorded, {now.get(lib)} is installed")
    was, here = (manifest.get("machine") or {}).get("device"), machine()["device"]
    if was and was != here:
        notes.append(f"the artifact was made on {was}, this rebuild runs on {here}")
    return notes


def rebuild_device(manifest: dict[str, Any]) -> str:
    """The device kind the artifact was quantized on (``cpu`` for manifests that predate the record), when this
    machine has one; else the CPU (``notes`` says the bytes may then differ)."""
    recorded = str((manifest.get("quantized_checkpoint") or {}).get("device") or "cpu").split(" ")[0]
    try:
        return str(resolve_device(recorded))
    except ConfigError:
        return "cpu"


def rebuild(manifest: dict[str, Any], model_dir: Path, calib, work: Path) -> Path:
    """Re-run the recorded quantize and export steps into ``work``; returns the rebuilt artifact directory."""

    cfg = dict(manifest["method_config"])
    config = make_config(cfg.pop("method", manifest.get("method")), **cfg)
    sequential = bool((manifest.get("calibration") or {}).get("sequential", True))
    qdir = quantize(model_dir, config, work / "quantized", calib=calib, sequential=sequential, progress=False,
                    overwrite=True, device=rebuild_device(manifest))
    options = {k: v for k, v in (manifest.get("format_options") or {}).items()}
    return export(qdir, manifest["format"], work / "artifact", overwrite=True, **options)


def compare(manifest: dict[str, Any], rebuilt: Path, original: Path | None) -> list[FileVerdict]:
    """Per recorded file: the rebuild's sha256 against the manifest's, and the artifact's own copy too."""
    out = []
    for name, info in sorted(manifest["files"].items()):
        mine, theirs = rebuilt / name, (original / name if original else None)
        on_disk = None
        if theirs is not None and original.is_dir():
            on_disk = "missing" if not theirs.is_file() else (
                "ok" if sha256_file(theirs) == info["sha256"] else "modified")
        if not mine.is_file():
            out.append(FileVerdict(name, "missing", "not produced by the rebuild", on_disk))
        elif sha256_file(mine) == info["sha256"]:
            out.append(FileVerdict(name, "identical", "", on_disk))
        else:
            ref = theirs if on_disk == "ok" else None
            out.append(FileVerdict(name, "DIFFERENT", numeric_difference(mine, ref), on_disk))
    return out


def tampered_files(manifest_path: Path) -> dict[str, str]:
    """Files of the artifact beside ``manifest_path`` that do not match it (changed, removed or added since
    export); empty when the manifest is not an artifact's own ``manifest.json``."""

    if manifest_path.name != MANIFEST_FILE:
        return {}
    return {name: state for name, state in verify_files(manifest_path.parent).items() if state != "ok"}


def numeric_difference(mine: Path, ref: Path | None) -> str:
    """The largest absolute difference of the (dequantized) tensors of two weight files, when computable."""
    if ref is None:
        return "sha256 differs; no matching copy of the original to compare numbers with"
    try:
        if mine.suffix == ".safetensors":
            return _diff_tensors(_safetensors(mine), _safetensors(ref))
        if mine.suffix == ".gguf":
            return _diff_tensors(_gguf(mine), _gguf(ref))
    except Exception as e:  # noqa: BLE001 - a report line, not a failure
        return f"sha256 differs; tensors not comparable ({type(e).__name__})"
    return "sha256 differs"


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _gguf(path: Path) -> dict[str, torch.Tensor]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32"))
            for t in reader.tensors}


def _diff_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    if a.keys() != b.keys():
        return f"tensor names differ ({len(a.keys() ^ b.keys())} not in both)"
    worst, where, codes = 0.0, "", 0
    for name in sorted(a):
        x, y = a[name], b[name]
        if x.shape != y.shape:
            return f"{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if x.is_floating_point():
            d = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
            if d > worst:
                worst, where = d, name
        else:
            codes += int((x != y).sum())
    return f"max abs difference {worst:.3g}" + (f" in {where}" if where else "") + \
        (f"; {codes} packed/integer elements differ" if codes else "")


def reproduce(manifest_path: str | Path, out: Path | None = None, model: Path | None = None,
              pull: bool = True) -> Reproduction:
    """Rebuild the artifact of ``manifest_path`` (into ``out``, else a temporary directory that is removed)."""
    manifest_path = Path(manifest_path)
    if manifest_path.is_dir():
        manifest_path = manifest_path / MANIFEST_FILE
    manifest = read_manifest(manifest_path)
    root = project_root(manifest_path.resolve())
    model_dir = recorded_model(manifest, root, model, manifest_path.parent)
    calib = recorded_calibration(manifest, root, pull, model_dir, manifest_path.parent)
    work = Path(out) if out else Path(tempfile.mkdtemp(prefix="tq-reproduce-"))
    try:
        rebuilt = rebuild(manifest, model_dir, calib, work)
        result = Reproduction(manifest_path, rebuilt, compare(manifest, rebuilt, manifest_path.parent),
                              version_notes(manifest), tampered_files(manifest_path))
    finally:
        if out is None:
            shutil.rmtree(work, ignore_errors=True)
    return result

"""The DVC pipeline: the plan expanded into per-stage slices that ``dvc.yaml``'s stages read.

dvc.yaml's stages are ``foreach`` groups over ``dvc/plan.yaml`` (the list of stage keys and their paths, committed;
``turboquant stage sync`` rewrites it when entries are added or renamed). Each stage reads one slice,
``dvc/params/<stage>/<key>.json``, and depends on it, so editing one quantize entry of params.yaml changes only
that entry's slices and DVC re-runs only its quantize / export / evaluate stages (and the report).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from turboquant.errors import ConfigError
from turboquant.fsutil import sha256_file
from turboquant.methods.base import get_method
from turboquant.quality.report import find_validations, write_report

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

    stages: dict[str, dict[str, Any]] = {k: {} for k in ("calibrate", "quantize", "export", "evaluate")}
    slices: dict[str, dict] = {}
    ev = plan.evaluation.to_dict()
    for m in plan.models:
        mk = model_key(m.id)
        run = f"{PIPELINE_DIR}/{mk}"
        model_slice = f"{SLICES_DIR}/models/{mk}.json"
        slices[model_slice] = {"id": m.id, "revision": m.revision}
        model_dep = m.id if m.local_dir else model_slice
        calib_out = None
        if any(get_method(q.config.method).needs_calibration for q in plan.quantize):
            calib_out = f"{run}/calibration.safetensors"
            c = plan.calibration
            sl = f"{SLICES_DIR}/calibrate/{mk}.json"
            slices[sl] = {"model": m.id, "revision": m.revision, "data": list(c.data), "n_samples": c.n_samples,
                          "seqlen": c.seqlen, "seed": c.seed, "sources_sha256": _sources_sha256(list(c.data)),
                          "out": calib_out}
            stages["calibrate"][mk] = {"slice": sl, "model": model_dep, "out": calib_out}
        for q in plan.quantize:
            qk, qout = f"{mk}--{q.name}", f"{run}/quantized/{q.name}"
            needs = get_method(q.config.method).needs_calibration
            sl = f"{SLICES_DIR}/quantize/{qk}.json"
            slices[sl] = {"model": m.id, "revision": m.revision, "config": json.loads(q.config.to_json()),
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
                slices[sl] = {"artifact": art, "model": m.id, "revision": m.revision, "evaluation": ev,
                              "gates": dict(plan.gates), "baseline_cache": f"{run}/baseline-cache/baseline.safetensors",
                              "out": metrics}
                stages["evaluate"][ek] = {"slice": sl, "artifact": art, "model": model_dep,
                                          "text": plan.evaluation.text or sl, "out": metrics}
    slices[f"{SLICES_DIR}/report.json"] = {"runs": {model_key(m.id): f"{PIPELINE_DIR}/{model_key(m.id)}"
                                                    for m in plan.models},
                                           "metrics": METRICS_DIR, "out": REPORTS_DIR}
    header = {"params": params_path}
    return {"pipeline": {**header, **stages}}, slices


def _sources_sha256(sources: list[str]) -> dict[str, str]:
    """sha256 of local calibration sources, so that a changed data file changes the calibrate slice."""

    return {s: sha256_file(Path(s)) for s in sources if Path(s).is_file()}


def sync_stages(plan: Any, params_path: str = "params.yaml") -> tuple[int, str | None]:
    """Write ``dvc/plan.yaml`` and one slice per stage for ``plan`` (relative to the working directory, the DVC
    project). Returns the number of slices and whether the stage list was ``"created"``, ``"changed"`` or None."""
    plan_data, slices = expand_pipeline(plan, params_path)
    shutil.rmtree(SLICES_DIR, ignore_errors=True)
    for rel, data in slices.items():
        Path(rel).parent.mkdir(parents=True, exist_ok=True)
        Path(rel).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    text = ("# Generated by `turboquant stage sync` from the plan: the stage keys dvc.yaml iterates. Commit it.\n"
            + yaml.safe_dump(plan_data, sort_keys=True))
    old = Path(PLAN_FILE).read_text() if Path(PLAN_FILE).is_file() else None
    if old == text:
        return len(slices), None
    Path(PLAN_FILE).parent.mkdir(parents=True, exist_ok=True)
    Path(PLAN_FILE).write_text(text)
    return len(slices), "created" if old is None else "changed"


def read_slice(stage: str, key: str) -> dict[str, Any]:
    """The slice of the plan one DVC stage runs with (``dvc/params/<stage>/<key>.json``)."""
    path = Path(SLICES_DIR) / stage / f"{key}.json"
    if not path.is_file():
        raise ConfigError(f"no {stage} stage '{key}' ({path} is missing)", "run `turboquant stage sync params.yaml`")
    return json.loads(path.read_text())


def write_report_stage(s: dict[str, Any]) -> tuple[Path, int]:
    """The report stage: per model the run report, and ``quality.json`` (one record per validated artifact) that
    ``dvc plots show`` draws. Returns that file and its number of records."""
    records = []
    for mk in sorted(s["runs"]):
        metrics_dir = Path(s["metrics"]) / mk
        if not metrics_dir.is_dir():
            continue
        write_report(metrics_dir, Path(s["out"]) / "models" / mk)
        for v in find_validations(metrics_dir):
            records.append({"model": mk, "artifact": Path(v["artifact"]).name, "format": v.get("format"),
                            "bits_per_weight": v.get("bits_per_weight"), "ppl": v.get("ppl"), "kl": v.get("kl"),
                            "top1": v.get("top1"), "passed": v["verdict"]["passed"]})
    out = Path(s["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
    return out / "quality.json", len(records)

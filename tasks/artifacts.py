"""Export one artifact, validate it in its runtime, report the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from tasks.progress import STEP_HOOKS
from turboquant import faults
from turboquant.quality.evaluate import BaselineLogits
from turboquant.io.loaders import load_model, load_tokenizer, read_text, tokenize
from turboquant.formats import export
from turboquant.pipeline.plan import EvaluationSection
from turboquant.quality.gates import Gates
from turboquant.quality.report import write_report
from turboquant.quality.validate import recorded_bits, validate, write_validation


@task(name="export", cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def export_artifact(qdir: str, fmt: str, options: dict, out: str) -> str:
    """Path of the exported artifact (written atomically, ``manifest.json`` last)."""
    faults.point("task.export.start")
    path = str(export(qdir, fmt, out, overwrite=True, **options))
    faults.point("task.export.end")
    return path


@export_artifact.on_rollback
def _remove_artifact(txn) -> None:
    """A rolled-back artifact (failed gate, failed publish) leaves nothing that could be published later."""
    path = txn.get("artifact", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


@task(name="baseline", cache_policy=INPUTS + TASK_SOURCE, persist_result=True, **STEP_HOOKS)
def compute_baseline(model_dir: str, text: str, ctx: int, max_tokens: int | None, out: str) -> str:
    """The baseline's distributions on the evaluation windows, computed once per model and cached on disk."""
    faults.point("task.baseline.start")
    ids = tokenize(load_tokenizer(model_dir), read_text(text))
    if max_tokens:
        ids = ids[:max_tokens]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    BaselineLogits.compute(load_model(model_dir), ids, ctx).save(out)
    faults.point("task.baseline.end")
    return out


@task(name="validate", cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def validate_artifact(artifact: str, model_dir: str, evaluation: dict, gates: dict, baseline: str, out: str) -> dict:
    """Metrics and verdict (also written to ``out``); the verdict's ``passed`` decides publishing."""
    faults.point("task.validate.start")
    g = Gates.for_bits(recorded_bits(Path(artifact)) or 16, **gates)
    ev = EvaluationSection.from_dict(evaluation)
    metrics = validate(artifact, model_dir, ev.text, ctx=ev.ctx, max_tokens=ev.max_tokens, tasks=tuple(ev.tasks or ()),
                       task_limit=ev.task_limit, gates=g, baseline_cache=baseline, speed=ev.speed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_validation(metrics, out)
    faults.point("task.validate.end")
    return {"artifact": artifact, "passed": metrics["verdict"]["passed"], "reasons": metrics["verdict"]["reasons"],
            "validation": out}


@task(name="report", **STEP_HOOKS)
def report_run(run_dir: str) -> str:
    """Write the run report and attach it to the flow run as a Markdown artifact."""
    faults.point("task.report.start")
    md = write_report(run_dir)
    create_markdown_artifact(md.read_text(), key="quantization-report", description=f"report of {run_dir}")
    faults.point("task.report.end")
    return str(md)


def verdict_summary(results: list[dict]) -> str:
    return json.dumps({r["artifact"]: r["passed"] for r in results}, indent=2)

"""One plan, one run: fetch → calibrate → baseline → quantize (each method × scheme in parallel) → export (each
format) → validate (each artifact in its runtime, gated) → report.

The plan is validated before any task runs (``turboquant.plan``), so an impossible combination never starts a
quantization. Tasks pass paths; their results are cached by their inputs and source, so re-running an unchanged
plan redoes nothing. Publishing approved artifacts joins this flow with the Hub issue.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.futures import wait

from tasks.artifacts import compute_baseline, export_artifact, report_run, validate_artifact
from tasks.calibration import build_calibration_set
from tasks.model import fetch_model
from tasks.quantization import quantize_checkpoint
from turboquant.methods import get_method
from turboquant.plan import Plan


@flow(name="quantize_model", log_prints=True)
def quantize_model(params: str = "params.yaml", run_dir: str = "runs/latest") -> list[dict]:
    plan = Plan.from_yaml(params)
    run = Path(run_dir).resolve()
    evaluation = plan.evaluation
    verdicts = []
    for m in plan.models:
        source = fetch_model(m["id"], m.get("revision"))
        model_dir = source["path"]
        for q, label, err in plan.check_formats(Path(model_dir)):
            if err is not None:
                raise err
        name = Path(model_dir).name
        calib = None
        if any(get_method(q.config.method).needs_calibration for q in plan.quantize):
            calib = build_calibration_set.submit(model_dir, plan.calibration, str(run / name / "calibration.safetensors"))
        baseline = compute_baseline.submit(model_dir, evaluation["text"], evaluation.get("ctx", 512),
                                           evaluation.get("max_tokens"), str(run / name / "baseline.safetensors"))
        quantized = {
            q.name: quantize_checkpoint.submit(model_dir, q.config.to_json(),
                                               calib if get_method(q.config.method).needs_calibration else None,
                                               str(run / name / "quantized" / q.name))
            for q in plan.quantize
        }
        checks = {}
        for q in plan.quantize:
            for target in q.formats:
                label = f"{q.name}-{target.label}"
                art = export_artifact.submit(quantized[q.name], target.format, target.options,
                                             str(run / name / "artifacts" / label))
                checks[label] = validate_artifact.submit(art, model_dir, evaluation, plan.gates, baseline,
                                                         str(run / name / "eval" / f"{label}.json"))
        wait(list(checks.values()))
        verdicts += [_verdict(run / name / "artifacts" / label, c) for label, c in checks.items()]
        if any(v.get("validation") for v in verdicts):
            report_run(str(run / name))
    for v in verdicts:
        print(f"{'PASS' if v['passed'] else 'FAIL'} {v['artifact']}" + (f": {'; '.join(v['reasons'])}" if v['reasons'] else ""))
    return verdicts


def _verdict(artifact: Path, future) -> dict:
    """The validation result, or — when its export or validation failed — a failed verdict saying why: one
    artifact's failure blocks that artifact and nothing else."""
    state = future.state
    if state.is_completed():
        return future.result()
    try:
        future.result()
        reason = state.message or state.name
    except Exception as e:  # noqa: BLE001 - the task's own error, reported as this artifact's verdict
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return {"artifact": str(artifact), "passed": False, "reasons": [f"not produced: {reason}"], "error": True}

"""One plan, one run: fetch → calibrate → baseline → quantize (each method × scheme in parallel, on the pool that
suits it) → per artifact, in one transaction: export → validate in its runtime → gate → publish → report →
record the calibration set and the approved artifacts in DVC (when the run directory is inside a DVC repo).

The plan is validated before any task runs (``pipeline.plan``), so an impossible combination never starts a
quantization. Tasks pass paths; their results are cached by their inputs and source, so re-running an unchanged
plan redoes nothing. An artifact whose gate fails (or whose publish fails) is rolled back: its directory is
removed, its verdict stays in ``eval/`` and the report, and nothing else is affected.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import flow, task
from prefect.context import get_run_context
from prefect.futures import wait
from prefect.transactions import transaction

from tasks.artifacts import compute_baseline, export_artifact, report_run, validate_artifact
from tasks.calibration import build_calibration_set
from tasks.model import fetch_model
from tasks.placement import quantize_on_pool
from tasks.progress import STEP_HOOKS
from tasks.provenance import track_outputs
from tasks.publish import publish_artifact
from tasks.quantization import quantize_checkpoint
from tasks.storage import receive_dir, share_file
from turboquant.io.storage import storage_url
from turboquant.methods import get_method
from turboquant.pipeline.placement import place_method
from turboquant.pipeline.plan import ModelEntry, Plan, PublishSection
from turboquant.release.keys import plan_digest, release_artifact_key, release_key
from turboquant.release.publish import repo_name_for


class GateFailed(Exception):
    """An artifact's validation did not pass its gates: its transaction rolls back."""


@flow(name="quantize_model", log_prints=True)
def quantize_model(params: str = "params.yaml", run_dir: str = "runs/latest", placement: str = "auto",
                   models: list[dict] | None = None) -> list[dict]:
    """Verdicts of every planned artifact. ``placement``: ``local`` (in-process), ``pools`` (each quantization
    as a run of the ``quantize_method`` deployment on its pool), ``auto`` (pools when this run is a deployment's).
    ``models`` replaces the plan's models (the nightly job passes the release it found)."""
    plan = Plan.from_yaml(params)
    if models is not None:
        plan = dataclasses.replace(plan, models=tuple(ModelEntry.from_dict(m) for m in models))
    run = Path(run_dir).resolve()
    on_pools = placement == "pools" or (placement == "auto" and _is_deployment_run())
    plan_sha = plan_digest(params)
    verdicts = []
    for m in plan.models:
        source = fetch_model(m.id, m.revision)
        model_dir, name = source["path"], _model_name(m.id, source["path"])
        plan.require_formats(Path(model_dir), m.id)
        out = run / name
        calib = None
        if any(get_method(q.config.method).needs_calibration for q in plan.quantize):
            calib = build_calibration_set.submit(model_dir, plan.calibration.to_dict(), str(out / "calibration.safetensors"))
        baseline = compute_baseline.submit(model_dir, plan.evaluation.text, plan.evaluation.ctx,
                                           plan.evaluation.max_tokens, str(out / "baseline.safetensors"))
        release = release_key(source["sha"], plan_sha)
        store = storage_url() if on_pools else None
        shared_calib = share_file.submit(calib, store, f"{name}/{release}/calibration") if store and calib else None
        quantized, made = {}, {}
        for q in plan.quantize:
            calibrated = get_method(q.config.method).needs_calibration
            local = str(out / "quantized" / q.name)
            if store:  # the worker shares no directory with us: the model by id, the rest by URL
                deployment = place_method(q.config.method, device=q.device).deployment
                stored = quantize_on_pool.submit(deployment, m.id, q.config.to_json(),
                                                 shared_calib if calibrated else None,
                                                 f"{name}/{release}/quantized/{q.name}", device=q.device,
                                                 storage=store, revision=source.get("commit_sha") or m.revision)
                quantized[q.name] = receive_dir.submit(stored, local)
                made[q.name] = stored
                continue
            args = (model_dir, q.config.to_json(), calib if calibrated else None, local)
            quantized[q.name] = (quantize_on_pool.submit(place_method(q.config.method, device=q.device).deployment,
                                                         *args, device=q.device)
                                 if on_pools else quantize_checkpoint.submit(*args, device=q.device))
        shipped, made_from = {}, {}
        for q in plan.quantize:
            for target in q.formats:
                label = f"{q.name}-{target.label}"
                made_from[label] = q.name
                shipped[label] = ship_artifact.submit(
                    quantized[q.name], target.format, target.options, model_dir, plan.evaluation.to_dict(), plan.gates,
                    baseline, str(out / "artifacts" / label), str(out / "eval" / f"{label}.json"),
                    _publish_target(plan.publish, name, target.format, q), release_artifact_key(release, label))
        wait(list(shipped.values()))
        model_verdicts = [_verdict(out / "artifacts" / label, f,
                                   [u for u in (made.get(made_from[label]), quantized[made_from[label]]) if u])
                          for label, f in shipped.items()]
        if any(v.get("validation") for v in model_verdicts):
            report_run(str(out))
        approved = [v["artifact"] for v in model_verdicts if v["passed"]]
        track_outputs([calib.result()] + approved if calib else approved)
        verdicts += model_verdicts
    for v in verdicts:
        print(f"{'PASS' if v['passed'] else 'FAIL'} {v['artifact']}" + (f": {'; '.join(v['reasons'])}" if v['reasons'] else ""))
    return verdicts


@task(name="ship-artifact", **STEP_HOOKS)
def ship_artifact(qdir: str, fmt: str, options: dict, model_dir: str, evaluation: dict, gates: dict, baseline: str,
                  artifact: str, validation: str, publish_to: dict | None, key: str) -> dict:
    """Export → validate → gate → publish of one artifact as one transaction: any failure rolls it back."""
    verdict: dict = {"artifact": artifact, "passed": False, "reasons": []}
    try:
        with transaction() as txn:
            txn.set("artifact", artifact)
            path = export_artifact(qdir, fmt, options, artifact)
            verdict = validate_artifact(path, model_dir, evaluation, gates, baseline, validation)
            if not verdict["passed"]:
                raise GateFailed("; ".join(verdict["reasons"]))
            if publish_to:
                verdict = {**verdict, "published": publish_artifact(path, validation, publish_to["repo_id"],
                                                                    publish_to["private"], key,
                                                                    publish_to.get("token_secret"))}
    except GateFailed:
        return {**verdict, "rolled_back": True}
    return verdict


def _publish_target(publish: PublishSection, model_name: str, fmt: str, q) -> dict | None:
    if not publish.enabled:
        return None
    bits = getattr(getattr(q.config, "scheme", None), "bits", None)
    return {"repo_id": repo_name_for(model_name, fmt, bits, publish.namespace, publish.naming),
            "private": publish.private, "token_secret": publish.token_secret}


def _model_name(model_id: str, path: str) -> str:
    return model_id.rstrip("/").split("/")[-1] if not Path(model_id).expanduser().is_dir() else Path(path).name


def _is_deployment_run() -> bool:
    try:
        return get_run_context().flow_run.deployment_id is not None
    except Exception:  # noqa: BLE001 - outside a flow run there is no deployment
        return False


def _verdict(artifact: Path, future, upstream: list) -> dict:
    """The artifact's verdict, or — when its quantization (or its hand-over), export, validation or publish
    failed — a failed verdict saying why (the first upstream step's own error when that is what stopped it): one
    artifact's failure blocks that artifact and nothing else."""
    state = future.state
    if state.is_completed():
        return future.result()
    failed = [u for u in upstream if u.state.is_failed() or u.state.is_crashed()]
    stopped_by = failed[0] if failed else future
    try:
        stopped_by.result()
        reason = stopped_by.state.message or stopped_by.state.name
    except Exception as e:  # noqa: BLE001 - the task's own error, reported as this artifact's verdict
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    step = "quantization failed" if failed else "not produced"
    return {"artifact": str(artifact), "passed": False, "reasons": [f"{step}: {reason}"], "error": True}

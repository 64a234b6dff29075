"""Per-method work on the pool that suits it: a run of the ``quantize_method`` deployment, awaited."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.deployments import run_deployment

from tasks.progress import STEP_HOOKS


@task(name="quantize-on-pool", cache_policy=INPUTS + TASK_SOURCE, persist_result=True, **STEP_HOOKS)
def quantize_on_pool(deployment: str, model_dir: str, config_json: str, calib_path: str | None, out: str,
                     device: str | None = None) -> str:
    """Path of the checkpoint a worker of ``deployment``'s pool wrote to ``out`` (shared storage); raises with the
    child run's final state when it did not complete. ``device``: the plan's, else the worker's own."""
    run = run_deployment(deployment, parameters={"model_dir": model_dir, "config_json": config_json,
                                                 "calib_path": calib_path, "out": out, "device": device},
                         poll_interval=1)
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        message = (run.state.message or "") if run.state else ""
        raise RuntimeError(f"{deployment} run {run.name} ended {state}{': ' + message if message else ''}")
    return out

"""Per-method work on the pool that suits it: a run of the ``quantize_method`` deployment, awaited."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.deployments import run_deployment

from tasks.progress import STEP_HOOKS

from turboquant.io.storage import stored_url


@task(name="quantize-on-pool", cache_policy=INPUTS + TASK_SOURCE, persist_result=True, **STEP_HOOKS)
def quantize_on_pool(deployment: str, model_dir: str, config_json: str, calib_path: str | None, out: str,
                     device: str | None = None, storage: str | None = None, revision: str | None = None) -> str:
    """What a worker of ``deployment``'s pool made: the checkpoint at path ``out`` (a file system both see), or,
    with ``storage``, the URL of the checkpoint it uploaded under key ``out`` (``model_dir`` is then the model's
    id, fetched by the worker at ``revision``). Raises with the child run's final state when it did not complete.
    ``device``: the plan's, else the worker's own."""
    parameters = {"model_dir": model_dir, "config_json": config_json, "calib_path": calib_path, "out": out,
                  "device": device}
    if storage is not None:
        parameters.update(storage=storage, revision=revision)
    run = run_deployment(deployment, parameters=parameters, poll_interval=1)
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        message = (run.state.message or "") if run.state else ""
        raise RuntimeError(f"{deployment} run {run.name} ended {state}{': ' + message if message else ''}")
    return stored_url(storage, out) if storage is not None else out

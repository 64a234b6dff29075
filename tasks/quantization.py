"""Quantize one model with one method config into the canonical checkpoint."""

from __future__ import annotations

import json

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from tasks.progress import STEP_HOOKS

from turboquant import faults
from turboquant.methods import make_config
from turboquant.io.calibration import load_calibration
from turboquant.quantize.pipeline import quantize


@task(name="quantize", cache_policy=INPUTS + TASK_SOURCE, persist_result=True, **STEP_HOOKS)
def quantize_checkpoint(model_dir: str, config_json: str, calib_path: str | None, out: str,
                        device: str | None = None) -> str:
    """Path of the canonical checkpoint (written atomically; an existing complete one is replaced), computed on
    ``device`` (None: this worker's ``$TURBOQUANT_DEVICE``, else auto)."""
    faults.point("task.quantize.start")
    data = json.loads(config_json)
    config = make_config(data.pop("method"), **data)
    calib = load_calibration(calib_path) if calib_path else None  # records the file's DVC md5
    path = str(quantize(model_dir, config, out, calib=calib, overwrite=True, progress=False, device=device))
    faults.point("task.quantize.end")
    return path

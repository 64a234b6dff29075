"""Quantize one model with one method config into the canonical checkpoint."""

from __future__ import annotations

import json

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from turboquant.calibration import CalibrationSet
from turboquant.methods import make_config
from turboquant.quantize_checkpoint import quantize


@task(name="quantize", cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def quantize_checkpoint(model_dir: str, config_json: str, calib_path: str | None, out: str) -> str:
    """Path of the canonical checkpoint (written atomically; an existing complete one is replaced)."""
    data = json.loads(config_json)
    config = make_config(data.pop("method"), **data)
    calib = CalibrationSet.load(calib_path) if calib_path else None
    return str(quantize(model_dir, config, out, calib=calib, overwrite=True, progress=False))

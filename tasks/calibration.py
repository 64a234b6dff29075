"""Calibration set: built once per (model, recipe), saved where DVC can track it."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from tasks.progress import STEP_HOOKS

from turboquant.io.calibration import build_calibration
from turboquant.pipeline.plan import CalibrationSection
from turboquant.io.model import read_config


@task(name="build-calibration", cache_policy=INPUTS + TASK_SOURCE, persist_result=True, **STEP_HOOKS)
def build_calibration_set(model_dir: str, recipe: dict, out: str) -> str:
    """Path of the calibration file for ``recipe`` (``CalibrationRecipe`` fields) on ``model_dir``'s tokenizer."""
    r = CalibrationSection.from_dict(recipe).recipe()
    calib = build_calibration(r, Path(model_dir), read_config(Path(model_dir)).get("max_position_embeddings"))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    calib.save(out)
    return out

"""A progress bar over a whole plan, advanced by the tasks' state hooks (in-process runs only; under a worker the
Prefect UI shows the same progress)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

_lock = threading.Lock()
_bar: Any = None


def plan_steps(plan) -> int:
    """Tasks one run of ``plan`` counts: per model fetch, calibration (when needed), baseline, each quantization,
    each artifact (export + validate + publish as one step) and the report."""
    from turboquant.methods import get_method

    calib = any(get_method(q.config.method).needs_calibration for q in plan.quantize)
    per_model = 1 + int(calib) + 1 + len(plan.quantize) + sum(len(q.formats) for q in plan.quantize) + 1
    return per_model * len(plan.models)


@contextlib.contextmanager
def plan_progress(plan, enabled: bool = True) -> Iterator[None]:
    """Show the bar while the block runs."""
    global _bar
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    with tqdm(total=plan_steps(plan), desc="plan", unit="step", dynamic_ncols=True) as bar:
        _bar = bar
        try:
            yield
        finally:
            _bar = None


def advance(task, task_run, state) -> None:
    """State hook: one step finished (completed, cached or failed)."""
    with _lock:
        if _bar is not None:
            _bar.set_postfix_str(f"{task.name} {state.name}", refresh=False)
            _bar.update(1)


STEP_HOOKS = {"on_completion": [advance], "on_failure": [advance]}

"""What ``turboquant plan`` prints: the DAG a plan expands to, with the pool of every task and every impossible
(quantization, format) combination, found on a local model's real shapes or, for a Hub model, by triage from its
config alone (``pipeline.triage``: no weight is downloaded)."""

from __future__ import annotations

from typing import Callable

from turboquant.errors import ConfigError, TurboQuantError
from turboquant.io.model import resolve_model
from turboquant.pipeline.placement import Placement, place_method, place_validator
from turboquant.pipeline.plan import Plan
from turboquant.pipeline.triage import triage


def overview(plan: Plan) -> tuple[list[str], list[tuple[str, TurboQuantError]], int]:
    """``(lines to print, [(where, error)] of impossible artifacts, number of planned artifacts)``."""
    lines: list[str] = []
    failures: list[tuple[str, TurboQuantError]] = []
    for m in plan.models:
        lines.append(f"model {m.id}" + (f" @ {m.revision}" if m.revision else ""))
        if m.local_dir:
            results = plan.check_formats(resolve_model(m.local_dir).path)
        else:
            results = _triaged(plan, m.id, m.revision)
            if isinstance(results, TurboQuantError):
                lines.append(f"  unsupported: {results}")
                failures.append((m.id, results))
                continue
        lines.append("  fetch → calibrate → baseline (pool cpu)")
        for q in plan.quantize:
            pool = _pool_of(lambda method: place_method(method, device=q.device), q.config.method)
            on = f", device {q.device}" if q.device else ""
            lines.append(f"  quantize {q.name} (pool {pool}{on}): {q.config.to_json()}")
            for target in q.formats:
                err = next((e for n, lbl, e in results if n == q.name and lbl == target.label), None)
                lines.append(f"    export {target.label} → validate (pool {_pool_of(place_validator, target.format)})"
                             f" → gate → publish" + (f"  <- IMPOSSIBLE: {err}" if err else ""))
                if err:
                    failures.append((f"{m.id} {q.name} -> {target.label}", err))
    return lines, failures, sum(len(q.formats) for q in plan.quantize) * len(plan.models)


def _triaged(plan: Plan, repo_id: str, revision: str | None
             ) -> list[tuple[str, str, TurboQuantError | None]] | TurboQuantError:
    """Triage's verdict in ``check_formats``' shape, or the error that makes the whole release unsupported."""
    t = triage(plan, repo_id, revision)
    if t.unsupported is not None:
        return t.unsupported
    return [(q, label, err) for (q, label), err in t.artifacts.items()]


def _pool_of(place: Callable[[str], Placement], name: str) -> str:
    try:
        return place(name).pool
    except ConfigError as e:
        return f"NONE AVAILABLE: {e.problem}"

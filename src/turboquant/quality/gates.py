"""Quality gates: thresholds an artifact's measured metrics must meet before it may be published.

Defaults by bit width follow what users of each width accept (8-bit: practically lossless, perplexity +1 %,
KL <= 0.01; 4-bit: +5 %, KL <= 0.1; lm-eval task scores may drop at most 2 points). A plan can override any of
them. ``judge`` turns metrics into a verdict that lists every threshold, the value measured and why it failed;
a metric that was not measured fails its gate (an unmeasured artifact is not an approved one).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from turboquant.errors import check_keys, ConfigError

#: (max perplexity increase %, max mean KL, min top-1 agreement) by bits per weight of the quantized linears.
DEFAULTS_BY_BITS: dict[int, tuple[float, float, float]] = {
    16: (0.1, 0.001, 0.99),
    8: (1.0, 0.01, 0.95),
    6: (2.0, 0.03, 0.92),
    5: (3.0, 0.05, 0.90),
    4: (5.0, 0.1, 0.85),
    3: (10.0, 0.2, 0.75),
    2: (25.0, 0.5, 0.60),
}


@dataclass(frozen=True)
class Gates:
    """Thresholds for one artifact; ``None`` switches a gate off."""

    max_ppl_delta_pct: float | None = 5.0
    max_kl: float | None = 0.1
    min_top1: float | None = None
    max_long_ppl_delta_pct: float | None = None
    max_task_drop: float | None = 2.0

    @classmethod
    def for_bits(cls, bits: float, **overrides: Any) -> "Gates":
        """Defaults for a bit width (mixed widths, e.g. 4.5 bpw, take the row of the width below), with
        ``overrides`` applied."""
        widths = sorted(DEFAULTS_BY_BITS)
        key = max((w for w in widths if w <= bits), default=widths[0])
        ppl, kl, top1 = DEFAULTS_BY_BITS[key]
        return cls.from_dict({"max_ppl_delta_pct": ppl, "max_kl": kl, "min_top1": top1,
                              "max_long_ppl_delta_pct": ppl * 2, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Gates":
        names = {f.name for f in fields(cls)}
        check_keys(data, names, "unknown gate(s) {unknown}")
        for key, value in data.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ConfigError(f"gate {key}={value!r} is not a non-negative number", "use e.g. 0.1, or null to disable")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Check:
    gate: str
    threshold: float
    value: float | None
    passed: bool
    reason: str


@dataclass
class Verdict:
    passed: bool
    checks: list[Check] = field(default_factory=list)
    gates: dict[str, Any] = field(default_factory=dict)

    @property
    def reasons(self) -> list[str]:
        return [c.reason for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": self.reasons, "gates": self.gates,
                "checks": [asdict(c) for c in self.checks]}

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _upper(gate: str, label: str, threshold: float, value: float | None) -> Check:
    if value is None or not math.isfinite(value):
        return Check(gate, threshold, value, False, f"{label} was not measured (or is not finite)")
    ok = value <= threshold
    return Check(gate, threshold, value, ok, "" if ok else f"{label} {value:.6g} exceeds {threshold:g}")


def _lower(gate: str, label: str, threshold: float, value: float | None) -> Check:
    if value is None or not math.isfinite(value):
        return Check(gate, threshold, value, False, f"{label} was not measured (or is not finite)")
    ok = value >= threshold
    return Check(gate, threshold, value, ok, "" if ok else f"{label} {value:.6g} is below {threshold:g}")


def judge(metrics: dict[str, Any], gates: Gates) -> Verdict:
    """The verdict for ``metrics`` as ``validate`` writes them: ``ppl_delta_pct``, ``kl``, ``top1``,
    ``long_ppl_delta_pct`` and ``tasks`` ``{task: {"score": s, "baseline": b}}`` (scores in points, 0-100)."""
    checks: list[Check] = []
    if gates.max_ppl_delta_pct is not None:
        checks.append(_upper("max_ppl_delta_pct", "perplexity increase %", gates.max_ppl_delta_pct,
                             metrics.get("ppl_delta_pct")))
    if gates.max_kl is not None:
        checks.append(_upper("max_kl", "mean KL divergence", gates.max_kl, metrics.get("kl")))
    if gates.min_top1 is not None:
        checks.append(_lower("min_top1", "top-1 agreement", gates.min_top1, metrics.get("top1")))
    if gates.max_long_ppl_delta_pct is not None and "long_ppl_delta_pct" in metrics:
        checks.append(_upper("max_long_ppl_delta_pct", "long-context perplexity increase %",
                             gates.max_long_ppl_delta_pct, metrics.get("long_ppl_delta_pct")))
    if gates.max_task_drop is not None:
        for task, r in sorted((metrics.get("tasks") or {}).items()):
            if "score" not in r:  # a task without an accuracy-type metric (e.g. perplexity) is reported, not gated
                continue
            score, base = r.get("score"), r.get("baseline")
            drop = None if score is None or base is None else base - score
            checks.append(_upper(f"max_task_drop:{task}", f"{task} score drop (points)", gates.max_task_drop, drop))
    return Verdict(all(c.passed for c in checks), checks, gates.to_dict())

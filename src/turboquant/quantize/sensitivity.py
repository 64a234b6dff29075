"""Mixed precision by measured sensitivity: how much each layer hurts at each bit width, and the best allocation.

**Sensitivity.** For every linear ``l`` of block ``i`` and every candidate width ``b``, ``E[l, b]`` is the mean
squared error of block ``i``'s *output* (per token, summed over the hidden dimension) when only ``W_l`` is
quantized at ``b`` bits by the base method (RTN, or GPTQ with ``H`` from the same inputs) and the rest of the
model is float. Every block is fed the float model's activations. This is the quantity HAWQ (Dong et al., 2019,
arXiv:1905.03696) approximates to second order with Hessian information, measured directly as in BRECQ's
block-output reconstruction (Li et al., 2021, arXiv:2102.05426). Measured rather than taken from the layer's own
output error ``tr((W-Q) H (W-Q)^T)`` because layers are not equally exposed: an error in ``q_proj``/``k_proj``
output is damped by the softmax, one in ``down_proj`` lands in the residual stream unchanged, and the layer-level
proxy would hand the attention projections bits they do not need. All errors live in the same space (the
residual stream), so they can be added across layers and blocks (the usual additivity assumption); the
benchmark checks the end result on the model's KL divergence. Cost: one block forward per (linear, width) on
``sensitivity_samples`` windows.

**Allocation.** Minimise ``sum_l E[l, b_l]`` subject to ``sum_l storage_bits(l, b_l) <= target_bpw * sum_l
params_l`` (codes + float16 scales + zero points, ``QuantScheme.storage_bits``: the bits-per-weight the rest of
TurboQuant reports). This multiple-choice knapsack (HAWQ-V3's integer program, Yao et al., 2021,
arXiv:2011.10680) is solved exactly by dynamic programming over the budget left after every layer's cheapest
option, in units of the greatest common divisor of the upgrade costs; when that leaves too many units, upgrade
costs are rounded *up* to a coarser unit, so the budget is still never exceeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import reduce
from typing import Any, Callable, Hashable, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from turboquant.device import ActivationStore
from turboquant.errors import ConfigError
from turboquant.methods.mixed import MixedPrecisionConfig, quantize_weight
from turboquant.quantize.runner import BlockRunner
from turboquant.io.calibration import CalibrationSet
from turboquant.io.model import OpenedModel


K = TypeVar("K", bound=Hashable)
#: Largest number of budget units the dynamic program uses (memory: one int8 choice per unit per layer).
MAX_UNITS = 1 << 16


# ---------------------------------------------------------------------------------------------------------------
# Bits accounting
# ---------------------------------------------------------------------------------------------------------------


def module_cost(shape: tuple[int, int] | list[int], cfg: MixedPrecisionConfig, bits: int) -> int:
    """Stored bits of one ``[out, in]`` linear at ``bits`` (codes, float16 scales, zero points)."""
    out_f, in_f = int(shape[0]), int(shape[1])
    return cfg.scheme_at(bits).storage_bits(out_f, in_f)


def bits_per_weight(shapes: dict[str, Any], cfg: MixedPrecisionConfig, plan: dict[str, int]) -> float:
    """Average stored bits per weight of ``plan`` over the planned linears."""
    total = sum(module_cost(shapes[m], cfg, b) for m, b in plan.items())
    return total / sum(int(shapes[m][0]) * int(shapes[m][1]) for m in plan)


# ---------------------------------------------------------------------------------------------------------------
# Allocation: exact multiple-choice knapsack
# ---------------------------------------------------------------------------------------------------------------


def allocate(costs: dict[str, dict[K, int]], errors: dict[str, dict[K, float]], budget: float,
             max_units: int = MAX_UNITS) -> dict[str, K]:
    """The option per item minimising ``sum errors`` with ``sum costs <= budget`` (costs in bits).

    Every item starts at its cheapest option; the dynamic program spends the budget left over (``budget - sum of
    the cheapest costs``) on upgrades, in units of the greatest common divisor of the upgrade costs: exact when
    that is at most ``max_units`` units, else upgrade costs are rounded *up* to ``leftover / max_units`` (still
    within the budget, and within ``len(costs)`` units of the optimum's).
    """
    items = sorted(costs)
    floor = {i: min(costs[i].values()) for i in items}
    spare = budget - sum(floor.values())
    if spare < 0:
        raise ConfigError(f"the budget ({budget / 1e6:.4f} Mbit) is below the cheapest allocation "
                          f"({sum(floor.values()) / 1e6:.4f} Mbit)",
                          "raise target_bpw or add a lower width to candidate_bits")
    extra = {i: {k: int(c - floor[i]) for k, c in costs[i].items()} for i in items}
    unit = reduce(math.gcd, (c for i in items for c in extra[i].values()), 0) or 1
    if spare / unit > max_units:
        unit = spare / max_units
    n_units = int(math.floor(spare / unit + 1e-9))

    def units(c: int) -> int:
        return int(math.ceil(c / unit - 1e-9))

    best = np.full(n_units + 1, np.inf)  # best[u]: least error of the items so far using exactly u units
    best[0] = 0.0
    choices: list[tuple[list[K], np.ndarray]] = []
    for item in items:
        options = sorted(costs[item], key=lambda k: (costs[item][k], errors[item][k]))
        new = np.full(n_units + 1, np.inf)
        pick = np.full(n_units + 1, -1, dtype=np.int16)
        for j, opt in enumerate(options):
            u = units(extra[item][opt])
            if u > n_units:
                continue
            cand = best[: n_units + 1 - u] + float(errors[item][opt])
            better = cand < new[u:]
            new[u:][better] = cand[better]
            pick[u:][better] = j
        best = new
        choices.append((options, pick))
    u = int(np.argmin(best))
    plan: dict[str, K] = {}
    for item, (options, pick) in zip(reversed(items), reversed(choices)):
        opt = options[int(pick[u])]
        plan[item] = opt
        u -= units(extra[item][opt])
    return dict(sorted(plan.items()))


# ---------------------------------------------------------------------------------------------------------------
# Sensitivity measurement
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Sensitivity:
    """``errors[module][bits]``: block-output MSE with only that module quantized; ``shapes[module]``: [out, in]."""

    errors: dict[str, dict[int, float]]
    shapes: dict[str, list[int]]

    def to_dict(self) -> dict[str, Any]:
        return {"errors": {m: {str(b): e for b, e in sorted(v.items())} for m, v in sorted(self.errors.items())},
                "shapes": dict(sorted(self.shapes.items()))}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Sensitivity":
        return cls({m: {int(b): float(e) for b, e in v.items()} for m, v in data["errors"].items()},
                   {m: list(s) for m, s in data["shapes"].items()})


@torch.no_grad()
def measure_sensitivity(opened: OpenedModel, cfg: MixedPrecisionConfig, calib: CalibrationSet,
                        batch_size: int = 8, progress: bool = False, store: ActivationStore | None = None
                        ) -> Sensitivity:
    """``E[l, b]`` for every linear and candidate width (see the module docstring), one block at a time, on
    ``store``'s device."""

    runner = BlockRunner.start(opened, calib.input_ids[: cfg.sensitivity_samples], batch_size=batch_size,
                               store=store)
    errors: dict[str, dict[int, float]] = {}
    shapes: dict[str, list[int]] = {}
    bar = tqdm(total=opened.n_layers, desc="sensitivity", unit="block", disable=not progress, leave=False)
    for i in range(opened.n_layers):
        prefix = opened.arch.block_prefix(i)
        block = runner.load_block(i)
        linears = list(opened.arch.linears_at(i))
        reference = runner.forward(block)
        stats = runner.capture(block, linears) if cfg.base == "gptq" else {}
        for name in linears:
            linear = block.get_submodule(name)
            W = linear.weight.data
            shapes[prefix + name] = list(W.shape)
            errors[prefix + name] = {}
            for bits in cfg.candidate_bits:
                H = stats[name].H if name in stats else None
                linear.weight.data = quantize_weight(W, cfg, bits=bits, H=H).dequantize(torch.float32)
                diff = runner.store.fetch(runner.forward(block)) - runner.store.fetch(reference)
                errors[prefix + name][bits] = float(diff.pow(2).sum(-1).mean())
            linear.weight.data = W
        runner.release_block(i)
        runner.advance(reference)
        bar.update()
    bar.close()
    return Sensitivity(errors, shapes)


def plan_bits(sens: Sensitivity, cfg: MixedPrecisionConfig) -> dict[str, int]:
    """The allocation of ``cfg.candidate_bits`` minimising the summed sensitivity under ``cfg.target_bpw``."""
    costs = {m: {b: module_cost(shape, cfg, b) for b in cfg.candidate_bits} for m, shape in sens.shapes.items()}
    errors = {m: {b: sens.errors[m][b] for b in cfg.candidate_bits} for m in sens.shapes}
    params = sum(int(s[0]) * int(s[1]) for s in sens.shapes.values())
    low = min(cfg.candidate_bits)
    floor_bpw = sum(module_cost(s, cfg, low) for s in sens.shapes.values()) / params
    if cfg.target_bpw < floor_bpw:
        raise ConfigError(f"target_bpw={cfg.target_bpw} is below {floor_bpw:.4f}, the bits per weight of every "
                          f"layer at {low} bits (group {cfg.group_size})",
                          f"raise --target-bpw to at least {floor_bpw:.4f} or add a lower width to candidate_bits")
    return allocate(costs, errors, cfg.target_bpw * params)


def resolve(opened: OpenedModel, cfg: MixedPrecisionConfig, calib: CalibrationSet | None, batch_size: int = 8,
            progress: bool = False, measure: Callable[..., Sensitivity] = measure_sensitivity,
            store: ActivationStore | None = None) -> tuple[MixedPrecisionConfig, Sensitivity | None]:
    """``cfg`` with its ``plan`` filled in (measured on ``calib``), and the sensitivity it came from.

    A config that already has a plan is checked against the model's linears and returned as it is.
    """
    if cfg.plan:
        expected = set(opened.arch.linear_names())
        if set(cfg.plan) != expected:
            missing = sorted(expected - set(cfg.plan))[:1] or sorted(set(cfg.plan) - expected)[:1]
            raise ConfigError(f"the mixed-precision plan does not match this model's linears (e.g. {missing[0]})",
                              "leave plan empty so that it is measured for this model")
        return cfg, None
    if calib is None:
        raise ConfigError("mixed precision measures each layer's sensitivity on calibration data, and none was given",
                          "pass --calib FILE or --data FILE")
    sens = measure(opened, cfg, calib, batch_size=batch_size, progress=progress, store=store)
    return replace(cfg, plan=plan_bits(sens, cfg)), sens


def summary(cfg: MixedPrecisionConfig, shapes: dict[str, Any], sens: Sensitivity | None) -> dict[str, Any]:
    """What the checkpoint metadata records about the allocation."""
    hist: dict[str, int] = {}
    for b in cfg.plan.values():
        hist[str(b)] = hist.get(str(b), 0) + 1
    out: dict[str, Any] = {"target_bpw": cfg.target_bpw, "bits_per_weight": bits_per_weight(shapes, cfg, cfg.plan),
                           "layers_per_bits": dict(sorted(hist.items(), key=lambda kv: int(kv[0])))}
    if sens is not None:
        out["sensitivity"] = sens.to_dict()["errors"]
        out["predicted_error"] = sum(sens.errors[m][b] for m, b in cfg.plan.items())
    return out

"""HQQ: calibration-free Half-Quadratic Quantization of the zero point and scale of every group.

Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Machine Learning Models" (mobiusml blog and the
``mobiusml/hqq`` repository). HQQ minimises a sparsity-promoting ``lp`` norm (``p < 1``) of the weight error
``W - dequant(quant(W))`` instead of its square, so a few outliers may keep large errors while the bulk of a group
is fitted closely. Splitting the error into an auxiliary variable ``W_e`` gives a half-quadratic problem solved by
alternating two closed-form steps, with ``beta`` annealed by ``kappa`` each iteration:

1. ``W_e = shrink_lp(W - dequant(quant(W)))``, the generalised soft-thresholding (proximal) operator
   ``sign(x) * relu(|x| - |x|**(p-1) / beta)``;
2. refit the quantizer to ``W - W_e`` with the codes held: the paper updates the zero point alone
   (``z = mean(q - (W - W_e) / s)``); here the scale is refitted with it (the joint least-squares line through the
   codes), which on heavy-tailed weights lowers the error much further than the zero alone.

Deviations, all deliberate: the error is measured in code units (divided by the group's scale) so the result does
not depend on the weights' magnitude; each iterate's scale is float16-exact and its fractional zero float16-exact,
so the codes chosen are exactly what the stored tensors dequantize to; every group keeps its own best iterate
(squared error, RTN included as a candidate, so no group ends worse than RTN), and the loop stops early once the
whole tensor's error stops falling.

``integer_zero=True`` (needed by GPTQ / AWQ / compressed-tensors layouts) first solves with a fractional zero, then,
for the integer zero just below and just above it, re-runs the loop refitting the scale alone with that zero held,
and keeps per group the best of those and RTN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from turboquant.errors import ConfigError
from turboquant.methods.base import WeightQuantConfig, check_type, register_method
from turboquant.tensor import QuantizedTensor, group_view, qparams_from_range, round_scale

_Fit = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # scale [R, G], zero [R, G], squared error [R, G]


@dataclass(frozen=True)
class HqqConfig(WeightQuantConfig):
    """HQQ (asymmetric only): ``iters`` half-quadratic steps with an ``lp_norm`` error, ``beta`` grown by ``kappa``."""

    symmetric: bool = False
    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    integer_zero: bool = False

    @property
    def fractional_zeros(self) -> bool:
        return not self.integer_zero

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.symmetric:
            raise ConfigError(
                "HQQ optimises the zero point, so it has no symmetric form",
                "use method rtn or gptq for symmetric codes, or pass symmetric=false",
            )
        check_type("iters", self.iters, int, "use a whole number of iterations, e.g. 20")
        if not 1 <= self.iters <= 10_000:
            raise ConfigError(f"iters={self.iters} is out of range", "use 1 to 10000 iterations, e.g. 20")
        for name, hint in (("lp_norm", "e.g. 0.7"), ("beta", "e.g. 10"), ("kappa", "e.g. 1.01")):
            check_type(name, getattr(self, name), (int, float), f"use a number, {hint}")
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name}={getattr(self, name)!r} is not finite", f"use a finite number, {hint}")
        if not 0 < self.lp_norm <= 1:
            raise ConfigError(f"lp_norm={self.lp_norm} is out of range", "use 0 < lp_norm <= 1, e.g. 0.7")
        if self.beta <= 0:
            raise ConfigError(f"beta={self.beta} is not positive", "use beta > 0, e.g. 10")
        if not 1 <= self.kappa <= 10:
            raise ConfigError(f"kappa={self.kappa} is out of range", "use 1 <= kappa <= 10, e.g. 1.01")
        check_type("integer_zero", self.integer_zero, bool, "use true or false")


def _codes(G: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``q`` of groups ``G`` [R, G, g] under scale/zero [R, G] and the code-unit residual ``G / s + z - q``."""
    u = (G / s.unsqueeze(-1)).add_(z.unsqueeze(-1))
    q = u.round().clamp_(0, qmax)
    return q, u.sub_(q)


def _sq_error(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-group squared weight error from code-unit residuals ``x`` and scales ``s``."""
    return torch.linalg.vecdot(x, x) * s.square()


def _kept(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """``x - W_e``: what the generalised soft-thresholding ``sign(x) relu(|x| - |x|^(p-1) / beta)`` leaves of ``x``."""
    return x.abs().pow_(p - 2).mul_(1 / beta).clamp_(max=1).mul_(x)  # x == 0: inf clamped to 1, times 0


def _keep_better(best: _Fit, cand: _Fit) -> _Fit:
    better = cand[2] < best[2]
    return tuple(torch.where(better, c, b) for b, c in zip(best, cand))  # type: ignore[return-value]


def _half_quadratic(
    G: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int, cfg: HqqConfig, fit_zero: bool
) -> _Fit:
    """The HQQ loop from ``(s, z)``: per group, the best iterate. ``fit_zero=False`` holds ``z`` (integer zero).

    In code units ``W / s = q - z + x``; the target ``W - W_e`` is ``s (q - z + m)`` with ``m = x - shrink(x)``, so
    the least-squares refits below are closed forms in ``q`` and ``m`` alone.
    """
    q, x = _codes(G, s, z, qmax)
    best = (s, z, _sq_error(x, s))
    prev, beta = float(best[2].sum()), float(cfg.beta)
    for _ in range(cfg.iters):
        m = _kept(x, beta, cfg.lp_norm)
        if fit_zero:  # the line target ~ s' q + b through the held codes; zero = -b / s'
            q_mean, m_mean = q.mean(-1), m.mean(-1)
            qc = q - q_mean.unsqueeze(-1)
            var, cov = torch.linalg.vecdot(qc, qc), torch.linalg.vecdot(qc, m)
            gain = 1 + cov / torch.where(var > 0, var, 1.0)
            s_new = torch.where((var > 0) & (gain > 0), round_scale(s * gain), s)
            z = (q_mean - s / s_new * (q_mean - z + m_mean)).clamp_(0, qmax).to(torch.float16).float()
            s = s_new
        else:  # the scale alone, zero held: s' = <q - z, target> / |q - z|^2
            qz = q - z.unsqueeze(-1)
            den = torch.linalg.vecdot(qz, qz)
            gain = 1 + torch.linalg.vecdot(qz, m) / torch.where(den > 0, den, 1.0)
            s = torch.where((den > 0) & (gain > 0), round_scale(s * gain), s)
        beta *= cfg.kappa
        q, x = _codes(G, s, z, qmax)
        err = _sq_error(x, s)
        best = _keep_better(best, (s, z, err))
        total = float(err.sum())
        if not total < prev:  # the paper's early stop: the error stopped improving
            break
        prev = total
    return best


@register_method("hqq", HqqConfig, "half-quadratic (HQQ) zero/scale optimisation, calibration-free", kind="weight")
def quantize_weight(W: torch.Tensor, cfg: HqqConfig) -> QuantizedTensor:
    scheme = cfg.scheme
    scheme.check_shape(tuple(W.shape))
    qmax = scheme.qmax
    G = group_view(W.float(), scheme)
    xmin, xmax = G.amin(dim=-1), G.amax(dim=-1)
    s0, z_int = qparams_from_range(xmin, xmax, scheme)  # RTN: float16-exact scale, integer zero
    rtn: _Fit = (s0, z_int, _sq_error(_codes(G, s0, z_int, qmax)[1], s0))
    z_frac = (-torch.minimum(xmin, torch.zeros_like(xmin)) / s0).clamp(0, qmax).to(torch.float16).float()
    best = _keep_better(rtn, _half_quadratic(G, s0, z_frac, qmax, cfg, fit_zero=True))
    if cfg.integer_zero:
        s_f, z_f = best[0], best[1]
        best = rtn
        for z in (z_f.floor(), z_f.ceil()):
            best = _keep_better(best, _half_quadratic(G, s_f, z.clamp(0, qmax), qmax, cfg, fit_zero=False))
    scale, zero = best[0], best[1]
    codes, _ = _codes(G, scale, zero, qmax)
    return QuantizedTensor.from_groups(codes, scale, zero, scheme, W.shape, W.dtype, integer_zero=cfg.integer_zero)

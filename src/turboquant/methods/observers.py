"""Range observers for static int8: watch activations over calibration batches, then give the range to quantize.

* ``minmax``: the running minimum and maximum (per tensor, or per slice along ``axis``), as PyTorch's
  ``MinMaxObserver`` / ``PerChannelMinMaxObserver``.
* ``percentile``: the ``percentile``-th percentile of ``|x|`` (e.g. 99.99), read off a histogram with linear
  interpolation inside the bin — NVIDIA pytorch-quantization's percentile calibrator.
* ``histogram``: the clipping threshold minimising the expected squared int8 error over the histogram (clipping
  error beyond it + rounding error below it), the MSE calibrator of the same tools.
* ``entropy``: the TensorRT KL calibrator (Migacz, "8-bit Inference with TensorRT", GTC 2017): over thresholds
  ``i`` from 128 to 2048 bins, the reference distribution ``P`` is the histogram cut at ``i`` with the mass beyond
  folded into its last bin; ``Q`` is ``P``'s bins merged into 128 levels and spread back uniformly over the bins
  that were non-empty; the threshold with the least ``KL(P || Q)`` wins.

The histogram observers are symmetric (they bin ``|x|``, as TensorRT does; the int8 grid is ``[-127, 127]``).
Their histogram keeps a fixed number of bins: when a batch exceeds the covered range, adjacent bins are merged
pairwise (the bin width doubles), which is exact — no re-binning by interpolation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from turboquant.errors import ConfigError, DataError

INT8_LEVELS = 128  # |q| in 0..127: the positive half of the symmetric int8 grid


@dataclass(frozen=True)
class Range:
    """The observed range ``[lo, hi]`` (scalars, or one value per slice for per-channel observers)."""

    lo: torch.Tensor
    hi: torch.Tensor

    @property
    def amax(self) -> torch.Tensor:
        """The symmetric bound ``max(|lo|, |hi|)``."""
        return torch.maximum(self.lo.abs(), self.hi.abs())

    def symmetric_scale(self, qmax: int = 127) -> torch.Tensor:
        """The int8 scale mapping ``amax`` to ``qmax`` (never zero, so an all-zero input stays representable)."""
        return (self.amax / qmax).clamp_min(torch.finfo(torch.float32).tiny)


class Observer:
    """Accumulates statistics of the tensors passed to ``observe``; ``range()`` gives the result."""

    name = ""

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> Range:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Running min / max of everything observed, or per slice along ``axis`` (e.g. 0: per output channel)."""

    name = "minmax"

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.axis is None:
            lo, hi = x.min(), x.max()
        else:
            flat = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
            lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self) -> Range:
        if self.lo is None or self.hi is None:
            raise DataError("the observer saw no data", "run at least one calibration batch through the model")
        return Range(self.lo, self.hi)


class HistogramObserver(Observer):
    """A histogram of ``|x|`` over ``[0, width * num_bins)``; subclasses choose the threshold from it."""

    def __init__(self, num_bins: int = 2048) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2 * INT8_LEVELS \
                or num_bins % INT8_LEVELS:
            raise ConfigError(f"num_bins={num_bins!r} is invalid", "use a multiple of 128 of at least 256, e.g. 2048")
        self.num_bins = num_bins
        self.counts = torch.zeros(num_bins, dtype=torch.float64)
        self.width = 0.0

    def observe(self, x: torch.Tensor) -> None:
        a = x.detach().float().abs().flatten()
        if a.numel() == 0:
            return
        top = float(a.max())
        if not math.isfinite(top):
            raise DataError("a calibration activation is not finite", "check the model and calibration inputs")
        if self.width == 0.0:
            if top == 0.0:
                self.counts[0] += a.numel()
                return
            self.width = top / self.num_bins * (1 + 1e-6)  # the max falls inside the last bin
        while top >= self.width * self.num_bins:  # merge bin pairs: exact, the range doubles
            merged = self.counts.view(-1, 2).sum(dim=1)
            self.counts = torch.cat([merged, torch.zeros_like(merged)])
            self.width *= 2
        idx = (a / self.width).long().clamp_(max=self.num_bins - 1)
        self.counts += torch.bincount(idx, minlength=self.num_bins).double()

    @property
    def edges(self) -> torch.Tensor:
        """Right edge of every bin."""
        return torch.arange(1, self.num_bins + 1, dtype=torch.float64) * self.width

    def threshold(self) -> float:
        raise NotImplementedError

    def range(self) -> Range:
        if self.counts.sum() == 0:
            raise DataError("the observer saw no data", "run at least one calibration batch through the model")
        t = torch.tensor(self.threshold() if self.width > 0 else 0.0, dtype=torch.float32)
        return Range(-t, t)


class PercentileObserver(HistogramObserver):
    """The ``percentile``-th percentile of ``|x|`` (linear inside the bin that crosses it)."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99, num_bins: int = 2048) -> None:
        super().__init__(num_bins)
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
            raise ConfigError(f"percentile={percentile!r} is out of range", "use 0 < percentile <= 100, e.g. 99.99")
        self.percentile = float(percentile)

    def threshold(self) -> float:
        cdf = self.counts.cumsum(0)
        target = self.percentile / 100.0 * float(cdf[-1])
        i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64))[0].clamp(max=self.num_bins - 1))
        below = float(cdf[i - 1]) if i > 0 else 0.0
        inside = float(self.counts[i])
        frac = (target - below) / inside if inside > 0 else 1.0
        return (i + frac) * self.width


class MseObserver(HistogramObserver):
    """The threshold minimising the int8 squared error of the histogram (bin centres stand for their counts)."""

    name = "histogram"

    def threshold(self) -> float:
        centers = (torch.arange(self.num_bins, dtype=torch.float64) + 0.5) * self.width
        candidates = torch.arange(INT8_LEVELS, self.num_bins + 1, dtype=torch.float64) * self.width
        best, best_err = float(candidates[-1]), math.inf
        for chunk in candidates.split(256):  # [C, bins] at a time keeps memory small
            scale = (chunk / 127).unsqueeze(1)
            q = (centers / scale).round().clamp(max=127) * scale
            err = ((centers - q) ** 2 * self.counts).sum(dim=1)
            j = int(err.argmin())
            if float(err[j]) < best_err:
                best, best_err = float(chunk[j]), float(err[j])
        return best


class EntropyObserver(HistogramObserver):
    """TensorRT's KL-divergence calibration over ``num_bins`` bins and 128 quantized levels."""

    name = "entropy"

    def threshold(self) -> float:
        hist = self.counts.numpy()
        kls = [_kl_for_threshold(hist, i) for i in range(INT8_LEVELS, self.num_bins + 1)]
        return (INT8_LEVELS + int(np.argmin(kls))) * self.width  # the first of equal minima


def _kl_for_threshold(hist: "np.ndarray", i: int) -> float:
    """``KL(P || Q)`` for the first ``i`` bins: P with the tail folded in, Q its 128-level quantization.

    The ``i`` bins are split into 128 groups of (nearly) equal size; each group's total count is spread evenly
    over its non-empty bins (empty bins stay empty in Q, as in TensorRT).
    """
    p = hist[:i].copy()
    p[i - 1] += hist[i:].sum()
    nonzero = hist[:i] > 0
    group = np.arange(i) * INT8_LEVELS // i
    sums = np.bincount(group, weights=hist[:i], minlength=INT8_LEVELS)
    used = np.bincount(group, weights=nonzero, minlength=INT8_LEVELS)
    q = np.where(nonzero, sums[group] / np.maximum(used[group], 1), 0.0)
    if p.sum() == 0 or q.sum() == 0:
        return math.inf
    p, q = p / p.sum(), q / q.sum()
    mask = p > 0
    if (q[mask] == 0).any():
        return math.inf  # P has mass where Q has none (only the folded last bin can): infinitely far
    return float((p[mask] * np.log(p[mask] / q[mask])).sum())


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "histogram": MseObserver,
    "entropy": EntropyObserver,
}


def make_observer(name: str, *, percentile: float = 99.99, num_bins: int = 2048, axis: int | None = None) -> Observer:
    """An activation observer by name (``axis`` applies to ``minmax`` only)."""
    if name == "minmax":
        return MinMaxObserver(axis)
    if name == "percentile":
        return PercentileObserver(percentile, num_bins)
    if name in ("histogram", "entropy"):
        return OBSERVERS[name](num_bins)  # type: ignore[call-arg]
    raise ConfigError(f"unknown observer '{name}'", f"use one of {sorted(OBSERVERS)}")

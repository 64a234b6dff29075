"""Observers for static int8: ranges checked against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from turboquant.errors import ConfigError, DataError
from turboquant.methods.observers import (EntropyObserver, MinMaxObserver, MseObserver, PercentileObserver, _kl_for_threshold, make_observer)


def test_minmax_per_tensor_and_per_channel_accumulate_over_batches():
    a = torch.tensor([[-3.0, 1.0, 2.0], [0.5, -0.25, 7.0]])
    b = torch.tensor([[-1.0, 4.0, 0.0], [0.0, 0.0, -9.0]])
    whole, rows, cols = MinMaxObserver(), MinMaxObserver(axis=0), MinMaxObserver(axis=1)
    for x in (a, b):
        for o in (whole, rows, cols):
            o.observe(x)
    r = whole.range()
    assert (r.lo.item(), r.hi.item(), r.amax.item()) == (-9.0, 7.0, 9.0)  # the second batch's -9 widens it
    assert rows.range().lo.tolist() == [-3.0, -9.0] and rows.range().hi.tolist() == [4.0, 7.0]
    assert cols.range().lo.tolist() == [-3.0, -0.25, -9.0] and cols.range().hi.tolist() == [0.5, 4.0, 7.0]
    assert rows.range().symmetric_scale().tolist() == pytest.approx([4.0 / 127, 9.0 / 127])


def test_percentile_on_arange_matches_the_exact_quantile_within_a_bin():
    x = torch.arange(10001.0)  # |x| = x; the 99.99th percentile (linear interpolation) is exactly 9999
    o = PercentileObserver(99.99)
    o.observe(x[:5000])
    o.observe(x[5000:])  # the second batch doubles the range: bins are merged, not re-estimated
    assert abs(o.threshold() - 9999.0) <= o.width
    full = PercentileObserver(100.0)
    full.observe(x)
    assert full.threshold() == pytest.approx(10000.0, rel=1e-5)
    assert o.range().lo.item() == -o.range().hi.item()  # symmetric


def test_histogram_merging_keeps_every_count():
    o = EntropyObserver()
    o.observe(torch.full((10,), 0.5))
    width = o.width
    o.observe(torch.tensor([3.9]))  # 0.5 * (1 + 1e-6) covered; 3.9 needs the range doubled three times
    assert o.counts.sum() == 11 and o.width == pytest.approx(width * 8)
    assert o.counts[int(0.5 / o.width)] == 10


def test_entropy_clips_outliers_below_the_max_and_keeps_a_uniform_range():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g)
    x[:10] = 40.0  # 0.01 % outliers, ten times the Gaussian's reach
    kl = EntropyObserver()
    kl.observe(x)
    t = kl.range().hi.item()
    assert 3.0 < t < 10.0, t  # clips the outliers, keeps the Gaussian body (|x| < 4.4 here)
    u = torch.rand(100_000, generator=g) * 2 - 1
    flat = EntropyObserver()
    flat.observe(u)
    # uniform |x|: cutting anywhere below the max folds mass into the last bin, so the full range has KL 0
    assert flat.threshold() == pytest.approx(flat.width * flat.num_bins)
    even = np.ones(2048)  # an exactly flat histogram: Q equals P at the full range, and only there
    assert _kl_for_threshold(even, 2048) == pytest.approx(0.0, abs=1e-12)
    assert _kl_for_threshold(even, 2047) > 1e-6


def test_mse_threshold_on_laplace_is_near_the_analytic_optimum():
    """ACIQ (Banner et al., 2019): the MSE-optimal 8-bit clip of Laplace(0, b) is about 9.89 b."""
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    o = MseObserver()
    o.observe(x)
    t = o.threshold()
    assert 8.5 < t < 11.0 and t < x.abs().max().item()
    u = MseObserver()
    u.observe(torch.linspace(-1, 1, 10_001))
    assert u.threshold() > 0.99  # nothing to clip on a uniform range


def test_bad_observer_settings_and_empty_observers():
    with pytest.raises(ConfigError, match="entropy.*histogram.*minmax.*percentile"):
        make_observer("kl")
    with pytest.raises(ConfigError, match="num_bins"):
        make_observer("entropy", num_bins=100)
    with pytest.raises(ConfigError, match="percentile"):
        make_observer("percentile", percentile=0)
    for o in (MinMaxObserver(), PercentileObserver()):
        with pytest.raises(DataError, match="saw no data"):
            o.range()
    zeros = MseObserver()
    zeros.observe(torch.zeros(8))
    assert zeros.range().hi.item() == 0.0 and zeros.range().symmetric_scale().item() > 0

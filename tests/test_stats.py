"""Tests for spo_core.stats against closed forms and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spo_core import stats
from spo_core.stats import bootstrap_win_rate_ci, mean_ci, paired_diff_ci, t_quantile, win_rate


@pytest.mark.parametrize("p,df,expected", [(0.975, 4, 2.7764), (0.975, 9, 2.2622), (0.95, 1, 6.3138), (0.995, 30, 2.7500)])
def test_t_quantile_known_values(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-4)
    assert stats._t_ppf_fallback(p, df) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.999, 0.1, 0.5])
def test_fallback_matches_closed_forms(p):
    # df=1 is the Cauchy distribution; df=2 has t = (2p-1)/sqrt(2p(1-p)).
    assert stats._t_ppf_fallback(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9, abs=1e-12)
    assert stats._t_ppf_fallback(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9, abs=1e-12)
    # Large df approaches the normal quantile.
    z = {0.6: 0.2533471, 0.9: 1.2815516, 0.975: 1.9599640, 0.999: 3.0902323, 0.1: -1.2815516, 0.5: 0.0}[p]
    assert stats._t_ppf_fallback(p, 1e7) == pytest.approx(z, abs=1e-5)


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.9, 0)


def test_mean_ci_hand_computed():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, s = sqrt(2.5), n = 5, df = 4
    mean, lo, hi = mean_ci(x)
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)
    assert mean == pytest.approx(3.0)
    assert lo == pytest.approx(3.0 - half, abs=1e-6)
    assert hi == pytest.approx(3.0 + half, abs=1e-6)
    # A wider level gives a wider interval.
    _, lo99, hi99 = mean_ci(x, level=0.99)
    assert lo99 < lo and hi99 > hi


def test_mean_ci_constant_and_tensor_input():
    assert mean_ci(torch.full((4,), 2.5)) == pytest.approx((2.5, 2.5, 2.5))


def test_mean_ci_degenerate_inputs():
    with pytest.raises(ValueError, match="at least 2 items"):
        mean_ci([1.0])
    with pytest.raises(ValueError, match="empty"):
        mean_ci([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="1-D"):
        mean_ci(np.ones((2, 2)))
    with pytest.raises(ValueError, match="level"):
        mean_ci([1.0, 2.0], level=95)


def test_paired_diff_ci_is_mean_ci_of_differences():
    a = np.array([3.0, 5.0, 4.0, 6.0, 7.0, 5.5, 4.5, 6.5, 5.0, 6.0])
    b = a - np.array([1.0, 0.5, 0.0, 1.5, 1.0, 0.5, 1.0, 0.0, 0.5, 1.0])
    d = a - b  # mean 0.7, df 9
    mean, lo, hi = paired_diff_ci(a, b)
    half = 2.2621572 * d.std(ddof=1) / math.sqrt(10)
    assert mean == pytest.approx(0.7)
    assert (lo, hi) == pytest.approx((0.7 - half, 0.7 + half), abs=1e-6)
    with pytest.raises(ValueError, match="differ in length"):
        paired_diff_ci([1.0, 2.0], [1.0, 2.0, 3.0])


def test_win_rate_by_hand():
    a = [1.0, 2.0, 3.0, 4.0]
    b = [0.0, 2.0, 5.0, 1.0]  # win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4
    assert win_rate(a, b) == pytest.approx(0.625)
    assert win_rate(b, a) == pytest.approx(0.375)


def test_bootstrap_contains_estimate_and_is_deterministic():
    rng = np.random.default_rng(1)
    a = rng.normal(0.2, 1.0, size=200)
    b = rng.normal(0.0, 1.0, size=200)
    rate, lo, hi = bootstrap_win_rate_ci(a, b, n_boot=500, seed=3)
    assert rate == pytest.approx(win_rate(a, b))
    assert lo <= rate <= hi
    assert 0.0 <= lo < hi <= 1.0
    assert bootstrap_win_rate_ci(a, b, n_boot=500, seed=3) == (rate, lo, hi)
    assert bootstrap_win_rate_ci(a, b, n_boot=500, seed=4) != (rate, lo, hi)
    # The bootstrap standard error of a mean of n Bernoulli-ish outcomes is about sqrt(p(1-p)/n).
    se = math.sqrt(rate * (1 - rate) / 200)
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_bootstrap_all_wins_is_degenerate_interval():
    assert bootstrap_win_rate_ci([2.0, 3.0, 4.0], [1.0, 1.0, 1.0], n_boot=50) == (1.0, 1.0, 1.0)


def test_cluster_bootstrap_resamples_whole_groups():
    # Each group is all wins or all losses: items are perfectly correlated within a group.
    n_groups, per = 10, 8
    wins_by_group = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0], dtype=float)
    a = np.repeat(wins_by_group, per)
    b = np.full_like(a, 0.5)
    groups = np.repeat(np.arange(n_groups), per)
    rate, lo_g, hi_g = bootstrap_win_rate_ci(a, b, n_boot=2000, seed=0, groups=groups)
    _, lo_i, hi_i = bootstrap_win_rate_ci(a, b, n_boot=2000, seed=0)
    assert rate == pytest.approx(0.6)
    # Treating the 80 items as independent understates the spread of 10 independent groups.
    assert (hi_g - lo_g) > 2 * (hi_i - lo_i)
    # With equal group sizes every replicate rate is a multiple of 1/n_groups.
    assert (lo_g * n_groups) == pytest.approx(round(lo_g * n_groups))
    # Group labels may be any hashable values of the same length.
    labels = np.array([f"prompt-{g}" for g in groups])
    assert bootstrap_win_rate_ci(a, b, n_boot=2000, seed=0, groups=labels) == (rate, lo_g, hi_g)


def test_bootstrap_degenerate_inputs():
    with pytest.raises(ValueError, match="at least 2 items"):
        bootstrap_win_rate_ci([1.0], [0.0])
    with pytest.raises(ValueError, match="empty"):
        bootstrap_win_rate_ci([], [])
    with pytest.raises(ValueError, match="at least 2 groups"):
        bootstrap_win_rate_ci([1.0, 2.0], [0.0, 0.0], groups=[7, 7])
    with pytest.raises(ValueError, match="one group label per item"):
        bootstrap_win_rate_ci([1.0, 2.0], [0.0, 0.0], groups=[0, 1, 2])
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_win_rate_ci([1.0, 2.0], [0.0, 0.0], n_boot=0)


def test_bootstrap_chunking_does_not_change_shape(monkeypatch):
    # Force many small chunks; the result must still be a valid, deterministic interval.
    monkeypatch.setattr(stats, "_MAX_DRAWS_PER_CHUNK", 7)
    a, b = np.arange(10.0), np.arange(10.0)[::-1]
    r1 = bootstrap_win_rate_ci(a, b, n_boot=30, seed=1)
    assert r1 == bootstrap_win_rate_ci(a, b, n_boot=30, seed=1)
    assert r1[0] == 0.5 and r1[1] <= 0.5 <= r1[2]

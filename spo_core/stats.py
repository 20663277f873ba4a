"""Evaluation statistics: t confidence intervals, paired differences, win-rates, bootstrap CIs.

Pure functions on 1-D arrays (lists, numpy arrays or CPU tensors). Comparisons between two models
are *paired*: ``a[i]`` and ``b[i]`` are scores of images generated from the same prompt and the same
seed, so per-item differences cancel the prompt/seed variance that dominates unpaired comparisons.

Intervals
---------
* :func:`mean_ci` is the Student-t interval ``mean +- t_{(1+level)/2, n-1} * s / sqrt(n)`` with the
  sample standard deviation ``s`` (ddof = 1). It assumes independent items; for several images per
  prompt it is optimistic, and :func:`bootstrap_win_rate_ci` with ``groups`` is the safer tool.
* :func:`paired_diff_ci` is :func:`mean_ci` of ``a - b``.
* :func:`bootstrap_win_rate_ci` is the percentile bootstrap of the win-rate over items, or over
  whole groups (cluster bootstrap) when ``groups`` is given.

The t quantile comes from ``scipy.stats.t.ppf`` when scipy is importable, else from
:func:`_t_ppf_fallback` (bisection on the CDF written with the regularised incomplete beta).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["mean_ci", "paired_diff_ci", "win_rate", "win_scores", "bootstrap_win_rate_ci", "t_quantile"]


# ----------------------------------------------------------------------------------------------
# Input checks


def _as_1d(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; avoid importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per item), got shape {arr.shape}: flatten it first")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: statistics need at least one score per item")
    if not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.isfinite(arr))[:5].tolist()
        raise ValueError(f"{name} has non-finite values (NaN/inf) at positions {bad}: drop or fix those items")
    return arr


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a_arr, b_arr = _as_1d(a, "a"), _as_1d(b, "b")
    if a_arr.shape != b_arr.shape:
        raise ValueError(
            f"paired inputs differ in length ({a_arr.size} vs {b_arr.size}): a[i] and b[i] must score the same "
            "prompt and seed"
        )
    return a_arr, b_arr


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1 (e.g. 0.95), got {level}")


# ----------------------------------------------------------------------------------------------
# Student-t quantile


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the regularised incomplete beta (modified Lentz, Numerical Recipes 6.4)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The fraction converges fast only on this side; use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def _t_ppf_fallback(p: float, df: float) -> float:
    """Student-t inverse CDF by bisection on :func:`_t_cdf` (no scipy needed)."""
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -_t_ppf_fallback(1.0 - p, df)
    hi = 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2.0
        if hi > 1e12:
            raise ArithmeticError(f"t quantile for p={p}, df={df} is beyond 1e12")
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (e.g. t_quantile(0.975, 4) = 2.7764)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie strictly between 0 and 1, got {p}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    try:
        from scipy import stats as _sstats
    except ImportError:
        return _t_ppf_fallback(float(p), float(df))
    return float(_sstats.t.ppf(p, df))


# ----------------------------------------------------------------------------------------------
# Means and differences


def mean_ci(x: Any, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``x`` with its Student-t confidence interval: ``(mean, lo, hi)``.

    ``mean +- t_{(1+level)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation (ddof 1).
    Needs n >= 2 (one item has no spread to estimate).
    """
    _check_level(level)
    arr = _as_1d(x, "x")
    n = arr.size
    if n < 2:
        raise ValueError("a confidence interval needs at least 2 items, got 1: score more prompts or seeds")
    mean = float(arr.mean())
    sem = float(arr.std(ddof=1)) / math.sqrt(n)
    half = t_quantile((1.0 + level) / 2.0, n - 1) * sem
    return mean, mean - half, mean + half


def paired_diff_ci(a: Any, b: Any, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of the paired differences ``a - b`` with its t interval: ``(mean, lo, hi)``."""
    a_arr, b_arr = _pair(a, b)
    return mean_ci(a_arr - b_arr, level)


# ----------------------------------------------------------------------------------------------
# Win-rates


def win_scores(a: Any, b: Any) -> np.ndarray:
    """Per-item outcome of ``a`` against ``b``: 1 for a win, 0.5 for a tie, 0 for a loss."""
    a_arr, b_arr = _pair(a, b)
    return (a_arr > b_arr).astype(np.float64) + 0.5 * (a_arr == b_arr)


def win_rate(a: Any, b: Any) -> float:
    """Fraction of paired items where ``a[i] > b[i]``; ties count half."""
    return float(win_scores(a, b).mean())


_MAX_DRAWS_PER_CHUNK = 1 << 22  # bounds the (n_boot, n) index matrix to ~32 MB


def bootstrap_win_rate_ci(
    a: Any,
    b: Any,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    groups: Any = None,
) -> tuple[float, float, float]:
    """Win-rate of ``a`` over ``b`` with a paired percentile-bootstrap interval: ``(rate, lo, hi)``.

    Each replicate resamples items with replacement (keeping each a[i], b[i] pair together) and
    recomputes the win-rate; ``lo``/``hi`` are the ``(1 -+ level)/2`` percentiles of the replicates.
    With ``groups`` (one label per item, e.g. the prompt index when several images share a prompt)
    whole groups are resampled instead (the cluster bootstrap) and a replicate's rate pools the
    items of the drawn groups, because images of one prompt are correlated and resampling them
    one by one would make the interval too narrow. Deterministic for a given ``seed``.
    """
    _check_level(level)
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")
    wins = win_scores(a, b)
    rate = float(wins.mean())
    if groups is None:
        sums, counts = wins, np.ones_like(wins)
        unit = "items"
    else:
        g = np.asarray(groups.detach().cpu().numpy() if hasattr(groups, "detach") else groups)
        if g.shape != wins.shape:
            raise ValueError(f"groups has shape {g.shape} but there are {wins.size} items: give one group label per item")
        _, inverse = np.unique(g, return_inverse=True)
        sums = np.bincount(inverse, weights=wins)
        counts = np.bincount(inverse).astype(np.float64)
        unit = "groups"
    n_units = sums.size
    if n_units < 2:
        raise ValueError(f"the bootstrap needs at least 2 {unit}, got {n_units}: score more prompts")

    rng = np.random.default_rng(seed)
    reps = np.empty(int(n_boot), dtype=np.float64)
    chunk = max(1, _MAX_DRAWS_PER_CHUNK // n_units)
    for start in range(0, int(n_boot), chunk):
        stop = min(int(n_boot), start + chunk)
        idx = rng.integers(0, n_units, size=(stop - start, n_units))
        reps[start:stop] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    logger.debug("bootstrap win-rate %.4f [%.4f, %.4f] over %d %s, %d replicates", rate, lo, hi, n_units, unit, n_boot)
    return rate, float(lo), float(hi)

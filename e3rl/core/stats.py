"""Intervals and sample sizes for telling methods apart (the healing study and the E3RL-vs-GRPO
experiment report these).

Accuracy on a benchmark is a mean over *problems* of each problem's success rate over its k
samples. Problems are what was drawn from a population (the k samples of one problem are
correlated: an easy problem is easy for all of them), so intervals resample problems, never
single samples. Comparing two methods on the same problems (and, in training experiments, the
same seeds) is a paired design: the per-unit differences carry the comparison and problem
difficulty cancels, which is why paired intervals are much narrower than two separate ones.

- `bootstrap_mean_ci`: percentile bootstrap of a mean over units (problems).
- `crossed_bootstrap_mean_ci`: the same for a [seeds, problems] table of per-cell values (e.g.
  paired differences), resampling seeds and problems independently: both are random draws, and a
  seed effect shared by all problems of a run must widen the interval.
- `t_mean_ci`: the Student-t interval of a mean over a few units (seed means), as a check.
- `min_detectable_effect` / `units_for_effect`: the normal-approximation power calculation for a
  paired mean difference, to size seeds and problems before running.

Pure numpy/stdlib: no Ray, no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided interval (`level`, e.g. 0.95)."""

    mean: float
    low: float
    high: float
    level: float

    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def _percentiles(means: np.ndarray, point: float, level: float) -> Interval:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(point), float(low), float(high), level)


def bootstrap_mean_ci(values: Sequence[float], level: float = 0.95, resamples: int = 10_000,
                      seed: int = 0) -> Interval:
    """Mean of per-unit values (one per problem: its accuracy over k samples, or a paired
    difference) with a percentile bootstrap interval over units."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"bootstrap_mean_ci: need a 1-D sequence of >= 2 units, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(resamples, len(x)))
    return _percentiles(x[idx].mean(axis=1), float(x.mean()), level)


def crossed_bootstrap_mean_ci(table: Sequence[Sequence[float]], level: float = 0.95, resamples: int = 10_000,
                              seed: int = 0) -> Interval:
    """Mean of a [seeds, problems] table with seeds and problems resampled independently (each
    resample: the cells of the drawn seeds x the drawn problems)."""
    t = np.asarray(table, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] < 2 or t.shape[1] < 2:
        raise ValueError(f"crossed_bootstrap_mean_ci: need a [seeds >= 2, problems >= 2] table, got shape {t.shape}")
    rng = np.random.default_rng(seed)
    n_s, n_p = t.shape
    means = np.empty(resamples)
    for r in range(resamples):  # one seed draw and one problem draw per resample
        s = rng.integers(0, n_s, size=n_s)
        p = rng.integers(0, n_p, size=n_p)
        means[r] = t[np.ix_(s, p)].mean()
    return _percentiles(means, float(t.mean()), level)


@lru_cache(maxsize=256)
def t_quantile_at_normal(k: float, df: float) -> float:
    """Student-t quantile with `df` (> 0, may be fractional) degrees of freedom at probability Phi(k).

    Bisection on the t CDF, integrated by Simpson's rule in float64 (error < 1e-8 here): cached,
    since k is fixed per run and df takes a handful of values; keeps the core free of scipy.
    The adaptive erase threshold and the t-interval of seed means both use it.
    """
    if df <= 0:
        raise ValueError(f"t_quantile_at_normal: df must be > 0, got {df}")
    if k == 0:
        return 0.0
    target = 0.5 * math.erf(abs(k) / math.sqrt(2))  # Phi(|k|) - 1/2 = mass of the t pdf on [0, t]
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def mass(t: float) -> float:
        x = np.linspace(0.0, t, 4001)
        pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
        w = np.ones_like(x)
        w[1:-1:2], w[2:-1:2] = 4.0, 2.0
        return float((w * pdf).sum()) * t / 12000.0  # Simpson: h / 3 with h = t / 4000

    lo, hi = 0.0, max(abs(k), 1.0)
    while mass(hi) < target:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mass(mid) < target else (lo, mid)
    return math.copysign(0.5 * (lo + hi), k)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta (modified Lentz), for x < (a+1)/(a+b+2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` > 0 degrees of freedom, to ~1e-14 relative, tails included
    (0.5 * I_x(df/2, 1/2) at x = df / (df + t^2), the regularised incomplete beta)."""
    if df <= 0:
        raise ValueError(f"t_upper_tail: df must be > 0, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    a, b = df / 2.0, 0.5
    x = df / (df + t * t)
    if x >= 1.0:
        return 0.5
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        ibeta = math.exp(log_front) * _betacf(a, b, x) / a
    else:
        ibeta = 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b
    half = 0.5 * ibeta  # P(T > |t|)
    return half if t >= 0 else 1.0 - half


def normal_score_of_t(t: float, df: float) -> float:
    """The standard-normal score with the same upper tail as t under Student's t with `df` degrees
    of freedom (inf: t itself): Phi^-1(T_df(t)). Scores of different df share one scale, so one
    calibrated cut on them means the same erase rate whatever the number of peers."""
    if math.isinf(df) or math.isnan(t) or t == 0:
        return t
    tail = t_upper_tail(abs(t), df)
    score = -NormalDist().inv_cdf(tail) if tail > 0.0 else math.inf
    return math.copysign(score, t)


def t_mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of a few independent units (e.g. one paired difference per training seed) with the
    Student-t interval, mean +- t_{n-1} * sd / sqrt(n). The check beside the crossed bootstrap:
    with ~12 seeds a percentile bootstrap of seed values is too narrow (it resamples the 12
    values it saw), and the t-interval carries the small-sample width."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"t_mean_ci: need a 1-D sequence of >= 2 units, got shape {x.shape}")
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    half = t_quantile_at_normal(z, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    m = float(x.mean())
    return Interval(m, m - half, m + half, level)


def _z(alpha: float, power: float) -> float:
    nd = NormalDist()
    return nd.inv_cdf(1.0 - alpha / 2.0) + nd.inv_cdf(power)


def min_detectable_effect(sd_diff: float, units: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired test at `alpha` detects with
    probability `power`, given the standard deviation of one unit's difference and the number
    of independent units (normal approximation: (z_{1-alpha/2} + z_power) * sd / sqrt(n))."""
    if units < 1 or sd_diff < 0:
        raise ValueError(f"min_detectable_effect: units >= 1 and sd_diff >= 0, got {units}, {sd_diff}")
    return _z(alpha, power) * sd_diff / math.sqrt(units)


def units_for_effect(sd_diff: float, effect: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """How many independent units (seeds, or problems) make `effect` detectable (the inverse of
    `min_detectable_effect`, rounded up)."""
    if effect <= 0:
        raise ValueError(f"units_for_effect: effect must be > 0, got {effect}")
    return max(1, math.ceil((_z(alpha, power) * sd_diff / effect) ** 2))

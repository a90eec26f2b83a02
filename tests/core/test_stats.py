"""Intervals and power (e3rl.core.stats) against normal theory and simulated coverage."""
import math
from statistics import NormalDist

import numpy as np
import pytest

from e3rl.core.stats import (bootstrap_mean_ci, crossed_bootstrap_mean_ci, min_detectable_effect, t_mean_ci,
                             units_for_effect)


def test_bootstrap_interval_matches_normal_theory_on_many_problems():
    rng = np.random.default_rng(1)
    acc = rng.binomial(4, rng.uniform(0, 1, size=400), size=400) / 4  # 400 problems x k=4 samples
    ci = bootstrap_mean_ci(acc, resamples=20_000)
    half = 1.96 * acc.std(ddof=1) / math.sqrt(len(acc))
    assert ci.mean == pytest.approx(acc.mean())
    assert (ci.high - ci.low) / 2 == pytest.approx(half, rel=0.08)
    assert ci.low < ci.mean < ci.high


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    p = rng.beta(0.7, 1.5, size=100_000)  # a population of problem difficulties
    truth = p.mean()
    hits = 0
    for trial in range(300):
        drawn = rng.choice(p, size=100)
        acc = rng.binomial(4, drawn) / 4  # unbiased per problem: E[binomial(4, p) / 4] = p
        ci = bootstrap_mean_ci(acc, resamples=2000, seed=trial)
        hits += ci.low <= truth <= ci.high
    assert 0.90 <= hits / 300 <= 0.99, hits / 300


def test_paired_differences_see_an_effect_that_separate_intervals_cannot():
    """Same problems under two methods: difficulty dominates the spread, the method adds +0.05.
    Separate intervals overlap; the interval of the per-problem differences excludes 0."""
    rng = np.random.default_rng(3)
    difficulty = rng.uniform(0.05, 0.95, size=200)
    a = np.clip(difficulty + rng.normal(0, 0.05, size=200), 0, 1)
    b = np.clip(difficulty + 0.05 + rng.normal(0, 0.05, size=200), 0, 1)
    ca, cb = bootstrap_mean_ci(a), bootstrap_mean_ci(b)
    assert ca.high > cb.low  # overlap
    d = bootstrap_mean_ci(b - a)
    assert d.excludes_zero() and d.low > 0.03


def test_crossed_bootstrap_accounts_for_the_seed_effect():
    """Paired differences between two trainings: a seed effect shared by every problem of a run
    (sd 0.08, the spread measured across seeds), what is left of problem difficulty after pairing
    (sd 0.1) and sampling noise. Resampling problems alone treats the seeds as fixed and
    undercovers badly; resampling seeds and problems covers near the nominal 95% (a little under:
    6 seeds are few for a bootstrap)."""
    rng = np.random.default_rng(4)
    seeds, problems, trials = 6, 60, 200
    crossed_hits = flat_hits = 0
    for trial in range(trials):
        table = rng.normal(0, 0.08, size=(seeds, 1)) + rng.normal(0, 0.1, size=(1, problems)) \
            + rng.normal(0, 0.2, size=(seeds, problems))  # true mean 0
        c = crossed_bootstrap_mean_ci(table, resamples=1000, seed=trial)
        f = bootstrap_mean_ci(table.mean(axis=0), resamples=1000, seed=trial)  # problems only
        crossed_hits += c.low <= 0 <= c.high
        flat_hits += f.low <= 0 <= f.high
    assert crossed_hits / trials >= 0.85, crossed_hits / trials
    assert flat_hits / trials <= 0.75, flat_hits / trials


def test_min_detectable_effect_is_the_normal_power_formula_and_has_that_power():
    z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)
    assert min_detectable_effect(0.1, 16) == pytest.approx(z * 0.1 / 4)
    assert units_for_effect(0.1, min_detectable_effect(0.1, 16)) == 16
    assert units_for_effect(0.11, 0.05) == math.ceil((z * 0.11 / 0.05) ** 2)  # 38 seeds for 5 points at sd 0.11
    # simulated paired experiments with the true effect at the MDE: a two-sided z-test rejects ~80%
    rng = np.random.default_rng(5)
    n, sd = 40, 0.11
    effect = min_detectable_effect(sd, n)
    d = rng.normal(effect, sd, size=(4000, n))
    rejected = np.abs(d.mean(axis=1) / (sd / math.sqrt(n))) > NormalDist().inv_cdf(0.975)
    assert 0.77 <= rejected.mean() <= 0.83, rejected.mean()


@pytest.mark.parametrize("call", [
    lambda: bootstrap_mean_ci([0.5]),
    lambda: crossed_bootstrap_mean_ci([[0.1, 0.2]]),
    lambda: min_detectable_effect(0.1, 0),
    lambda: units_for_effect(0.1, 0.0),
])
def test_degenerate_inputs_raise(call):
    with pytest.raises(ValueError):
        call()


def test_t_interval_of_seed_means_matches_the_t_table():
    """mean +- t_{0.975, n-1} sd / sqrt(n); t_{0.975, 4} = 2.7764451 and t_{0.975, 11} = 2.2009852
    (standard tables), so small seed counts get wider intervals than the normal 1.96."""
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    ci = t_mean_ci(x)
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)
    assert (ci.mean, ci.low, ci.high) == pytest.approx((3.0, 3.0 - half, 3.0 + half), abs=1e-6)
    y = np.random.default_rng(5).normal(0.05, 0.07, size=12)
    c12 = t_mean_ci(y)
    assert (c12.high - c12.low) / 2 == pytest.approx(2.2009852 * y.std(ddof=1) / math.sqrt(12), rel=1e-6)
    with pytest.raises(ValueError, match=">= 2 units"):
        t_mean_ci([0.1])

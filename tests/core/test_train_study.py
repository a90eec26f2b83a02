"""The training study's pure parts: pairing by seed and problem, the comparison's numbers against
direct computation, trends from a run's metrics, and which comparisons are made."""
from __future__ import annotations

import statistics

import numpy as np
import pytest

from e3rl.config import ConfigError
from e3rl.core.stats import bootstrap_mean_ci, crossed_bootstrap_mean_ci, min_detectable_effect
from e3rl.train_study import (compare_pair, compare_scalar, default_pairs, paired_table, parse_pairs, run_trends,
                               slope)


def test_paired_table_keeps_the_seeds_both_variants_finished_and_subtracts_per_problem():
    a = {0: [1.0, 0.5], 1: [0.0, 0.25], 3: [1.0, 1.0]}
    b = {1: [0.5, 0.25], 0: [0.75, 0.0], 2: [0.0, 0.0]}
    seeds, table = paired_table(a, b)
    assert seeds == [0, 1] and table == [[0.25, 0.5], [-0.5, 0.0]]
    with pytest.raises(ValueError, match="seed 0 has 2 vs 3 problems"):
        paired_table({0: [1.0, 0.0]}, {0: [1.0, 0.0, 0.0]})


def test_compare_pair_is_the_crossed_bootstrap_of_the_paired_table_with_its_mde():
    rng = np.random.default_rng(1)
    a = {s: list(rng.random(30)) for s in range(5)}
    b = {s: list(rng.random(30)) for s in range(5)}
    c = compare_pair(a, b, seed=3)
    seeds, table = paired_table(a, b)
    assert c["seeds"] == [0, 1, 2, 3, 4]
    assert c["difference"] == crossed_bootstrap_mean_ci(table, seed=3)
    per_seed = [float(np.mean(np.subtract(a[s], b[s]))) for s in seeds]
    assert c["per_seed"] == pytest.approx(per_seed)
    assert c["seed_sd"] == pytest.approx(statistics.stdev(per_seed))
    assert c["mde"] == pytest.approx(min_detectable_effect(statistics.stdev(per_seed), 5))
    assert c["mean_a"] - c["mean_b"] == pytest.approx(c["difference"].mean)


def test_compare_pair_with_one_common_seed_gives_means_but_no_interval():
    c = compare_pair({0: [1.0, 0.0], 1: [1.0, 1.0]}, {0: [0.0, 0.0]})
    assert c["seeds"] == [0] and c["per_seed"] == [0.5]
    assert c["difference"] is None and c["mde"] is None and c["mean_a"] == 0.5 and c["mean_b"] == 0.0


def test_slope_is_the_least_squares_fit():
    ys = [2.0, 1.7, 1.9, 1.2, 1.0]
    assert slope(ys) == pytest.approx(np.polyfit(np.arange(5), ys, 1)[0])
    assert slope([3.0]) == 0.0


def test_run_trends_count_erased_tokens_and_follow_entropy_over_steps():
    steps = [{"step": 1, "gen/tokens_produced": 100.0, "gen/samples": 16.0, "learner/entropy": 2.0,
              "learner/logp_diff_mean": 1e-4},
             {"step": 2, "gen/tokens_produced": 120.0, "gen/samples": 16.0, "learner/entropy": 1.5,
              "learner/logp_diff_mean": 3e-4}]
    t = run_trends(steps)
    assert t["tokens_generated"] == 220.0 and t["samples"] == 32.0
    assert (t["entropy_first"], t["entropy_last"], t["entropy_slope"]) == (2.0, 1.5, pytest.approx(-0.5))
    assert t["logp_diff_mean"] == pytest.approx(2e-4)


def test_default_pairs_compare_with_grpo_and_at_equal_tokens_with_grpo_given_one_more_step():
    assert default_pairs(["grpo", "erase1", "erase5", "grpo_plus1"]) == [
        ("erase1", "grpo"), ("erase5", "grpo"), ("erase5", "grpo_plus1")]
    assert default_pairs(["erase1", "erase5"]) == []
    # test-time healing evaluated too: test time only, training given test time, everywhere vs nowhere
    assert default_pairs(["grpo", "erase5"], test_time_heal=True) == [
        ("erase5", "grpo"), ("grpo+heal", "grpo"), ("erase5+heal", "grpo+heal"), ("erase5+heal", "grpo")]
    assert parse_pairs("erase5:grpo, erase1:grpo", ["grpo", "erase1", "erase5"]) == [("erase5", "grpo"),
                                                                                      ("erase1", "grpo")]
    with pytest.raises(ConfigError, match="--pairs: 'erase3:grpo' is not variant:variant"):
        parse_pairs("erase3:grpo", ["grpo", "erase5"])


def test_compare_scalar_pairs_one_number_per_run_by_seed():
    c = compare_scalar({0: -0.10, 1: -0.05, 2: -0.20, 5: 1.0}, {0: -0.02, 1: -0.04, 2: -0.08})
    assert c["seeds"] == [0, 1, 2] and c["per_seed"] == pytest.approx([-0.08, -0.01, -0.12])
    assert c["difference"] == bootstrap_mean_ci(c["per_seed"])
    assert compare_scalar({0: 1.0}, {0: 0.5})["difference"] is None

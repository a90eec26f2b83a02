"""Pass@k / Avg@k against the closed form and brute-force enumeration."""
from __future__ import annotations

import itertools
import math

import pytest

from e3rl.core.passk import aggregate, avg_at_k, benchmark_metrics, flatten, pass_at_k


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_closed_form_and_enumeration(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            closed = 1 - math.comb(n - c, k) / math.comb(n, k)
            subsets = list(itertools.combinations(samples, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_known_values_and_large_n_is_stable():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(10, 6, 5) == 1.0  # fewer wrong samples (4) than k
    # C(2000, 1000) overflows a float; the product form does not.
    closed = 1 - math.comb(1990, 1000) / math.comb(2000, 1000)
    assert pass_at_k(2000, 10, 1000) == pytest.approx(closed, rel=1e-9)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)


def test_avg_at_k_is_mean_accuracy_and_pass1_equals_it():
    samples = [1, 0, 0, 1, 1, 0, 0, 0]
    assert avg_at_k(samples) == 0.375
    assert pass_at_k(8, 3, 1) == pytest.approx(avg_at_k(samples))
    with pytest.raises(ValueError):
        avg_at_k([])


def test_aggregate_per_benchmark():
    results = [
        ("aime24", [1.0, 0.0, 0.0, 0.0]),   # c=1
        ("aime24", [0.0, 0.0, 0.0, 0.0]),   # c=0
        ("math500", [1.0, 1.0, 0.0, 1.0]),  # c=3
    ]
    m = aggregate(results, ks=[1, 2, 4])
    assert list(m) == ["aime24", "math500"]
    assert m["aime24"]["n_problems"] == 2
    assert m["aime24"]["pass@1"] == pytest.approx((0.25 + 0.0) / 2)
    assert m["aime24"]["pass@2"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["aime24"]["pass@4"] == pytest.approx(0.5)
    assert m["aime24"]["avg@4"] == pytest.approx(0.125)
    assert m["math500"]["pass@2"] == pytest.approx(1.0)
    assert m["math500"]["avg@4"] == pytest.approx(0.75)
    flat = flatten(m)
    assert flat["eval/math500/avg@4"] == pytest.approx(0.75)
    assert len(flat) == 2 * 5


def test_benchmark_metrics_threshold_and_k_check():
    m = benchmark_metrics([[0.9, 0.2], [0.5, 0.49]], ks=[1], threshold=0.5)
    assert m["pass@1"] == pytest.approx(0.5)
    assert benchmark_metrics([[1, 0], [1, 0, 0, 0]], ks=[1])["avg"] == pytest.approx(0.375)
    with pytest.raises(ValueError, match="k=\\[4\\] exceeds"):
        benchmark_metrics([[1, 0, 0, 0], [1, 0]], ks=[1, 4])

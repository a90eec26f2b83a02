"""Evaluation metrics over n sampled answers per problem: unbiased Pass@k and Avg@k.

Pass@k uses the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained
on Code"): with n samples of which c are correct, pass@k = 1 - C(n-c, k) / C(n, k), the chance
that k samples drawn without replacement contain a correct one. The binomials overflow for large
n, so it is computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k for one problem with n samples, c of them correct (needs k <= n)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_budget(n: int, c: int, m: float) -> float:
    """Pass@ at a fractional number of samples 0 <= m <= n: the budget that draws ceil(m) samples
    with probability m - floor(m), else floor(m), spends m samples' tokens in expectation, and
    its Pass@ is linear between the two unbiased values (Pass@0 = 0: no sample, no answer).
    (Healing's extra tokens are rarely a whole number of plain samples; rounding the plain budget
    up would favour plain sampling, and a healed sample may even cost less than a plain one.)"""
    if not 0 <= m <= n:
        raise ValueError(f"pass_at_budget: need 0 <= m <= n, got n={n}, m={m}")
    lo = int(np.floor(m))
    frac = m - lo
    low = pass_at_k(n, c, lo) if lo >= 1 else 0.0
    return low if frac == 0 else (1 - frac) * low + frac * pass_at_k(n, c, lo + 1)


def avg_at_k(correct: Sequence[float]) -> float:
    """Avg@k: mean accuracy over the k samples of one problem (an estimate of pass@1)."""
    if len(correct) == 0:
        raise ValueError("avg_at_k: no samples")
    return float(np.mean(np.asarray(correct, dtype=np.float64)))


def count_correct(scores: Sequence[float], threshold: float = 1.0) -> int:
    """Samples whose score reaches `threshold` count as correct: full credit by default. Pass 0/1
    correctness (`Trajectory.correct`), not a shaped training reward."""
    return int(np.sum(np.asarray(scores, dtype=np.float64) >= threshold))


def benchmark_metrics(per_problem: Sequence[Sequence[float]], ks: Sequence[int],
                      threshold: float = 1.0) -> dict[str, float]:
    """Pass@k for each k and Avg@n, averaged over the problems of one benchmark.

    `per_problem[p]` holds the 0/1 correctness of problem p's n samples (n may differ between problems;
    each k must be <= the smallest n). Keys: "pass@{k}", "avg@{n}" (n = samples per problem,
    e.g. avg@32; plain "avg" if the counts differ) and "n_problems".
    """
    if not per_problem:
        raise ValueError("benchmark_metrics: no problems")
    n_min = min(len(s) for s in per_problem)
    too_big = [k for k in ks if k > n_min]
    if too_big:
        raise ValueError(f"benchmark_metrics: k={too_big} exceeds the fewest samples per problem "
                         f"({n_min}); sample more or drop those k")
    out: dict[str, float] = {"n_problems": float(len(per_problem))}
    for k in ks:
        out[f"pass@{k}"] = float(np.mean([pass_at_k(len(s), count_correct(s, threshold), k)
                                          for s in per_problem]))
    accuracies = [avg_at_k(np.asarray(s, dtype=np.float64) >= threshold) for s in per_problem]
    sizes = {len(s) for s in per_problem}
    out[f"avg@{sizes.pop()}" if len(sizes) == 1 else "avg"] = float(np.mean(accuracies))
    return out


def aggregate(results: Iterable[tuple[str, Sequence[float]]], ks: Sequence[int],
              threshold: float = 1.0) -> dict[str, dict[str, float]]:
    """Metrics per benchmark from (benchmark name, one problem's sample correctness) pairs."""
    grouped: dict[str, list[Sequence[float]]] = {}
    for bench, scores in results:
        grouped.setdefault(bench, []).append(scores)
    return {bench: benchmark_metrics(rows, ks, threshold) for bench, rows in sorted(grouped.items())}


def flatten(metrics: Mapping[str, Mapping[str, float]], prefix: str = "eval") -> dict[str, float]:
    """{"aime24": {"pass@1": x}} -> {"eval/aime24/pass@1": x}, for namespaced metric logging."""
    return {f"{prefix}/{bench}/{key}": v for bench, m in metrics.items() for key, v in m.items()}

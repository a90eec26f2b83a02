"""Held-out evaluation through the same generator actors as training (so it scales the same way):
k samples per problem with evaluation's sampling settings (`eval.*`, else the training ones), Avg@k and unbiased Pass@k per benchmark,
with test-time self-healing on or off."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import ray

from e3rl.core.passk import aggregate
from e3rl.tasks.base import Problem

EVAL_GROUP_BASE = 1 << 40  # eval group ids never collide with training ones


@dataclass
class EvalSet:
    name: str
    problems: list[Problem]
    prompts: list[list[int]]


def default_ks(k: int) -> list[int]:
    return sorted({1, *[x for x in (2, 4, 8, 16, 32, 64) if x <= k], k})


def sample_rows(generators: Any, es: EvalSet, k: int, heal: bool, seed: int = 0,
                sampling: Optional[dict] = None) -> tuple[list[list[Any]], dict]:
    """k samples of every problem of `es` -> (one row of k trajectories per problem, the rollout's
    stats). `sampling` overrides the generators' temperature / top_p / top_k (`Config.eval_sampling`).
    Held-out problems never leak into training: sampling does not update the generators'
    threshold history (only training steps do)."""
    groups = [EVAL_GROUP_BASE + i for i in range(len(es.problems))]
    rollout = generators.generate(es.problems, es.prompts, groups, group_size=k, heal=heal, seed=seed,
                                  sampling=sampling)
    trajs = [t for part in ray.get(rollout.refs) for t in part]
    return [trajs[i * k:(i + 1) * k] for i in range(len(es.problems))], rollout.stats


def evaluate(generators: Any, sets: Sequence[EvalSet], k: int, heal: bool, seed: int = 0,
             sampling: Optional[dict] = None) -> dict[str, Any]:
    """-> {"<set>": {"avg@k": .., "pass@1": .., ..., "rewinds_per_sample": ..}, ...}."""
    results: dict[str, Any] = {}
    for es in sets:
        if not es.problems:
            continue
        rows, stats = sample_rows(generators, es, k, heal, seed, sampling)
        per_problem = [[float(t.correct) for t in row] for row in rows]
        metrics = aggregate([(es.name, scores) for scores in per_problem], default_ks(k))[es.name]
        metrics |= {"rewinds_per_sample": stats["e3rl/rewinds_per_sample"], "samples": stats["gen/samples"],
                    "kept_len_mean": stats["gen/kept_len_mean"]}
        results[es.name] = metrics
    return results

def headline(results: dict[str, Any], k: int) -> float:
    """Mean Avg@k over benchmarks: the one held-out number the progress bar shows."""
    vals = [m[f"avg@{k}"] for m in results.values() if f"avg@{k}" in m]
    return sum(vals) / len(vals) if vals else float("nan")

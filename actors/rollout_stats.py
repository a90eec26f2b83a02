"""Small per-batch summaries of trajectories, computed where the trajectories are (the generator
actor), so the driver gets numbers without fetching payloads from the object store."""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from e3rl.core.dynamic_sampling import GroupOutcome
from e3rl.core.threshold import first_attempt_mask
from e3rl.core.trajectory import Trajectory

# segment means and the count each is taken over (merged weighted by it; plotted only where it is > 0)
MEAN_COUNTS = {"e3rl/u_kept_mean": "e3rl/segments_kept", "e3rl/u_erased_mean": "e3rl/segments_erased",
               "e3rl/threshold_mean": "e3rl/segments_judged", "e3rl/first_erase_rate": "e3rl/first_attempts"}
_SUMMED = ("gen/samples", "gen/tokens_produced", "gen/tokens_kept", "gen/forward_tokens", "e3rl/compactions",
           "e3rl/segments_kept", "e3rl/segments_erased", "e3rl/segments_judged", "e3rl/first_attempts",
           "reward/timeouts", "reward/errors",
           "gen/rewind_requests", "gen/rewind_recomputed_tokens", "gen/prefix_tokens", "gen/prefix_cached_tokens",
           "gen/engine_requests")
_MAXED = ("gen/seconds", "gen/peak_kv_bytes")
_MINNED = ("gen/policy_version_min",)  # the oldest weights any trajectory was sampled with


def segment_stats(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """Composite uncertainty of kept vs erased segments and the mean threshold they were judged against
    (a segment judged without a reference has threshold inf and is left out of the threshold mean)."""
    kept, erased, taus = [], [], []
    for t in trajs:
        s = t.segments
        for u, tau, e in zip(s.uncertainty.tolist(), s.threshold.tolist(), s.erased.tolist()):
            if math.isfinite(u):
                (erased if e else kept).append(u)
            if math.isfinite(tau):
                taus.append(tau)

    out = {"e3rl/segments_kept": float(len(kept)), "e3rl/segments_erased": float(len(erased)),
           "e3rl/segments_judged": float(len(taus))}
    for key, xs in (("e3rl/u_kept_mean", kept), ("e3rl/u_erased_mean", erased), ("e3rl/threshold_mean", taus)):
        if xs:  # a mean over nothing is left out, not written as 0
            out[key] = sum(xs) / len(xs)
    return out


def rollout_stats(trajs: Sequence[Trajectory], seconds: float, peak_kv_bytes: int = 0) -> dict[str, float]:
    n = max(len(trajs), 1)
    produced = sum(int(t.stream_ids.numel()) for t in trajs)
    kept = sum(int(t.kept_mask.sum()) for t in trajs)
    out = {
        "gen/samples": float(len(trajs)),
        "gen/reward_mean": sum(t.reward for t in trajs) / n,
        "gen/tokens_produced": float(produced),
        "gen/tokens_kept": float(kept),
        "gen/kept_len_mean": kept / n,
        "gen/forward_tokens": float(sum(t.forward_tokens for t in trajs)),
        "gen/seconds": seconds,
        "gen/tokens_per_s": produced / max(seconds, 1e-9),
        "gen/peak_kv_bytes": float(peak_kv_bytes),
        "e3rl/rewinds_per_sample": sum(t.rewinds for t in trajs) / n,
        "e3rl/erased_token_frac": (produced - kept) / max(produced, 1),
        "e3rl/compactions": float(sum(t.compactions for t in trajs)),
    }
    if trajs:
        out["gen/policy_version_min"] = float(min(t.policy_version for t in trajs))
    for reason, c in Counter(t.finish_reason for t in trajs).items():
        out[f"gen/finish_{reason}"] = c / n
    return out | segment_stats(trajs) | first_attempt_erase_rate(trajs)


ENGINE_KEYS = {"requests": "gen/engine_requests", "rewind_requests": "gen/rewind_requests",
               "rewind_recomputed_tokens": "gen/rewind_recomputed_tokens", "prefix_tokens": "gen/prefix_tokens",
               "cached_tokens": "gen/prefix_cached_tokens"}
"""A round-based engine's (vLLM's) counters, as summed metrics."""


def engine_stats(counters: dict) -> dict[str, float]:
    """The engine's prefix-cache counters as metrics, with the ratios derived from them."""
    out = {m: float(counters[k]) for k, m in ENGINE_KEYS.items() if k in counters}
    return out | _engine_ratios(out)


def _engine_ratios(s: dict[str, float]) -> dict[str, float]:
    """`gen/recomputed_tokens_per_rewind`: prompt tokens a request that resubmits an erased
    segment's prefix did not find in the prefix cache (below one KV block when rewinds are free);
    `gen/prefix_cache_hit`: the fraction of all resubmitted prompt tokens served from the cache."""
    out = {}
    if s.get("gen/rewind_requests"):
        out["gen/recomputed_tokens_per_rewind"] = s["gen/rewind_recomputed_tokens"] / s["gen/rewind_requests"]
    if s.get("gen/prefix_tokens"):
        out["gen/prefix_cache_hit"] = s["gen/prefix_cached_tokens"] / s["gen/prefix_tokens"]
    return out


def merge_stats(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Combine per-shard stats: counts add, peaks and seconds take the max (parallel), the oldest
    policy version the min, means are weighted by samples (or by their own segment count)."""
    total = sum(p.get("gen/samples", 0.0) for p in parts) or 1.0
    out: dict[str, float] = {}
    for key in set().union(*parts) if parts else ():
        if key in _MAXED:
            out[key] = max(p.get(key, 0.0) for p in parts)
        elif key in _MINNED:
            out[key] = min(p[key] for p in parts if key in p)
        elif key.startswith(_SUMMED):
            out[key] = sum(p.get(key, 0.0) for p in parts)
        elif key in MEAN_COUNTS:
            w = [p.get(MEAN_COUNTS[key], 0.0) for p in parts]
            out[key] = sum(p.get(key, 0.0) * x for p, x in zip(parts, w)) / (sum(w) or 1.0)
        else:
            out[key] = sum(p.get(key, 0.0) * p.get("gen/samples", 0.0) for p in parts) / total
    if parts:
        out["gen/tokens_per_s"] = out["gen/tokens_produced"] / max(out["gen/seconds"], 1e-9)
    return out | _engine_ratios(out)


def merge_rounds(rounds: Sequence[dict[str, float]]) -> dict[str, float]:
    """Combine the merged stats of consecutive generation rounds of one step: as `merge_stats`, but
    the rounds ran one after another, so their seconds add; `gen/recovered_shards` (a running
    count) is the last round's. One round's stats come back as they are."""
    if len(rounds) == 1:
        return dict(rounds[0])
    out = merge_stats(rounds)
    if rounds:
        out["gen/seconds"] = sum(r.get("gen/seconds", 0.0) for r in rounds)
        out["gen/tokens_per_s"] = out["gen/tokens_produced"] / max(out["gen/seconds"], 1e-9)
        if "gen/recovered_shards" in rounds[-1]:
            out["gen/recovered_shards"] = rounds[-1]["gen/recovered_shards"]
    return out


FIRST_ATTEMPTS_KEY = "judged_first_attempts"
"""Stats key of the judged first attempts' (U, gap score) pairs (a list, not a metric): the driver
pops it to fold the threshold history once per training step, pooled over all generators."""


def judged_first_attempts(trajs: Sequence[Trajectory]) -> list[tuple[float, float]]:
    """(U, gap score) of every judged first attempt, kept or erased (`first_attempt_mask`; the score
    is nan without a reference), in trajectory order."""
    out: list[tuple[float, float]] = []
    for t in trajs:
        s = t.segments
        m = first_attempt_mask(s.threshold, s.erase_count)
        out += list(zip(s.uncertainty[m].tolist(), s.score[m].tolist()))
    return out


def first_attempt_erase_rate(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """`e3rl/first_erase_rate`: the fraction of first attempts judged against a reference (finite
    tau) that were erased (the rate 1 - Phi(heal.threshold_k) promises), with their count
    `e3rl/first_attempts`."""
    judged = erased = 0
    for t in trajs:
        s = t.segments
        m = first_attempt_mask(s.threshold, s.erase_count) & s.threshold.isfinite()
        judged += int(m.sum())
        erased += int((m & s.erased).sum())
    out = {"e3rl/first_attempts": float(judged)}
    if judged:
        out["e3rl/first_erase_rate"] = erased / judged
    return out


OUTCOMES_KEY = "group_outcomes"
"""Stats key of the scored groups' `GroupOutcome`s (a list, not a metric): the driver pops it to
choose the groups dynamic sampling trains."""


def group_outcomes(trajs: Sequence[Trajectory]) -> list[GroupOutcome]:
    """(group id, #correct, size) of every group, in order of first appearance."""
    counts: dict[int, list[int]] = {}
    for t in trajs:
        c = counts.setdefault(t.group_id, [0, 0])
        c[0] += int(t.correct)
        c[1] += 1
    return [GroupOutcome(g, correct, size) for g, (correct, size) in counts.items()]

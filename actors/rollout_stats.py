"""Small per-batch summaries of trajectories, computed where the trajectories are (the generator
actor), so the driver gets numbers without fetching payloads from the object store."""
from __future__ import annotations

from collections import Counter
from typing import Sequence

from e3rl.core.trajectory import Trajectory


def rollout_stats(trajs: Sequence[Trajectory], seconds: float) -> dict[str, float]:
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
        "e3rl/rewinds_per_sample": sum(t.rewinds for t in trajs) / n,
        "e3rl/erased_token_frac": (produced - kept) / max(produced, 1),
        "e3rl/compactions": float(sum(t.compactions for t in trajs)),
    }
    for reason, c in Counter(t.finish_reason for t in trajs).items():
        out[f"gen/finish_{reason}"] = c / n
    return out


def merge_stats(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Combine per-shard stats: counts add, means are sample-weighted, seconds take the max (parallel)."""
    total = sum(p.get("gen/samples", 0.0) for p in parts) or 1.0
    out: dict[str, float] = {}
    for key in set().union(*parts) if parts else ():
        vals = [(p.get(key, 0.0), p.get("gen/samples", 0.0)) for p in parts]
        if key in ("gen/seconds",):
            out[key] = max(v for v, _ in vals)
        elif key.startswith(("gen/samples", "gen/tokens_produced", "gen/tokens_kept", "gen/forward_tokens", "e3rl/compactions")):
            out[key] = sum(v for v, _ in vals)
        else:
            out[key] = sum(v * w for v, w in vals) / total
    if parts:
        out["gen/tokens_per_s"] = out["gen/tokens_produced"] / max(out["gen/seconds"], 1e-9)
    return out

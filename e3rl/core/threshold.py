"""The segment-level adaptive dynamic threshold, and the erase decision with its budgets.

For segment n of sample i in a group of G samples of one prompt:

  tau_group = mean_P(U_n) + k * std_P(U_n)       over the P peers that have closed segment n
  tau_hist  = m_ema + k * sqrt(v_ema)            EMA of *accepted* segments' U over the run
  tau_base  = (1 - h) * tau_group + h * tau_hist (group only / history only when one is missing)
  tau_i     = tau_base + c * spread * (b ** e_i - 1)

where e_i is how often sample i already erased segment n, b > 1 (exponential penalty), and
spread is the blended std (floored at 10% of |tau_base| so a group of identical peers still
raises it). With neither peers nor history there is no reference: nothing is erased.

The decision `U > tau` is further gated by budgets: erases of this segment < B_seg and erases of
the trajectory < B_traj. Each erase consumes budget and each keep advances the stream, so a
decode loop that calls this terminates after at most (#segments + B_traj) segment closes, for
*any* surprisal sequence (NaN compares false: never erased; inf: erased while budget lasts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence

import torch


@dataclass(frozen=True)
class ThresholdParams:
    k: float = 1.0
    penalty_scale: float = 0.5
    penalty_base: float = 2.0
    history_weight: float = 0.5
    min_peers: int = 2


@dataclass(frozen=True)
class UncertaintyHistory:
    """EMA of accepted-segment uncertainty (mean, variance): the run's memory of 'normal'."""

    mean: float = 0.0
    var: float = 0.0
    count: int = 0
    decay: float = 0.95

    def update(self, values: Iterable[float]) -> "UncertaintyHistory":
        m, v, n = self.mean, self.var, self.count
        for x in values:
            if not math.isfinite(x):
                continue
            if n == 0:
                m, v = x, 0.0
            else:
                d = x - m
                m = m + (1 - self.decay) * d
                v = self.decay * (v + (1 - self.decay) * d * d)
            n += 1
        return replace(self, mean=m, var=v, count=n)

    @staticmethod
    def merge(histories: Sequence["UncertaintyHistory"]) -> "UncertaintyHistory":
        """Count-weighted pooling of several generators' histories (mixture mean and variance)."""
        live = [h for h in histories if h.count > 0]
        if not live:
            return histories[0] if histories else UncertaintyHistory()
        n = sum(h.count for h in live)
        m = sum(h.mean * h.count for h in live) / n
        v = sum((h.var + (h.mean - m) ** 2) * h.count for h in live) / n
        return replace(live[0], mean=m, var=v, count=n)


def segment_threshold(
    peer_u: torch.Tensor, erase_count: int, history: UncertaintyHistory, p: ThresholdParams
) -> float:
    """tau for one sample's segment n. peer_u: [P] U_n of the group's samples that closed n."""
    peer_u = peer_u.float()
    peer_u = peer_u[torch.isfinite(peer_u)]
    group = None
    if peer_u.numel() >= p.min_peers:
        sd = float(peer_u.std(unbiased=False))
        group = (float(peer_u.mean()) + p.k * sd, sd)
    hist = None
    if history.count > 0:
        sd = math.sqrt(max(history.var, 0.0))
        hist = (history.mean + p.k * sd, sd)
    if group is None and hist is None:
        return math.inf
    if group is None or hist is None:
        base, spread = group or hist
    else:
        h = p.history_weight
        base = (1 - h) * group[0] + h * hist[0]
        spread = (1 - h) * group[1] + h * hist[1]
    spread = max(spread, 0.1 * abs(base), 1e-3)
    return base + p.penalty_scale * spread * (p.penalty_base ** erase_count - 1)


def should_erase(
    u: torch.Tensor,
    tau: torch.Tensor,
    segment_erases: torch.Tensor,
    traj_erases: torch.Tensor,
    max_per_segment: int,
    max_per_traj: int,
) -> torch.Tensor:
    """Erase decision for R closed segments. All inputs [R] -> bool [R]."""
    within = (segment_erases < max_per_segment) & (traj_erases < max_per_traj)
    return (u > tau) & within


def simulate_erase_loop(
    uncertainty_of: "callable",
    num_segments: int,
    history: UncertaintyHistory,
    p: ThresholdParams,
    max_per_segment: int,
    max_per_traj: int,
    peers: Optional[torch.Tensor] = None,
) -> tuple[int, int]:
    """Reference single-trajectory erase loop (what the generator does per row).

    `uncertainty_of(position, attempt)` yields the U of each attempt. Returns (closes, erases).
    """
    closes = erases = 0
    n = 0
    seg_erases = 0
    while n < num_segments:
        u = float(uncertainty_of(n, seg_erases))
        closes += 1
        tau = segment_threshold(peers if peers is not None else torch.tensor([u]), seg_erases, history, p)
        erase = should_erase(torch.tensor([u]), torch.tensor([tau]), torch.tensor([seg_erases]),
                             torch.tensor([erases]), max_per_segment, max_per_traj)
        if bool(erase):
            seg_erases += 1
            erases += 1
        else:
            history = history.update([u])
            n += 1
            seg_erases = 0
    return closes, erases

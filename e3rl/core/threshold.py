"""The segment-level adaptive dynamic threshold, the run's uncertainty history, and the erase
decision with its budgets.

For segment n of sample i in a group of G samples of one prompt, with the U_n of the n_o *other*
samples that have closed segment n (leave-one-out: a sample is never its own reference) and the
run history H (mean m_H, variance v_H of accepted segments' U, an EMA over training steps):

  center  = (1 - h) * mean(others) + h * m_H                     h = history_weight
  s2      = (SS(others) + nu * v_H) / (n_o - 1 + nu)              nu = spread_prior (0 without H)
  sd      = sqrt(s2 * (1 + (1 - h)^2 / n_o))                      spread of U_i - center
  tau     = center + t_{n_o - 1 + nu}(k) * sd + c * spread * (b ** e_i - 1)

t_df(k) is the Student-t quantile at the normal probability Phi(k), so that for i.i.d. segment
uncertainties the first-attempt erase rate is the nominal 1 - Phi(k) at every peer count: the
population z-score it replaces can never exceed sqrt(P - 1) (never above k = 1 with two peers),
and a leave-one-out std of one remaining peer is 0 (half of all segments erased). The history's
variance acts as `nu` pseudo-peers of spread, the floor that makes two-sample groups usable.
With fewer than `min_peers` samples, tau = m_H + k * sqrt(v_H) (history alone); with one other
sample and no history, or no reference at all, tau = inf (nothing is erased without a reference).
e_i is how often sample i already erased segment n (b > 1: exponential penalty), and spread is sd
floored at 10% of |tau| so a group of identical peers still raises the bar.

The decision `U > tau` is further gated by budgets: erases of this segment < B_seg and erases of
the trajectory < B_traj. Each erase consumes budget and each keep advances the stream, so a
decode loop that calls this terminates after at most (#segments + B_traj) segment closes, for
*any* surprisal sequence (NaN compares false: never erased; inf: erased while budget lasts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Optional

import torch

from e3rl.core.stats import t_quantile_at_normal


@dataclass(frozen=True)
class ThresholdParams:
    k: float = 1.0
    penalty_scale: float = 0.5
    penalty_base: float = 2.0
    history_weight: float = 0.5
    min_peers: int = 2
    spread_prior: float = 8.0


@dataclass(frozen=True)
class UncertaintyHistory:
    """The run's memory of 'normal' segment uncertainty: an EMA over training steps of the
    distribution (mean, variance) of accepted segments' U, and how many segments it has seen.

    One `update` per training step with every accepted segment of that step, pooled over all
    generators: the result depends neither on how the segments were split across generators nor
    on the order rows closed them (exactly rounded sums), and `count` grows by the step's segments.
    """

    mean: float = 0.0
    var: float = 0.0
    count: int = 0
    decay: float = 0.95

    def update(self, values: Iterable[float]) -> "UncertaintyHistory":
        """Fold one training step's accepted-segment uncertainties in (weight 1 - decay)."""
        xs = [float(x) for x in values if math.isfinite(x)]
        if not xs:
            return self
        n = len(xs)
        m_t = math.fsum(xs) / n
        v_t = math.fsum((x - m_t) ** 2 for x in xs) / n
        if self.count == 0:
            return replace(self, mean=m_t, var=v_t, count=n)
        d = self.decay
        m = d * self.mean + (1 - d) * m_t  # mixture of the old history (d) and this step (1 - d)
        v = d * (self.var + (self.mean - m) ** 2) + (1 - d) * (v_t + (m_t - m) ** 2)
        return replace(self, mean=m, var=v, count=self.count + n)


def segment_threshold(others_u: torch.Tensor, erase_count: int, history: UncertaintyHistory,
                      p: ThresholdParams) -> float:
    """tau for one sample's segment n. others_u: [n_o] U_n of the *other* group samples that closed n."""
    others = others_u.double()
    others = others[torch.isfinite(others)]
    n_o = others.numel() if others.numel() + 1 >= p.min_peers else 0
    has_hist = history.count > 0
    if n_o == 0:
        if not has_hist:
            return math.inf
        center, sd, k = history.mean, math.sqrt(max(history.var, 0.0)), p.k
    else:
        nu = p.spread_prior if has_hist else 0.0
        df = n_o - 1 + nu
        if df <= 0:
            return math.inf  # one other sample and no history: no spread to judge against
        m = float(others.mean())
        ss = float(((others - m) ** 2).sum())
        s2 = (ss + nu * max(history.var, 0.0)) / df
        h = p.history_weight if has_hist else 0.0
        center = (1 - h) * m + h * history.mean
        sd = math.sqrt(s2 * (1 + (1 - h) ** 2 / n_o))
        k = t_quantile_at_normal(p.k, df)
    tau = center + k * sd
    spread = max(sd, 0.1 * abs(tau), 1e-3)
    return tau + p.penalty_scale * spread * (p.penalty_base ** erase_count - 1)


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
    uncertainty_of: Callable[[int, int], float],
    num_segments: int,
    history: UncertaintyHistory,
    p: ThresholdParams,
    max_per_segment: int,
    max_per_traj: int,
    others: Optional[torch.Tensor] = None,
) -> tuple[int, int]:
    """Reference single-trajectory erase loop (what the generator does per row).

    `uncertainty_of(position, attempt)` yields the U of each attempt; `others` are the U of the
    other group samples at every position. Returns (closes, erases).
    """
    closes = erases = 0
    n = 0
    seg_erases = 0
    peers = others if others is not None else torch.empty(0)
    while n < num_segments:
        u = float(uncertainty_of(n, seg_erases))
        closes += 1
        tau = segment_threshold(peers, seg_erases, history, p)
        erase = should_erase(torch.tensor([u]), torch.tensor([tau]), torch.tensor([seg_erases]),
                             torch.tensor([erases]), max_per_segment, max_per_traj)
        if bool(erase):
            seg_erases += 1
            erases += 1
        else:
            n += 1
            seg_erases = 0
    return closes, erases


def accepted_mask(uncertainty: torch.Tensor, threshold: torch.Tensor, erased: torch.Tensor) -> torch.Tensor:
    """Segments the history learns from: judged (finite threshold) and kept because they passed it.

    Segments kept only because a budget ran out (U > tau), frozen at the stream cap or never
    judged (tau = inf), and erased attempts are left out, so defects never raise 'normal'.
    All inputs [S] -> bool [S].
    """
    return ~erased & torch.isfinite(threshold) & (uncertainty <= threshold)

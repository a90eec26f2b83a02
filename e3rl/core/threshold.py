"""The segment-level adaptive dynamic threshold, the run's uncertainty history, and the erase
decision with its budgets.

For segment n of sample i in a group of G samples of one prompt, with the U_n of the n_o *other*
samples that have closed segment n (leave-one-out: a sample is never its own reference) and the
run history H (mean m_H, variance v_H of judged first attempts' U, an EMA over training steps):

  center  = (1 - h) * mean(others) + h * m_H                     h = history_weight
  s2      = (SS(others) + nu * v_H) / (n_o - 1 + nu)              nu = spread_prior (0 without H)
  sd      = sqrt(s2 * (1 + (1 - h)^2 / n_o))                      spread of U_i - center
  tau     = center + t_{n_o - 1 + nu}(k*) * sd + c * spread * (b ** e_i - 1)

t_df(k*) is the Student-t quantile at the normal probability Phi(k*). For Gaussian i.i.d. segment
uncertainties and k* = k, the first-attempt erase rate is the nominal 1 - Phi(k) at every peer
count (the population z-score it replaces can never exceed sqrt(P - 1): never above k = 1 with two
peers). Surprisal-based U is right-skewed and the history's variance is no chi-square sample, so
the run calibrates k*: a first attempt crosses tau exactly when its gap score
Phi^-1(T_df((U - center) / sd)) exceeds k*, and the history keeps k* at an EMA of each step's
Phi(k) quantile of those scores (`UncertaintyHistory.cut`), which makes the erase rate
nominal for any distribution of U. Until a step judged with a history has been folded in, k* = k.
The history's variance acts as `nu` pseudo-peers of spread, the floor that makes two-sample groups
usable. With fewer than `min_peers` samples, tau = m_H + k* * sqrt(v_H) (history alone); with one
other sample and no history, or no reference at all, tau = inf (nothing is erased without one).
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
from statistics import NormalDist
from typing import Callable, Iterable, Optional, Sequence

import torch

from e3rl.core.stats import normal_score_of_t, t_quantile_at_normal


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
    """The run's memory of 'normal' segment uncertainty, an EMA over training steps of the judged
    first attempts: the distribution (mean, variance) of their U, and the calibrated cut on their
    gap scores (see `segment_threshold`) that makes the first-attempt erase rate 1 - Phi(k).

    Every judged first attempt enters, kept or erased: U is measured before the erase decision, so
    leaving out the erased ones would censor the sample at tau, bias the mean low and shrink the
    variance, and the lower tau would censor more (measured: erase rate 0.23-0.26 for a nominal
    0.159 at G = 8; at G = 2 the history never started and nothing was erased). Regenerated attempts never enter: they are judged against a raised tau.

    One `update` per training step, pooled over all generators: the result depends neither on how
    the segments were split across generators nor on the order rows closed them (exactly rounded
    sums, order-free quantiles), and `count` grows by the step's segments. The EMA weight of a step
    is max(1 - decay, 1 / steps seen) (an average until the EMA horizon is reached), so early steps
    are not dominated by the first.
    """

    mean: float = 0.0
    var: float = 0.0
    count: int = 0
    decay: float = 0.95
    steps: int = 0
    cut: float = math.nan  # calibrated normal-score cut; nan until a step judged with a history is seen
    cut_steps: int = 0

    def cut_for(self, k: float) -> float:
        """The cut the threshold uses: calibrated once the run has data for it, the nominal k before."""
        return self.cut if self.cut_steps > 0 and math.isfinite(self.cut) else k

    def update(self, values: Iterable[float], scores: Iterable[float] = (), k: float = 1.0) -> "UncertaintyHistory":
        """Fold one training step in: `values` the U of its judged first attempts, `scores` their gap
        scores (`gap_score`), `k` the nominal cut (target rate 1 - Phi(k)).

        Scores calibrate the cut only when this step was judged with a history (count > 0 before the
        fold): the first step's references are its peers alone, another scale than every later step's.
        """
        xs = [float(x) for x in values if math.isfinite(x)]
        if not xs:
            return self
        n = len(xs)
        m_t = math.fsum(xs) / n
        v_t = math.fsum((x - m_t) ** 2 for x in xs) / n
        seen = self.steps if self.steps or not self.count else 1 << 30  # saved before steps were counted
        w = max(1.0 - self.decay, 1.0 / (seen + 1))
        m = (1 - w) * self.mean + w * m_t  # mixture of the old history (1 - w) and this step (w)
        v = (1 - w) * (self.var + (self.mean - m) ** 2) + w * (v_t + (m_t - m) ** 2)
        out = replace(self, mean=m, var=v, count=self.count + n, steps=self.steps + 1)
        zs = sorted(float(z) for z in scores if not math.isnan(z))
        if self.count > 0 and zs:
            q_t = _upper_quantile(zs, 1.0 - NormalDist().cdf(k))
            wc = max(1.0 - self.decay, 1.0 / (self.cut_steps + 1))
            cut = q_t if self.cut_steps == 0 else (1 - wc) * self.cut + wc * q_t
            out = replace(out, cut=cut, cut_steps=self.cut_steps + 1)
        return out


def fold_first_attempts(history: UncertaintyHistory, first_attempts: Iterable[tuple[float, float]],
                        k: float) -> UncertaintyHistory:
    """The driver's once-per-step fold of (U, gap score) pairs of judged first attempts."""
    pairs = list(first_attempts)
    return history.update([u for u, _ in pairs], [z for _, z in pairs], k)


def _upper_quantile(sorted_xs: list, rate: float) -> float:
    """The value exceeded by a fraction `rate` of `sorted_xs` (linear interpolation between order
    statistics; +-inf scores sort to the ends and only matter when the rate reaches them)."""
    pos = (1.0 - rate) * (len(sorted_xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_xs) - 1)
    a, b = sorted_xs[lo], sorted_xs[hi]
    if not (math.isfinite(a) and math.isfinite(b)):
        return b if pos > lo else a
    return a + (pos - lo) * (b - a)


@dataclass(frozen=True)
class Reference:
    """What a segment is judged against: the center and spread of U_i - center, and the degrees of
    freedom of that spread (inf: known, from the history alone)."""

    center: float
    sd: float
    df: float


def segment_reference(others_u: Sequence[float] | torch.Tensor, history: UncertaintyHistory,
                      p: ThresholdParams) -> Optional[Reference]:
    """The reference for one sample's segment n. others_u: [n_o] U_n of the *other* group samples that
    closed n. None: no reference (tau = inf, nothing is erased). Plain floats: a generator judges
    every segment it closes, and a handful of peers is far cheaper in Python than in tensors."""
    values = others_u.tolist() if isinstance(others_u, torch.Tensor) else others_u
    others = [float(x) for x in values if math.isfinite(x)]
    n_o = len(others) if len(others) + 1 >= p.min_peers else 0
    has_hist = history.count > 0
    if n_o == 0:
        if not has_hist:
            return None
        return Reference(history.mean, math.sqrt(max(history.var, 0.0)), math.inf)
    nu = p.spread_prior if has_hist else 0.0
    df = n_o - 1 + nu
    if df <= 0:
        return None  # one other sample and no history: no spread to judge against
    m = math.fsum(others) / n_o
    ss = math.fsum((x - m) ** 2 for x in others)
    s2 = (ss + nu * max(history.var, 0.0)) / df
    h = p.history_weight if has_hist else 0.0
    return Reference((1 - h) * m + h * history.mean, math.sqrt(s2 * (1 + (1 - h) ** 2 / n_o)), df)


def threshold_from(ref: Optional[Reference], erase_count: int, cut: float, p: ThresholdParams) -> float:
    """tau = center + t_df(cut) * sd + c * spread * (b ** e - 1); inf without a reference."""
    if ref is None:
        return math.inf
    q = cut if math.isinf(ref.df) else t_quantile_at_normal(cut, ref.df)
    tau = ref.center + q * ref.sd
    spread = max(ref.sd, 0.1 * abs(tau), 1e-3)
    return tau + p.penalty_scale * spread * (p.penalty_base ** erase_count - 1)


def gap_score(u: float, ref: Optional[Reference]) -> float:
    """The normal score of U's gap to its reference: Phi^-1(T_df((U - center) / sd)); nan without a
    reference. A first attempt crosses tau exactly when its score exceeds the cut, so the cut's
    calibration is a quantile of these scores."""
    if ref is None or not math.isfinite(u):
        return math.nan
    if ref.sd <= 0:
        return math.copysign(math.inf, u - ref.center) if u != ref.center else 0.0
    return normal_score_of_t((u - ref.center) / ref.sd, ref.df)


def segment_threshold(others_u: torch.Tensor, erase_count: int, history: UncertaintyHistory,
                      p: ThresholdParams) -> float:
    """tau for one sample's segment n. others_u: [n_o] U_n of the *other* group samples that closed n."""
    return threshold_from(segment_reference(others_u, history, p), erase_count, history.cut_for(p.k), p)


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


def first_attempt_mask(threshold: torch.Tensor, erase_count: torch.Tensor) -> torch.Tensor:
    """Segments the history learns from: every judged first attempt (tau not nan), kept or erased,
    with a reference or without one (tau = inf: the first segments of a run, which start the
    history). Regenerations (judged against a raised tau) and segments never judged (frozen at the
    stream cap, a start that cannot be resumed, healing off: tau = nan) are left out.
    All inputs [S] -> bool [S]."""
    return ~torch.isnan(threshold) & (erase_count == 0)

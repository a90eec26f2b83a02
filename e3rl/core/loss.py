"""Policy losses over token streams (kept and erased tokens alike), picked by name from `LOSSES`.

Per token, r_t = exp(logp_t - old_logp_t), with old_logp = pi_old, the learner's log-probs at the
start of the training step (frozen across mini-batches and epochs).

clip (PPO/GRPO/DAPO):
    L_t = -min(r_t * A_t, clip(r_t, 1 - eps_low, 1 + eps_high) * A_t)   (clip-higher: eps_high > eps_low)
gspo (GSPO): one ratio per sequence, s_i = exp(mean_t log r_{i,t}), applied to every token as
    s_{i,t} = sg(s_i) * pi_t / sg(pi_t) (value s_i, gradient per token), clipped like above with a
    tiny eps (~3e-4 / 4e-4): L_t = -min(s_{i,t} * A_t, clip(s_{i,t}, 1 - eps_low, 1 + eps_high) * A_t)
sapo (SAPO): a soft gate instead of a hard clip, tau = tau_pos if A_t > 0 else tau_neg,
    L_t = -f(r_t) * A_t,   f(r) = sigmoid(tau * (r - 1)) * 4 / tau
    so dL_t/dlogp_t = -4 sig (1 - sig) r_t A_t: the plain policy gradient at r = 1, fading off-policy.

Truncated importance sampling (TIS), for the generator/learner mismatch: the policy part of L_t is
multiplied by the constant w_t = min(pi_old / pi_gen, cap) (`truncated_is_weight`).
Optional KL to a frozen reference, the k3 estimator: exp(ref - logp) - (ref - logp) - 1 (>= 0).

Aggregation with *global* denominators, so micro-batches and data-parallel ranks sum to exactly
the full-batch loss:
    token_mean:              sum_bt L / total_tokens                          (DAPO)
    seq_mean_token_mean:     sum_b (sum_t L / len_b) / total_seqs             (GRPO)
    seq_mean_token_sum_norm: sum_b (sum_t L / norm_len) / total_seqs          (Dr.GRPO)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class LossInputs:
    logp: torch.Tensor  # [B, T] log-probs of the current policy (grad flows)
    old_logp: torch.Tensor  # [B, T] pi_old: the learner's log-probs at the start of the step
    advantages: torch.Tensor  # [B, T] per-token advantages
    mask: torch.Tensor  # [B, T] 1 for trained tokens, 0 for padding
    ref_logp: Optional[torch.Tensor] = None  # [B, T] frozen reference, for the KL term
    is_weight: Optional[torch.Tensor] = None  # [B, T] TIS weights on the policy loss (a constant)


@dataclass(frozen=True)
class LossSettings:
    clip_low: float = 0.2
    clip_high: float = 0.28
    agg: str = "token_mean"
    kl_coef: float = 0.0
    norm_len: int = 1  # Dr.GRPO's constant length (max_new_tokens)
    total_tokens: Optional[float] = None  # global denominators; default: this batch's
    total_seqs: Optional[float] = None
    tau_pos: float = 1.0  # SAPO gate temperature for A > 0
    tau_neg: float = 1.05  # SAPO gate temperature for A <= 0


def aggregate(x: torch.Tensor, mask: torch.Tensor, s: LossSettings) -> torch.Tensor:
    """Reduce per-token values x [B, T] to a scalar with the configured global denominators."""
    m = mask.float()
    if s.agg == "token_mean":
        denom = s.total_tokens if s.total_tokens is not None else m.sum().clamp_min(1.0)
        return (x * m).sum() / denom
    seqs = s.total_seqs if s.total_seqs is not None else float(x.shape[0])
    if s.agg == "seq_mean_token_mean":
        per_seq = (x * m).sum(-1) / m.sum(-1).clamp_min(1.0)
    elif s.agg == "seq_mean_token_sum_norm":
        per_seq = (x * m).sum(-1) / float(s.norm_len)
    else:
        raise ValueError(f"loss aggregation must be token_mean|seq_mean_token_mean|seq_mean_token_sum_norm, got {s.agg!r}")
    return per_seq.sum() / seqs


def behaviour_logprobs(mode: str, old_logp: torch.Tensor, gen_logp: torch.Tensor) -> torch.Tensor:
    """pi_gen, the behaviour log-probs TIS corrects against: the generator's own (`generator`), or
    the learner's recompute (`recompute`: pi_gen = pi_old, TIS weights are 1 and no correction is
    made). `recompute` is for engines whose log-probs are not the sampling distribution's."""
    if mode == "generator":
        return gen_logp
    if mode == "recompute":
        return old_logp.detach()
    raise ValueError(f"behaviour log-probs: unknown mode {mode!r} (generator | recompute)")


def truncated_is_weight(old_logp: torch.Tensor, gen_logp: torch.Tensor, cap: float, mask: torch.Tensor) -> torch.Tensor:
    """TIS weights min(pi_old / pi_gen, cap) [B, T] in float32, 0 on masked-out tokens, detached.

    Corrects for the generator sampling from slightly different numbers than the learner computes
    (another kernel, dtype or weight version); the cap bounds the variance. The exponent is clamped
    at log(cap) before exp, so it cannot overflow.
    """
    if not cap > 0:
        raise ValueError(f"truncated importance sampling needs cap > 0, got {cap!r}")
    d = old_logp.detach().double() - gen_logp.detach().double()  # [B, T]
    w = d.clamp(max=math.log(cap)).exp()
    return torch.where(mask.detach() > 0, w, torch.zeros_like(w)).float()


def _clipped_objective(ratio: torch.Tensor, adv: torch.Tensor, s: LossSettings) -> tuple[torch.Tensor, torch.Tensor]:
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - s.clip_low, 1 + s.clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).float()
    return loss, was_clipped


def _with_kl(per_token: torch.Tensor, x: LossInputs, s: LossSettings) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ref_logp is None or s.kl_coef == 0:
        return per_token, torch.zeros_like(per_token)
    d = x.ref_logp - x.logp
    kl = d.exp() - d - 1
    return per_token + s.kl_coef * kl, kl


def _metrics(x: LossInputs, log_ratio: torch.Tensor, was_clipped: torch.Tensor, kl: torch.Tensor, s: LossSettings) -> dict:
    with torch.no_grad():
        m = x.mask.float()
        n = m.sum().clamp_min(1.0)
        lr = log_ratio.detach()
        return {
            "clip_frac": float((was_clipped * m).sum() / n),
            "approx_kl": float((((lr.exp() - 1) - lr) * m).sum() / n),  # k3 of old vs new
            "ratio_mean": float((lr.exp() * m).sum() / n),
            "ref_kl": float((kl.detach() * m).sum() / n),
            "tokens": float(n),
        }


def _finish(policy: torch.Tensor, log_ratio: torch.Tensor, clipped: torch.Tensor, x: LossInputs,
            s: LossSettings) -> tuple[torch.Tensor, dict]:
    """Shared tail: TIS weight on the policy part, then KL, aggregation and metrics."""
    if x.is_weight is not None:
        policy = policy * x.is_weight.detach()
    per_token, kl = _with_kl(policy, x, s)
    return aggregate(per_token, x.mask, s), _metrics(x, log_ratio, clipped, kl, s)


def clip_loss(x: LossInputs, s: LossSettings) -> tuple[torch.Tensor, dict]:
    log_ratio = (x.logp - x.old_logp) * x.mask
    per_token, was_clipped = _clipped_objective(log_ratio.exp(), x.advantages, s)
    return _finish(per_token, log_ratio, was_clipped, x, s)


def gspo_loss(x: LossInputs, s: LossSettings) -> tuple[torch.Tensor, dict]:
    m = x.mask.float()
    log_ratio = (x.logp - x.old_logp) * m
    seq_log_ratio = log_ratio.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)  # [B, 1]
    ratio = (seq_log_ratio.detach() + x.logp - x.logp.detach()).exp()  # value s, per-token gradient
    per_token, was_clipped = _clipped_objective(ratio, x.advantages, s)
    return _finish(per_token, seq_log_ratio.expand_as(log_ratio), was_clipped, x, s)


def sapo_loss(x: LossInputs, s: LossSettings) -> tuple[torch.Tensor, dict]:
    """SAPO: L_t = -sigmoid(tau (r - 1)) * 4 / tau * A_t, no hard clip.

    The gate keeps the fraction 4 sig (1 - sig) of the plain policy gradient (1 at r = 1), so
    `clip_frac` here is the token mean of 1 - 4 sig (1 - sig): the share of the gradient the gate
    removed (0 on-policy). The ratio's exponent is clamped at 20, where the gate is already flat.
    """
    log_ratio = (x.logp - x.old_logp) * x.mask
    ratio = log_ratio.clamp(max=20.0).exp()
    tau = torch.full_like(ratio, s.tau_neg).masked_fill(x.advantages > 0, s.tau_pos)  # [B, T]
    sig = torch.sigmoid(tau * (ratio - 1))
    per_token = -sig * (4.0 / tau) * x.advantages
    removed = (1 - 4 * sig * (1 - sig)).detach()
    return _finish(per_token, log_ratio, removed, x, s)


LOSSES: dict[str, Callable[[LossInputs, LossSettings], tuple[torch.Tensor, dict]]] = {
    "clip": clip_loss,
    "gspo": gspo_loss,
    "sapo": sapo_loss,
}

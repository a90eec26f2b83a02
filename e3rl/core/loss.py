"""Policy losses over token streams (kept and erased tokens alike), picked by name from `LOSSES`.

clip (PPO/GRPO/DAPO): per token, r = exp(logp - old_logp),
    L_t = -min(r * A_t, clip(r, 1 - eps_low, 1 + eps_high) * A_t)       (clip-higher: eps_high > eps_low)
gspo (GSPO): one ratio per sequence, s = exp(mean_t(logp - old_logp)), applied to every token as
    s_t = sg(s) * exp(logp_t - sg(logp_t)) so gradients flow per token; clipped like above.
Optional KL to a frozen reference, the k3 estimator: exp(ref - logp) - (ref - logp) - 1 (>= 0).

Aggregation with *global* denominators, so micro-batches and data-parallel ranks sum to exactly
the full-batch loss:
    token_mean:              sum_bt L / total_tokens                          (DAPO)
    seq_mean_token_mean:     sum_b (sum_t L / len_b) / total_seqs             (GRPO)
    seq_mean_token_sum_norm: sum_b (sum_t L / norm_len) / total_seqs          (Dr.GRPO)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class LossInputs:
    logp: torch.Tensor  # [B, T] log-probs of the current policy (grad flows)
    old_logp: torch.Tensor  # [B, T] behaviour log-probs from the generator
    advantages: torch.Tensor  # [B, T] per-token advantages
    mask: torch.Tensor  # [B, T] 1 for trained tokens, 0 for padding
    ref_logp: Optional[torch.Tensor] = None  # [B, T] frozen reference, for the KL term


@dataclass(frozen=True)
class LossSettings:
    clip_low: float = 0.2
    clip_high: float = 0.28
    agg: str = "token_mean"
    kl_coef: float = 0.0
    norm_len: int = 1  # Dr.GRPO's constant length (max_new_tokens)
    total_tokens: Optional[float] = None  # global denominators; default: this batch's
    total_seqs: Optional[float] = None


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


def clip_loss(x: LossInputs, s: LossSettings) -> tuple[torch.Tensor, dict]:
    log_ratio = (x.logp - x.old_logp) * x.mask
    ratio = log_ratio.exp()
    per_token, was_clipped = _clipped_objective(ratio, x.advantages, s)
    per_token, kl = _with_kl(per_token, x, s)
    return aggregate(per_token, x.mask, s), _metrics(x, log_ratio, was_clipped, kl, s)


def gspo_loss(x: LossInputs, s: LossSettings) -> tuple[torch.Tensor, dict]:
    m = x.mask.float()
    log_ratio = (x.logp - x.old_logp) * m
    seq_log_ratio = log_ratio.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)  # [B, 1]
    ratio = (seq_log_ratio.detach() + x.logp - x.logp.detach()).exp()  # value s, per-token gradient
    per_token, was_clipped = _clipped_objective(ratio, x.advantages, s)
    per_token, kl = _with_kl(per_token, x, s)
    return aggregate(per_token, x.mask, s), _metrics(x, seq_log_ratio.expand_as(log_ratio), was_clipped, kl, s)


LOSSES: dict[str, Callable[[LossInputs, LossSettings], tuple[torch.Tensor, dict]]] = {
    "clip": clip_loss,
    "gspo": gspo_loss,
}

"""Segment-level advantages: a group-relative outcome advantage per trajectory, allocated to its
segments, with erased segments credited on their own.

1. Outcome advantage per sample i of a group (rewards r [G]), computed in float64:
     GRPO:    A_i = (r_i - mean(r)) / (std(r) + eps)
     Dr.GRPO: A_i =  r_i - mean(r)
   A group whose rewards are all equal gets exactly A_i = 0 (no rounding residue).
2. Allocation over the K kept segment positions: weights w [K] with mean 1, so uniform weights
   give every token A_i (plain GRPO). Allocators:
     uniform:     w_n = 1
     attention:   the paper's causal retrospective allocation: the final-answer segment keeps an
                  equal share 1/K; the other (K-1)/K is split in proportion to the attention mass
                  the final-answer tokens put on each earlier segment;
     uncertainty: w ∝ softmax(sign(A) * -z(U)): credit flows to confident segments of a success
                  and blame to uncertain segments of a failure.
   then blended with uniform: w <- (1 - mix) + mix * w (keeps credit from collapsing to 1 segment).
3. Erased attempts at position n (defects the generator replaced) get, with A_n = A_i * w_n of
   the kept replacement:
     contrast: min(A_n, 0) - margin * |A_n|   (always below what replaced it)
     zero:     0                               (kept tokens alone carry the signal)
     same:     A_n                             (erasure structure ignored)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


def _zero_constant_groups(r: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """A group whose rewards are all equal carries no signal: its advantage is exactly 0. The mean of
    equal floats can miss them by an ulp (8 x 2/3), and that residue divided by a ~1e-8 std is not 0.
    r, a: [N, G] -> [N, G] float32."""
    constant = (r == r[..., :1]).all(-1, keepdim=True)  # [N, 1]
    return torch.where(constant, torch.zeros_like(a), a).float()


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[N, G] -> [N, G]: standardised within each group (population std, as in the GRPO paper's code)."""
    r = rewards.double()
    a = (r - r.mean(-1, keepdim=True)) / (r.std(-1, unbiased=False, keepdim=True) + eps)
    return _zero_constant_groups(r, a)


def drgrpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[N, G] -> [N, G]: centred only (Dr.GRPO removes the std that biases toward easy/hard groups)."""
    r = rewards.double()
    return _zero_constant_groups(r, r - r.mean(-1, keepdim=True))


ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
}


@dataclass(frozen=True)
class AllocationInputs:
    """What an allocator may read about one trajectory's K kept segment positions."""

    advantage: float
    uncertainty: torch.Tensor  # [K]
    attention_mass: Optional[torch.Tensor] = None  # [K] mass final-answer tokens put on each


def _normalise_mean_one(w: torch.Tensor) -> torch.Tensor:
    return w * (w.numel() / w.sum().clamp_min(1e-12))


def uniform_weights(x: AllocationInputs) -> torch.Tensor:
    return torch.ones_like(x.uncertainty, dtype=torch.float32)


def attention_weights(x: AllocationInputs) -> torch.Tensor:
    """Answer segment (last) keeps 1/K; earlier ones share (K-1)/K by attention mass."""
    k = x.uncertainty.numel()
    if k == 1 or x.attention_mass is None:
        return uniform_weights(x)
    mass = x.attention_mass.float()[: k - 1].clamp_min(0)
    share = mass / mass.sum() if mass.sum() > 0 else torch.full_like(mass, 1.0 / (k - 1))
    w = torch.cat([share * (k - 1) / k, mass.new_tensor([1.0 / k])])
    return _normalise_mean_one(w)


def uncertainty_weights(x: AllocationInputs) -> torch.Tensor:
    u = x.uncertainty.float()
    if u.numel() == 1 or x.advantage == 0:
        return uniform_weights(x)
    z = (u - u.mean()) / (u.std(unbiased=False) + 1e-6)
    sign = 1.0 if x.advantage > 0 else -1.0
    return _normalise_mean_one(torch.softmax(-sign * z, 0))


ALLOCATORS: dict[str, Callable[[AllocationInputs], torch.Tensor]] = {
    "uniform": uniform_weights,
    "attention": attention_weights,
    "uncertainty": uncertainty_weights,
}


def segment_weights(name: str, x: AllocationInputs, mix: float) -> torch.Tensor:
    """Allocator `name`, blended with uniform by `mix`; mean 1 over the K kept positions. -> [K]"""
    w = ALLOCATORS[name](x)
    return (1 - mix) + mix * w


def segment_advantages(
    advantage: float,
    kept_weights: torch.Tensor,
    seg_position: torch.Tensor,
    seg_erased: torch.Tensor,
    erased_credit: str,
    margin: float,
) -> torch.Tensor:
    """Advantage of every segment attempt of one trajectory.

    kept_weights: [K] per kept position; seg_position: [R] position n of each attempt;
    seg_erased: [R] bool. -> [R].
    """
    a_kept = advantage * kept_weights.float()[seg_position]  # [R]: A_n of the position's kept one
    if erased_credit == "contrast":
        a_erased = a_kept.clamp(max=0) - margin * a_kept.abs()
    elif erased_credit == "zero":
        a_erased = torch.zeros_like(a_kept)
    elif erased_credit == "same":
        a_erased = a_kept
    else:
        raise ValueError(f"erased_credit must be contrast|zero|same, got {erased_credit!r}")
    return torch.where(seg_erased, a_erased, a_kept)


def token_advantages(seg_adv: torch.Tensor, token_segment: torch.Tensor) -> torch.Tensor:
    """Spread segment advantages onto stream tokens. seg_adv [R], token_segment [S] -> [S]."""
    return seg_adv[token_segment]


def attention_mass_per_segment(
    attn: torch.Tensor, column_position: torch.Tensor, num_positions: int
) -> torch.Tensor:
    """Mass that answer queries put on each kept segment position.

    attn: [Q, T] attention probabilities (averaged over heads/layers) of the Q final-answer query
    tokens over the T stream columns; column_position: [T] kept position of each column, -1 for
    columns that are erased or outside the response. -> [K], averaged over queries.
    """
    valid = column_position >= 0
    idx = column_position.clamp_min(0)
    per_q = torch.zeros(attn.shape[0], num_positions, dtype=torch.float32, device=attn.device)
    per_q.index_add_(1, idx[valid], attn.float()[:, valid])
    return per_q.mean(0)

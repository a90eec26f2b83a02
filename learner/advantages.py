"""Per-token advantages for a batch of trajectories, assembled from the core's pieces.

1. Outcome advantage per trajectory: `ESTIMATORS[estimator]` over each whole group (group_id);
   groups may differ in size, so each is standardised on its own.
2. Segment weights over the K KEPT segment positions (`ALLOCATORS[allocation]`, blended by
   `mix`); the last kept segment is the answer segment. `attention` reads the attention mass the
   final `answer_tokens` kept tokens put on each kept segment (captured in the training forward).
3. `segment_advantages` credits erased attempts (contrast/zero/same), `token_advantages` spreads
   them onto stream tokens.
The outcome step needs whole groups, so it runs on the full batch (every rank sees it); steps
2-3 are per trajectory and run per micro-batch, after the forward that captured the attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from e3rl.config import Config
from e3rl.core.advantages import (ESTIMATORS, AllocationInputs, attention_mass_per_segment, segment_advantages,
                                  segment_weights, token_advantages)
from e3rl.core.trajectory import Trajectory


@dataclass(frozen=True)
class AdvantageSpec:
    estimator: str = "grpo"
    allocation: str = "uniform"
    mix: float = 0.5
    erased_credit: str = "contrast"
    margin: float = 0.5
    answer_tokens: int = 16

    @staticmethod
    def from_config(cfg: Config) -> "AdvantageSpec":
        a = cfg.algo
        return AdvantageSpec(a.estimator, cfg.allocation, a.alloc_mix, a.erased_credit, a.erased_margin, a.answer_tokens)

    @property
    def needs_attention(self) -> bool:
        return self.allocation == "attention"


def outcome_advantages(trajs: Sequence[Trajectory], estimator: str) -> torch.Tensor:
    """[N] group-relative outcome advantage of each trajectory, groups keyed by group_id."""
    out = torch.zeros(len(trajs))
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(trajs):
        groups.setdefault(t.group_id, []).append(i)
    for idx in groups.values():
        rewards = torch.tensor([[trajs[i].reward for i in idx]], dtype=torch.float32)  # [1, G]
        out[idx] = ESTIMATORS[estimator](rewards)[0]
    return out


def kept_rows(t: Trajectory) -> torch.Tensor:
    """[K] segment-table rows of the kept attempts, ordered by position (must be 0..K-1)."""
    seg = t.segments
    rows = torch.nonzero(~seg.erased, as_tuple=False).flatten()
    rows = rows[seg.position[rows].argsort()]
    if not torch.equal(seg.position[rows], torch.arange(rows.numel())):
        raise ValueError(f"trajectory {t.group_id}/{t.sample_index}: kept segment positions "
                         f"{seg.position[rows].tolist()} are not 0..K-1 — each position needs exactly one kept attempt")
    return rows


def column_positions(t: Trajectory) -> torch.Tensor:
    """[S] kept segment position of each stream token; -1 for erased tokens."""
    tok_seg = t.token_segment()  # [S]
    pos = t.segments.position[tok_seg.clamp_min(0)]
    return torch.where(t.kept_mask & (tok_seg >= 0), pos, torch.full_like(pos, -1))


def attention_mass(t: Trajectory, attn: torch.Tensor) -> torch.Tensor:
    """attn [Q, S] (answer queries over stream columns) -> [K] mass per kept position."""
    k = int((~t.segments.erased).sum())
    return attention_mass_per_segment(attn, column_positions(t), k)


def _kept_uncertainty(t: Trajectory, rows: torch.Tensor) -> torch.Tensor:
    """[K] uncertainty of kept segments; never-judged (nan) ones get the mean of the judged."""
    u = t.segments.uncertainty[rows].float()
    ok = torch.isfinite(u)
    fill = u[ok].mean() if ok.any() else torch.tensor(0.0)
    return torch.where(ok, u, fill)


def trajectory_token_advantages(t: Trajectory, advantage: float, spec: AdvantageSpec,
                                attn: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[S] per-token advantage of one trajectory; `attn` [Q, S] for the attention allocator."""
    s = t.stream_ids.numel()
    if s == 0 or len(t.segments) == 0:
        return torch.full((s,), float(advantage))
    rows = kept_rows(t)
    # A stream cut right after a rewind leaves erased positions with no kept replacement: weight 1.
    weights = torch.ones(int(t.segments.position.max()) + 1)  # [n_positions]
    if rows.numel() > 0:
        mass = attention_mass(t, attn) if (spec.needs_attention and attn is not None) else None
        x = AllocationInputs(advantage=float(advantage), uncertainty=_kept_uncertainty(t, rows), attention_mass=mass)
        weights[: rows.numel()] = segment_weights(spec.allocation, x, spec.mix)  # [K]
    seg_adv = segment_advantages(float(advantage), weights, t.segments.position, t.segments.erased,
                                 spec.erased_credit, spec.margin)  # [R]
    tok_seg = t.token_segment()
    adv = token_advantages(seg_adv, tok_seg.clamp_min(0))
    return torch.where(tok_seg >= 0, adv, torch.zeros_like(adv))  # tokens outside any segment: no credit


def batch_token_advantages(trajs: Sequence[Trajectory], outcome: torch.Tensor, spec: AdvantageSpec,
                           attn: Optional[Sequence[Optional[torch.Tensor]]] = None) -> list[torch.Tensor]:
    """Per-token advantages [S_i] of each trajectory; outcome [N] from `outcome_advantages`."""
    attn = attn if attn is not None else [None] * len(trajs)
    return [trajectory_token_advantages(t, float(a), spec, m) for t, a, m in zip(trajs, outcome, attn)]

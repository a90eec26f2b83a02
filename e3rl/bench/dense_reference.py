"""The stream batch as the core's rule states it: stream order and the dense [L, L] visibility mask.

The learner never builds this (see learner.stream_batch: kept-first rows, causal attention and the
erased rows' own visibility). It is the reference the learner's layout is tested against, and the
"before" of `python -m e3rl.bench lengths`: what the learner used to run (quadratic in L).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from e3rl.core.trajectory import additive_mask, predecessor_index, stream_attention_mask


@dataclass
class DenseBatch:
    input_ids: torch.Tensor  # [B, L] stream order, right-padded
    position_ids: torch.Tensor  # [B, L]
    attn_mask: torch.Tensor  # [B, 1, L, L] additive: the core's visibility rule; pad queries see themselves
    target_index: torch.Tensor  # [B, S] predecessor rows
    stream_ids: torch.Tensor  # [B, S]
    behavior_logp: torch.Tensor  # [B, S]
    mask: torch.Tensor  # [B, S]
    answer_index: torch.Tensor  # [B, Q] rows of the last kept tokens
    answer_valid: torch.Tensor  # [B, Q]


def dense_collate(trajs, pad_id: int = 0, answer_tokens: int = 16) -> DenseBatch:
    """The reference batch: stream order with the dense stream mask (quadratic, for tests only)."""
    b = len(trajs)
    lens = [t.prompt_ids.numel() + t.stream_ids.numel() for t in trajs]
    L, S, Q = max(lens), max(1, max(t.stream_ids.numel() for t in trajs)), max(1, answer_tokens)
    out = DenseBatch(torch.full((b, L), pad_id), torch.zeros(b, L, dtype=torch.long),
                     torch.eye(L, dtype=torch.bool).repeat(b, 1, 1), torch.zeros(b, S, dtype=torch.long),
                     torch.full((b, S), pad_id), torch.zeros(b, S), torch.zeros(b, S),
                     torch.zeros(b, Q, dtype=torch.long), torch.zeros(b, Q, dtype=torch.bool))
    for i, t in enumerate(trajs):
        p, s, n = t.prompt_ids.numel(), t.stream_ids.numel(), lens[i]
        out.input_ids[i, :n] = torch.cat([t.prompt_ids, t.stream_ids])
        out.position_ids[i, :n] = torch.cat([torch.arange(p), t.position_ids])
        out.attn_mask[i, :n, :n] = stream_attention_mask(p, t.erased_at)
        out.target_index[i, :s] = predecessor_index(p, t.erased_at)
        out.stream_ids[i, :s], out.behavior_logp[i, :s], out.mask[i, :s] = t.stream_ids, t.behavior_logp.float(), 1.0
        rows = torch.nonzero(t.kept_mask).flatten()[-Q:] + p
        out.answer_index[i, : rows.numel()], out.answer_valid[i, : rows.numel()] = rows, True
    out.attn_mask = additive_mask(out.attn_mask.unsqueeze(1))
    return out

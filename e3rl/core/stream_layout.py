"""The stream laid out kept-first: the visibility rule without an [L, L] mask.

`trajectory.stream_attention_mask` states the rule densely; at the paper's lengths (one row of
~11.8k tokens) that mask is ~0.3 GB in bf16 and forces the unfused attention kernel. Reordering a
row as `prompt, kept tokens, erased tokens` (each in stream order, position ids unchanged) makes
the rule cheap:

- a kept token saw exactly the prompt and the kept tokens before it (an erasure removes a suffix
  of what is visible, so an erased token before a kept one was erased before it was generated):
  in the new order that is plain causal attention, which fused kernels run without a mask;
- an erased token saw the prompt, the first `kept_before` kept tokens (a prefix of the kept
  block) and the erased tokens still visible when it was generated: one boolean row of length L
  per erased token ([E, L], linear in L since E is bounded by the erase budget).

The logits predicting a token sit at the last token it saw (its predecessor). Erased tokens
visible to an erased token come after all kept ones it saw (they are the suffix of its context),
so its predecessor is the last such erased token, else the last kept token before it, else the
prompt's end. Everything here is O(S + E^2), with no [S, S] tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KeptFirstLayout:
    """One prompt + stream row in kept-first order (positions in the new order are "rows")."""

    order: torch.Tensor  # [P+S] long: prompt+stream index of the token placed at each row
    stream_row: torch.Tensor  # [S] long: row of stream token k
    target_row: torch.Tensor  # [S] long: row whose logits predicted stream token k
    erased_vis: torch.Tensor  # [E, P+S] bool: keys (rows) each erased token saw, erased in stream order
    kept: int  # K: kept stream tokens; erased tokens occupy rows P+K .. P+S-1

    @property
    def erased_rows(self) -> torch.Tensor:  # [E] rows of the erased tokens
        n = self.order.numel()
        return torch.arange(n - self.erased_vis.shape[0], n)


def kept_first_layout(prompt_len: int, erased_at: torch.Tensor) -> KeptFirstLayout:
    """Reorder one row kept-first and state what each token saw (see the module docstring)."""
    p, s = prompt_len, erased_at.numel()
    kept = erased_at < 0
    kept_idx = torch.nonzero(kept).flatten()
    er_idx = torch.nonzero(~kept).flatten()
    k, e = kept_idx.numel(), er_idx.numel()
    stream_row = torch.empty(s, dtype=torch.long)
    stream_row[kept_idx] = p + torch.arange(k)
    stream_row[er_idx] = p + k + torch.arange(e)
    order = torch.cat([torch.arange(p), p + kept_idx, p + er_idx])

    target_row = torch.empty(s, dtype=torch.long)
    target_row[kept_idx] = p + torch.arange(k) - 1  # the previous kept token, or the prompt's end
    kept_before = (torch.cumsum(kept.long(), 0) - kept.long())[er_idx]  # [E]
    ea = erased_at[er_idx]
    saw = (er_idx[None, :] <= er_idx[:, None]) & (ea[None, :] > er_idx[:, None])  # [E, E]: a saw b
    earlier = torch.where(saw & ~torch.eye(e, dtype=torch.bool), torch.arange(e), torch.full((e, e), -1))
    last = earlier.max(1).values if e else torch.zeros(0, dtype=torch.long)
    target_row[er_idx] = torch.where(last >= 0, p + k + last, p + kept_before - 1)

    erased_vis = torch.zeros(e, p + s, dtype=torch.bool)
    erased_vis[:, : p + k] = torch.arange(p + k)[None, :] < (p + kept_before)[:, None]
    erased_vis[:, p + k :] = saw
    return KeptFirstLayout(order=order, stream_row=stream_row, target_row=target_row, erased_vis=erased_vis, kept=k)

"""KV-cache bookkeeping that makes erasing a segment an index write instead of a recompute.

Rows share one transformers `DynamicCache` with L physical columns. Each row owns:
- a visible mask over the columns (`mask[b, :L]`, 1 = attend): left padding and erased tokens
  are 0. An erased token's keys/values stay in the cache but can never be attended again;
- its next logical position (`pos[b]`) = number of visible columns: keys are stored post-RoPE
  at their logical positions, so a row that rewinds simply continues from the segment start.

Measured facts this relies on: the 2D mask must have exactly `L + q` columns
and explicit per-row `position_ids` are required next to the holes; sliding-window layers drop
columns and break the column bookkeeping, so they are refused.

Compaction gathers each row's visible columns, right-aligned and left-padded again, so memory and
attention cost stay proportional to the kept tokens; no token goes through the model again.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache


class RowCache:
    """One batch's shared cache + per-row visible mask and logical positions."""

    def __init__(self, prompt_mask: torch.Tensor, capacity: int, config=None):
        """prompt_mask: [B, P] left-padded (1 = real token); capacity: columns to reserve for decoding."""
        b, p = prompt_mask.shape
        self.cache = DynamicCache(config=config) if config is not None else DynamicCache()
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise ValueError("sliding-window attention drops cache columns; the rewindable generator needs full attention")
        # Preallocated so a decode step writes one column instead of re-allocating [B, L]
        self.mask = torch.zeros(b, p + capacity + 1, dtype=torch.long, device=prompt_mask.device)
        self.mask[:, :p] = prompt_mask.long()
        self.length = 0  # L: physical columns held in the cache
        self.prompt_width = p
        self.pos = self.mask[:, :p].sum(1)  # [B] next logical position

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    # ------------------------------------------------------------ forward inputs
    def prefill_inputs(self) -> dict:
        """Prompt forward: HF's own left-padding positions (cumsum - 1, pads at 0)."""
        m = self.mask[:, : self.prompt_width]
        position_ids = (m.cumsum(-1) - 1).masked_fill(m == 0, 0)
        return {"attention_mask": m, "position_ids": position_ids, "past_key_values": self.cache}

    def step_inputs(self) -> dict:
        """One-token decode step for every row: mask of exactly L + 1 columns, positions [B, 1]."""
        if self.length + 1 > self.mask.shape[1]:
            self.mask = torch.cat([self.mask, torch.zeros_like(self.mask)], 1)
        self.mask[:, self.length] = 1
        return {
            "attention_mask": self.mask[:, : self.length + 1],
            "position_ids": self.pos.unsqueeze(1),
            "past_key_values": self.cache,
        }

    def advance(self, q: int = 1) -> None:
        """Account for a forward that appended q columns (prefill: positions come from the mask)."""
        if self.length == 0:
            self.length = q
            return
        self.length += q
        self.pos += q

    # ------------------------------------------------------------ rewind / compaction
    def rewind(self, row: int, col: int, position: int) -> None:
        """Hide columns [col, L) of `row` and continue it from logical `position`. O(1) in the model."""
        self.mask[row, col : self.length] = 0
        self.pos[row] = position

    def visible(self) -> torch.Tensor:
        """[B] visible (attended) columns per row."""
        return self.mask[:, : self.length].sum(1)

    def free_columns(self) -> int:
        """Columns compaction would remove: L minus the longest row's visible count."""
        return self.length - int(self.visible().max()) if self.length else 0

    def compact(self, cols: torch.Tensor) -> torch.Tensor:
        """Gather each row's visible columns to the right, re-pad on the left.

        cols: [B] physical columns (<= L) to remap (e.g. open-segment starts); returns them in the
        new layout (a hidden column maps to where its next visible column lands).
        """
        length = self.length
        keep = self.mask[:, :length].bool()  # [B, L]
        n = keep.sum(1)  # [B]
        new_len = int(n.max())
        pad = new_len - n  # [B]
        rank = keep.long().cumsum(1) - 1  # [B, L]
        target = torch.where(keep, pad.unsqueeze(1) + rank, torch.full_like(rank, new_len))
        src = torch.arange(length, device=keep.device).expand_as(rank)
        index = torch.zeros(keep.shape[0], new_len + 1, dtype=torch.long, device=keep.device)
        index.scatter_(1, target, src)
        index = index[:, :new_len]  # [B, L2] source column of each new column
        for layer in self.cache.layers:
            idx = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = layer.keys.gather(2, idx)
            layer.values = layer.values.gather(2, idx)
        before = torch.cat([torch.zeros_like(n[:, None]), keep.long().cumsum(1)], 1)  # [B, L + 1]
        new_cols = pad + before.gather(1, cols.clamp(0, length).long().unsqueeze(1)).squeeze(1)
        self.mask.zero_()
        self.mask[:, :new_len] = torch.arange(new_len, device=keep.device).unsqueeze(0) >= pad.unsqueeze(1)
        self.length = new_len
        return new_cols

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (finished rows leave the batch, so no compute is spent on them)."""
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]
        self.pos = self.pos[rows]

    def nbytes(self) -> int:
        """Bytes held by the cached keys and values."""
        total = 0
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None:
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total

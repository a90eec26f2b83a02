"""A resumable, seeded stream of training prompts: epochs of permutations with a cursor.

Its state (epoch, index) is saved in checkpoints, so a resumed run sees the same prompts in the
same order as an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass
class PromptStream(Generic[T]):
    items: Sequence[T]
    batch_size: int
    seed: int = 0
    epoch: int = 0
    index: int = 0

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.items), generator=g).tolist()

    def next_batch(self) -> list[T]:
        """The next batch_size items; an epoch boundary continues into the next permutation."""
        if not self.items:
            raise ValueError("data.train: the training set is empty after filtering — widen the filters")
        out: list[T] = []
        order = self._order(self.epoch)
        while len(out) < self.batch_size:
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order(self.epoch)
            out.append(self.items[order[self.index]])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, s: dict) -> None:
        self.epoch, self.index = int(s.get("epoch", 0)), int(s.get("index", 0))

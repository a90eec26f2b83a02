"""What one rank measures during a training step, by name, and how ranks combine it.

Every field is a sum over this rank's micro-batches (token-weighted where it is a mean per token)
except those in `MAXED`, which are maxima. `all_reduce` packs the fields into one float64 tensor in
declaration order and reduces the sums and the maxima separately: two collectives per step.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, fields

import torch

MAXED = ("logp_diff_max",)


@dataclass
class StepSums:
    loss: float = 0.0  # sum of micro-batch losses (global denominators: sums to the mini-batch loss)
    clip_tokens: float = 0.0  # tokens clipped (SAPO: gradient share removed), summed
    approx_kl: float = 0.0  # k3(pi_old || pi) x tokens
    entropy: float = 0.0  # entropy summed over tokens
    logp_diff: float = 0.0  # |pi_old - pi_gen| summed over tokens
    tokens: float = 0.0  # trained tokens
    nonfinite: float = 0.0  # micro-batches whose loss was not finite
    ref_kl: float = 0.0  # k3 to the reference x tokens
    tis_weight: float = 0.0  # TIS weights summed over tokens (1 per token when off)
    real_tokens: float = 0.0  # prompt + stream tokens forwarded
    padded_tokens: float = 0.0  # the same, padding included
    logp_diff_max: float = 0.0  # max |pi_old - pi_gen|

    def add(self, other: "StepSums") -> None:
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, max(a, b) if f.name in MAXED else a + b)

    def all_reduce(self, world_size: int, device: torch.device) -> "StepSums":
        """Sums and maxima over all ranks (collective; a copy when world_size == 1)."""
        if world_size == 1:
            return StepSums(*astuple(self))
        import torch.distributed as dist

        names = [f.name for f in fields(self)]
        summed = torch.tensor([getattr(self, n) for n in names if n not in MAXED], dtype=torch.float64, device=device)
        maxed = torch.tensor([getattr(self, n) for n in names if n in MAXED], dtype=torch.float64, device=device)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
        values = iter(summed.tolist())
        maxima = iter(maxed.tolist())
        return StepSums(**{n: next(maxima) if n in MAXED else next(values) for n in names})

"""The counterfactual behind healing: at each erasure, the erased segment and its replacement
continue from the same prefix. Continuing both branches several times and scoring the endings
measures what the method assumes — that the replacement leads to right answers more often than
the segment it threw away.

`erasure_branches` reads them off a healed trajectory: for every erased attempt, the stream
tokens the model saw when that attempt began (the prefix: every earlier token not yet erased),
the erased attempt's tokens, and the tokens of the attempt finally kept at the same position.
Positions with no kept attempt (the stream ended first) give no branch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from e3rl.core.trajectory import Trajectory


@dataclass(frozen=True)
class ErasureBranch:
    """One erased attempt and the replacement kept at its position, after the same prefix."""

    position: int  # logical segment index
    attempt: int  # erasures of this position before the erased attempt
    prefix: list[int]  # stream tokens visible when the attempt began (the prompt excluded)
    erased: list[int]
    replacement: list[int]
    uncertainty: float  # the erased attempt's composite U
    threshold: float  # the tau it crossed


def visible_before(traj: Trajectory, i: int) -> torch.Tensor:
    """Stream tokens visible at stream index `i` (those before it, not erased by then)."""
    ea = traj.erased_at[:i]
    return traj.stream_ids[:i][(ea < 0) | (ea > i)]


def erasure_branches(traj: Trajectory) -> list[ErasureBranch]:
    seg = traj.segments
    kept = {int(seg.position[r]): r for r in range(len(seg)) if not bool(seg.erased[r])}
    out = []
    for r in range(len(seg)):
        if not bool(seg.erased[r]):
            continue
        n = int(seg.position[r])
        if n not in kept:
            continue
        start, end = int(seg.start[r]), int(seg.end[r])
        k = kept[n]
        out.append(ErasureBranch(
            position=n, attempt=int(seg.erase_count[r]),
            prefix=visible_before(traj, start).tolist(),
            erased=traj.stream_ids[start:end].tolist(),
            replacement=traj.stream_ids[int(seg.start[k]):int(seg.end[k])].tolist(),
            uncertainty=float(seg.uncertainty[r]), threshold=float(seg.threshold[r])))
    return out

"""DAPO dynamic sampling (arXiv 2503.14476, §3.2), the selection part.

A group whose samples are all correct or all wrong has zero advantage under any group-relative
estimator: it costs a forward/backward pass and contributes no gradient. Dynamic sampling drops
such groups and generates more prompts until `need` informative groups (0 < #correct < G) are
collected. Correctness is `Trajectory.correct` (full credit from the verifier), never the shaped
reward: shaping can make an all-wrong group's rewards differ without making any sample right.

When the generation rounds run out first, the batch is topped up with zero-variance groups, so
a step always trains `need` groups (it never hangs or fails); the caller logs and counts that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

REFILL_SEED_STRIDE = 1 << 32
"""Seed offset per refill round: steps (the low part of a step seed) never reach it."""


@dataclass(frozen=True)
class GroupOutcome:
    """How one prompt group of a generation round was judged."""

    group_id: int
    correct: int  # samples judged correct (`Trajectory.correct`)
    size: int  # samples in the group (G)

    @property
    def informative(self) -> bool:
        return 0 < self.correct < self.size


@dataclass(frozen=True)
class Selection:
    """Which groups a step trains. Every generated group is counted in exactly one of
    kept / fallback / dropped / discarded."""

    train: tuple[int, ...]  # group ids to train: informative ones in generation order, then fallback ones
    samples: int  # trajectories in the trained groups
    kept: int  # informative groups trained
    fallback: int  # zero-variance groups trained because too few informative ones were generated
    dropped: int  # zero-variance groups not trained
    discarded: int  # informative groups beyond `need` (surplus of the last round)


def informative_groups(outcomes: Sequence[GroupOutcome]) -> int:
    return sum(o.informative for o in outcomes)


def select_groups(outcomes: Sequence[GroupOutcome], need: int) -> Selection:
    """The first `need` informative groups (generation order); if there are fewer, the first
    zero-variance groups fill the batch up to `need` (or to all groups, if fewer were generated)."""
    if need < 1:
        raise ValueError(f"select_groups: need must be >= 1, got {need}")
    ids = [o.group_id for o in outcomes]
    if len(set(ids)) != len(ids):
        raise ValueError("select_groups: a group id occurs twice — group ids must be unique across the "
                         "generation rounds of a step (advantages are computed per group id)")
    informative = [o for o in outcomes if o.informative]
    uniform = [o for o in outcomes if not o.informative]
    kept = informative[:need]
    fill = uniform[:need - len(kept)]
    chosen = kept + fill
    return Selection(train=tuple(o.group_id for o in chosen), samples=sum(o.size for o in chosen),
                     kept=len(kept), fallback=len(fill), dropped=len(uniform) - len(fill),
                     discarded=len(informative) - len(kept))


def round_seed(step_seed: int, round_: int) -> int:
    """Sampling seed of generation round `round_` of a step: round 0 keeps the step's seed, refill
    rounds get seeds no other (step, round) of the run has."""
    return step_seed + round_ * REFILL_SEED_STRIDE


def round_group_ids(step: int, round_: int, rounds_per_step: int, n: int) -> list[int]:
    """Group ids of the `n` prompts of round `round_` of `step`: unique across all rounds of all
    steps; with one round per step they are `step * n + i`."""
    first = (step * rounds_per_step + round_) * n
    return list(range(first, first + n))

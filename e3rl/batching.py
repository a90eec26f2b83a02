"""A training step's batch, collected over one or more generation rounds.

Without dynamic sampling: one round, every group trained. With it (DAPO, `algo.dynamic_sampling`):
groups whose samples are all correct or all wrong carry no gradient and are dropped; more rounds,
each a full batch of new prompts from the stream (as verl's DAPO recipe does), are generated until
`algo.prompts_per_step` informative groups are collected or `algo.max_refill_rounds` extra rounds
are spent, and then zero-variance groups fill the batch (logged, counted). Which groups train is
`e3rl.core.dynamic_sampling.select_groups`.

Payloads never pass through the driver: a shard whose groups are only partly trained is filtered
where it is, by a small Ray task, into a new object; the buffer counts exactly what is trained.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import ray

from actors.rollout_stats import merge_rounds
from e3rl.core.dynamic_sampling import Selection, informative_groups, round_seed, select_groups

if TYPE_CHECKING:
    from e3rl.config import Config

log = logging.getLogger(__name__)

NextBatch = Callable[[int, int], tuple[list, list, list]]  # (step, round) -> (problems, prompt ids, group ids)
Timer = Callable[[str], ContextManager[None]]  # phase name -> a context that times it


@dataclass(frozen=True)
class DynamicSampling:
    """How a step collects its batch, fixed at setup (`from_config`). The default is off."""

    enabled: bool = False
    groups: int = 1  # informative groups a step trains (algo.prompts_per_step)
    max_refill_rounds: int = 0

    @staticmethod
    def from_config(cfg: Config) -> DynamicSampling:
        a = cfg.algo
        return DynamicSampling(a.dynamic_sampling, a.prompts_per_step, a.max_refill_rounds)

    @property
    def rounds(self) -> int:
        """The most generation rounds a step may use (group ids of a step are spaced by it)."""
        return 1 + self.max_refill_rounds if self.enabled else 1


@dataclass
class Batch:
    """What one step trains, and what generating it cost."""

    refs: list  # [ObjectRef] of trajectory lists holding exactly the trained groups
    trained_samples: int
    generated_samples: int  # every round's samples, dropped groups included
    first_attempts: list  # (U, gap score) of every round's judged first attempts, folded into the history once
    metrics: dict[str, float]  # gen/… and reward/… over all rounds; dynamic/… when enabled

    @property
    def policy_version(self) -> int:
        """The oldest policy version any of its trajectories was sampled with (what staleness is)."""
        return int(self.metrics["gen/policy_version_min"])


def collect_batch(generators: Any, next_batch: NextBatch, step: int, step_seed: int, sampling: DynamicSampling,
                  timer: Timer = lambda phase: nullcontext()) -> Batch:
    """Generate round after round (round r samples with `round_seed(step_seed, r)`) until the step
    has its groups; `generators` is an `actors.generator_group.GeneratorGroup`."""
    rounds: list[Any] = []  # [Rollout]
    for r in range(sampling.rounds):
        with timer("data"):
            problems, prompts, groups = next_batch(step, r)
        with timer("generate"):
            rounds.append(generators.generate(problems, prompts, groups, seed=round_seed(step_seed, r)))
        if not sampling.enabled or informative_groups(_outcomes(rounds)) >= sampling.groups:
            break
    stats = merge_rounds([ro.stats for ro in rounds])
    first = [x for ro in rounds for x in ro.first_attempts]
    generated = int(stats["gen/samples"])
    if not sampling.enabled:
        return Batch(rounds[0].refs, generated, generated, first, stats)
    sel = select_groups(_outcomes(rounds), sampling.groups)
    if sel.fallback:
        _warn_fallback(step, sel, len(rounds), sampling, stats.get("reward/accuracy", float("nan")))
    metrics = stats | {"dynamic/rounds": float(len(rounds)), "dynamic/kept_groups": float(sel.kept),
                       "dynamic/dropped_groups": float(sel.dropped), "dynamic/discarded_groups": float(sel.discarded),
                       "dynamic/fallback_groups": float(sel.fallback), "dynamic/trained_samples": float(sel.samples)}
    return Batch(_trained_refs(rounds, set(sel.train)), sel.samples, generated, first, metrics)


def _outcomes(rounds: list[Any]) -> list:
    return [o for ro in rounds for o in ro.groups]


@ray.remote(num_cpus=0)  # every CPU is reserved by the actors: a task asking for one would never start
def _keep_groups(trajs: list, group_ids: list[int]) -> list:
    """The trajectories of `group_ids`, as a new object in the store (Ray resolves `trajs` here)."""
    keep = set(group_ids)
    return [t for t in trajs if t.group_id in keep]


def _trained_refs(rounds: list[Any], train: set[int]) -> list:
    """One ref per shard that holds trained groups: the shard's own when all of it trains, else
    a filtered copy."""
    out = []
    for ro in rounds:
        for ref, groups in zip(ro.refs, ro.outcomes):
            ids = [o.group_id for o in groups if o.group_id in train]
            if len(ids) == len(groups):
                out.append(ref)
            elif ids:
                out.append(_keep_groups.remote(ref, ids))
    return out


def _warn_fallback(step: int, sel: Selection, rounds: int, sampling: DynamicSampling, accuracy: float) -> None:
    log.warning("dynamic sampling, step %d: only %d of %d groups had mixed outcomes after %d generation rounds "
                "(algo.max_refill_rounds=%d, reward/accuracy %.2f); %d all-correct/all-wrong groups fill the batch "
                "and add no gradient — raise algo.max_refill_rounds, or train on prompts nearer the policy's level",
                step + 1, sel.kept, sampling.groups, rounds, sampling.max_refill_rounds, accuracy, sel.fallback)

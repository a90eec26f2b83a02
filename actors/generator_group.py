"""The generator group: N generator actors behind one object; one call fans a batch out and
gathers the results.

- Placement: one bundle per actor ({CPU, GPU} from `resources`) in a placement group, refused
  with a clear line if the cluster cannot hold it (never pending forever).
- Sharding: whole prompt groups go to one actor (thresholds and advantages are group-relative).
- Threshold history: the group owns the run's one history and sends it with every call; a
  training step's judged first attempts, pooled over all actors (and over all generation rounds of
  the step), are folded in once (`fold_history`), so N actors hold exactly what one actor that
  saw every segment would.
- Faults: an actor that dies mid-rollout is restarted by Ray (`max_restarts`); the group reloads
  the current weights into it and regenerates exactly the lost shard with the same seed (and the
  same history), so every prompt is generated once and only once per step, and the regenerated
  shard is the one the dead actor would have returned.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.generator_actor import make_generator_actor
from actors.rollout_stats import FIRST_ATTEMPTS_KEY, OUTCOMES_KEY, merge_stats
from e3rl.config import Config
from e3rl.core.dynamic_sampling import GroupOutcome
from e3rl.core.threshold import UncertaintyHistory, fold_first_attempts
from e3rl.placement import bundles_per_node, reserve_bundles
from e3rl.tasks.base import Problem

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One `generate` call's results. Payloads stay in the object store; the rest is small."""

    refs: list  # [ObjectRef] of trajectory lists, one per non-empty shard
    stats: dict[str, float]  # merged over shards (`gen/…`, `e3rl/…`, `reward/…`)
    outcomes: list[list[GroupOutcome]]  # per ref: its groups' outcomes, in order ([] when unscored)
    first_attempts: list  # (U, gap score) of the judged first attempts, pooled over shards

    @property
    def groups(self) -> list[GroupOutcome]:
        return [o for shard in self.outcomes for o in shard]


def shard(n_items: int, n_shards: int) -> list[range]:
    """Contiguous, balanced index ranges (the first ones one longer)."""
    q, r = divmod(n_items, n_shards)
    out, start = [], 0
    for i in range(n_shards):
        size = q + (1 if i < r else 0)
        out.append(range(start, start + size))
        start += size
    return out


class GeneratorGroup:
    def __init__(self, cfg: Config, runtime_env: Optional[dict] = None, placement_timeout_s: float = 60.0,
                 max_restarts: int = 3):
        r = cfg.resources
        self.cfg = cfg
        self.max_restarts = max_restarts
        bundle = {"CPU": r.cpus_per_generator, "GPU": r.gpus_per_generator, **r.generator_resources}
        self.pg = reserve_bundles([bundle] * r.num_generators, r.placement_strategy, placement_timeout_s,
                                  role="generators", fields="resources.num_generators / resources.cpus_per_generator")
        share = bundles_per_node(self.pg)
        self.actors = [
            make_generator_actor(
                cfg, num_gpus=r.gpus_per_generator, num_cpus=r.cpus_per_generator, seed=cfg.run.seed * 1000 + i,
                max_restarts=max_restarts, runtime_env=runtime_env, threads_share=share[i],
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            )
            for i in range(r.num_generators)
        ]
        self._weights: tuple[Any, int] | None = None
        self.reload: Optional[Callable[[int], None]] = None  # set by a collective weight sync
        self.history = UncertaintyHistory(decay=cfg.heal.history_decay)
        self.threshold_k = cfg.heal.threshold_k
        self.recovered_shards = 0

    def load_weights(self, weights_ref: Any, version: int, which: Optional[Sequence[int]] = None) -> None:
        """Every actor (or those in `which`) loads the same object-store copy (Ray fans it out,
        across nodes too)."""
        self._weights = (weights_ref, version)
        which = range(len(self.actors)) if which is None else which
        calls = {i: self.actors[i].load_weights.remote(weights_ref, version) for i in which}
        for i, call in calls.items():
            try:
                ray.get(call)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                self.wait_alive([i])  # died while loading: Ray restarts it, and it loads again
                ray.get(self.actors[i].load_weights.remote(weights_ref, version))

    def generate(self, problems: Sequence[Problem], prompts: Sequence[list[int]], group_ids: Sequence[int],
                 group_size: Optional[int] = None, heal: Optional[bool] = None,
                 seed: Optional[int] = None, sampling: Optional[dict] = None) -> Rollout:
        """One fan-out and gather; every actor is handed the same history. The history is left
        alone: a training step folds its judged first attempts in with `fold_history`, once (evaluation
        never does: held-out problems never shape training thresholds)."""
        shards = shard(len(problems), len(self.actors))
        calls = {}
        for i, s in enumerate(shards):
            if len(s):
                calls[i] = self._submit(i, s, problems, prompts, group_ids, group_size, heal, seed, sampling)
        refs, stats = [], []
        for i, (traj_ref, stats_ref) in calls.items():
            for attempt in range(self.max_restarts + 1):
                try:
                    stats.append(ray.get(stats_ref))
                    refs.append(traj_ref)
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                    if attempt == self.max_restarts:
                        raise
                    log.warning("generator %d died mid-rollout (%s); regenerating its shard", i, type(e).__name__)
                    self.recovered_shards += 1
                    self._revive(i)
                    traj_ref, stats_ref = self._submit(i, shards[i], problems, prompts, group_ids, group_size, heal,
                                                       seed, sampling)
        first = [x for s in stats for x in s.pop(FIRST_ATTEMPTS_KEY, [])]
        outcomes = [s.pop(OUTCOMES_KEY, []) for s in stats]
        merged = merge_stats(stats) | {"gen/recovered_shards": float(self.recovered_shards)}
        return Rollout(refs, merged, outcomes, first)

    def fold_history(self, first_attempts: Sequence[tuple[float, float]]) -> None:
        """One EMA step of the threshold history with a training step's judged first attempts."""
        self.history = fold_first_attempts(self.history, first_attempts, self.threshold_k)

    def _revive(self, i: int, timeout_s: float = 300.0) -> None:
        """Wait until Ray has restarted actor i, then give it the current weights: the state the
        dead one had (the history comes with each call). The collective sync sets `reload`."""
        self.wait_alive([i], timeout_s)
        if self.reload is not None:
            self.reload(i)
        elif self._weights is not None:
            ray.get(self.actors[i].load_weights.remote(*self._weights))

    def wait_alive(self, which: Sequence[int], timeout_s: float = 300.0) -> None:
        """Until Ray has restarted the actors `which` that died (calls fail with ActorUnavailableError meanwhile)."""
        deadline = time.monotonic() + timeout_s
        for i in which:
            while True:
                try:
                    ray.get(self.actors[i].policy_version.remote())
                    break
                except ray.exceptions.ActorUnavailableError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    def _submit(self, i: int, s: range, problems, prompts, group_ids, group_size, heal, seed, sampling=None):
        a = self.actors[i]
        return a.generate.remote([prompts[j] for j in s], [group_ids[j] for j in s], [problems[j].uid for j in s],
                                 [problems[j] for j in s], group_size, heal,
                                 None if seed is None else seed * 1009 + i, self.history, sampling)

    def torch_threads(self) -> list[int]:
        """Each generator's torch intra-op threads (see e3rl.models.actor_threads)."""
        return ray.get([a.torch_threads.remote() for a in self.actors])

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

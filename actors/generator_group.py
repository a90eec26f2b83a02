"""The generator group: N generator actors behind one object; one call fans a batch out and
gathers the results.

- Placement: one bundle per actor ({CPU, GPU} from `resources`) in a placement group, refused
  with a clear line if the cluster cannot hold it (never pending forever).
- Sharding: whole prompt groups go to one actor (thresholds and advantages are group-relative).
- Faults: an actor that dies mid-rollout is restarted by Ray (`max_restarts`); the group reloads
  the current weights and the pooled threshold history into it and regenerates exactly the lost
  shard with the same seed, so every prompt is generated once and only once per step, and the
  regenerated shard is the one the dead actor would have returned.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.generator_actor import make_generator_actor
from actors.rollout_stats import merge_stats
from e3rl.config import Config
from e3rl.core.threshold import UncertaintyHistory
from e3rl.placement import reserve_bundles
from e3rl.tasks.base import Problem

log = logging.getLogger(__name__)


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
        self.actors = [
            make_generator_actor(
                cfg, num_gpus=r.gpus_per_generator, num_cpus=r.cpus_per_generator, seed=cfg.run.seed * 1000 + i,
                max_restarts=max_restarts, runtime_env=runtime_env,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            )
            for i in range(r.num_generators)
        ]
        self._weights: tuple[Any, int] | None = None
        self._history: dict = {}  # the pooled threshold history every actor holds (after merge/set)
        self.recovered_shards = 0

    def load_weights(self, weights_ref: Any, version: int) -> None:
        """Every actor loads the same object-store copy (Ray fans it out, across nodes too)."""
        self._weights = (weights_ref, version)
        ray.get([a.load_weights.remote(weights_ref, version) for a in self.actors])

    def generate(self, problems: Sequence[Problem], prompts: Sequence[list[int]], group_ids: Sequence[int],
                 group_size: Optional[int] = None, heal: Optional[bool] = None,
                 seed: Optional[int] = None) -> tuple[list, dict[str, float]]:
        """-> (one trajectory-list ref per non-empty shard, merged stats). Payloads stay in the store."""
        shards = shard(len(problems), len(self.actors))
        calls = {}
        for i, s in enumerate(shards):
            if len(s):
                calls[i] = self._submit(i, s, problems, prompts, group_ids, group_size, heal, seed)
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
                                                       seed)
        return refs, merge_stats(stats) | {"gen/recovered_shards": float(self.recovered_shards)}

    def _revive(self, i: int, timeout_s: float = 300.0) -> None:
        """Wait until Ray has restarted actor i (calls fail with ActorUnavailableError meanwhile), then
        give it the current weights and pooled threshold history: the state the dead one had."""
        a, deadline = self.actors[i], time.monotonic() + timeout_s
        while True:
            try:
                ray.get(a.policy_version.remote())
                break
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        if self._weights is not None:
            ray.get(a.load_weights.remote(*self._weights))
        if self._history:
            ray.get(a.set_history.remote(UncertaintyHistory(**self._history)))

    def _submit(self, i: int, s: range, problems, prompts, group_ids, group_size, heal, seed):
        a = self.actors[i]
        return a.generate.remote([prompts[j] for j in s], [group_ids[j] for j in s], [problems[j].uid for j in s],
                                 [problems[j] for j in s], group_size, heal,
                                 None if seed is None else seed * 1009 + i)

    def merge_histories(self) -> dict:
        """Pool the actors' threshold histories and give every actor the pooled one."""
        hs = ray.get([a.get_history.remote() for a in self.actors])
        merged = UncertaintyHistory.merge(hs)
        ray.get([a.set_history.remote(merged) for a in self.actors])
        self._history = {"mean": merged.mean, "var": merged.var, "count": merged.count, "decay": merged.decay}
        return dict(self._history)

    def set_history(self, h: dict) -> None:
        if h:
            self._history = dict(h)
            ray.get([a.set_history.remote(UncertaintyHistory(**h)) for a in self.actors])

    def histories(self) -> list:
        """Each actor's threshold history (to put back after an evaluation: see `restore_histories`)."""
        return ray.get([a.get_history.remote() for a in self.actors])

    def restore_histories(self, hs: list) -> None:
        ray.get([a.set_history.remote(h) for a, h in zip(self.actors, hs)])

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

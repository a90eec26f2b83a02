"""The driver's side of weight sync: which transport, and what happens when a generator fails.

`resources.weight_sync: object_store` gathers the whole state dict on learner rank 0, `ray.put`s
it once and every generator loads it by reference. `collective` streams it bucket by bucket from
the ZeRO-3 shards over a sync group of learner rank 0 and the generators (`learner/sync_group.py`):
no full copy on the learner, no serialisation. One group for all generators, so a broadcast's
cost grows sub-linearly with them (NCCL pipelines it; gloo on one host is the CPU stand-in).

A dead or hung generator fails the broadcast (timeouts, never a hang). The group is then re-formed
under a new epoch — Ray has restarted the dead actor by then, and it rejoins — and the sync is
run again; if that fails too, this sync falls back to the object store, so a generator never
samples with stale or half-loaded weights (their version would not match). A generator revived
in the middle of a rollout gets the current weights the same way, before it regenerates its shard.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import ray

log = logging.getLogger(__name__)


class CollectiveSync:
    """Streams the learner's policy into every generator over the sync group; -> its version."""

    def __init__(self, learner: Any, generators: Any, bucket_mb: float, timeout_s: float):
        self.learner, self.generators = learner, generators
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.timeout_s = timeout_s
        self.epoch = 0
        self.specs: list | None = None
        self.fallbacks = 0
        self._members: tuple | None = None  # (generators, restarts seen) of the current epoch
        generators.reload = lambda i: self.sync([i])  # a revived generator rejoins and is synced

    def __call__(self) -> int:
        return self.sync(range(len(self.generators.actors)))

    def sync(self, which: Sequence[int]) -> int:
        """Sync generators `which` (all, or a revived one); two tries, then the object store."""
        self.specs = self.specs or self.learner.sync_specs()
        version = self.learner.policy_version()
        for attempt in range(2):
            if self._try(list(which), version):
                return version
            log.warning("weight sync epoch %d failed; re-forming the group (attempt %d)", self.epoch, attempt + 1)
            self.generators.wait_alive(which)
        self.fallbacks += 1
        log.warning("weight sync over the group failed twice; this sync goes through the object store")
        handle = self.learner.publish_weights()
        self.generators.load_weights(handle.ref, handle.version, which)
        return handle.version

    def _try(self, which: list[int], version: int) -> bool:
        members = (tuple(which), self.generators.recovered_shards)
        if members != self._members:  # other members, or one restarted since: a fresh epoch
            self.epoch += 1
            self._members = members
        address = self.learner.sync_address(1 + len(which), self.epoch, self.timeout_s)
        sends = self.learner.send_weights(address, self.bucket_bytes)
        actors = [self.generators.actors[i] for i in which]
        recvs = [a.receive_weights.remote(address, k + 1, self.specs, self.bucket_bytes, version)
                 for k, a in enumerate(actors)]
        try:
            loaded = ray.get(recvs)
        except ray.exceptions.RayError:  # a generator died, or failed in a way it did not report
            loaded = [-1]
        sent = ray.get(sends)[0]  # the learner always finishes: a failed broadcast stops only the sending
        if sent["error"] or any(v != version for v in loaded):
            self._members = None  # never reuse a broken epoch
            return False
        return True

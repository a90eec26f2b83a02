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

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import ray

log = logging.getLogger(__name__)


@dataclass
class SyncReport:
    """One sync, for the step's `sync/*` metrics."""

    version: int
    bytes: int  # sent once by the learner (a broadcast reaches every generator)
    transport: str  # "collective" | "object_store"
    retries: int = 0  # group epochs that failed before this sync went through
    gather_s: float = 0.0  # learner rank 0: gathering buckets from the ZeRO-3 shards
    send_s: float = 0.0  # learner rank 0: packing and broadcasting them

    def metrics(self) -> dict[str, float]:
        return {"sync/policy_version": float(self.version), "sync/bytes": float(self.bytes),
                "sync/collective": float(self.transport == "collective"), "sync/retries": float(self.retries),
                "sync/gather_s": self.gather_s, "sync/send_s": self.send_s}


def sync_through_object_store(learner: Any, generators: Any, which: Optional[Sequence[int]] = None) -> SyncReport:
    """Gather on learner rank 0, one `ray.put`; the generators load it by reference."""
    handle = learner.publish_weights()
    generators.load_weights(handle.ref, handle.version, which)
    return SyncReport(handle.version, handle.num_bytes, "object_store")


class CollectiveSync:
    """Streams the learner's policy into every generator over the sync group; -> a `SyncReport`."""

    def __init__(self, learner: Any, generators: Any, bucket_mb: float, timeout_s: float):
        self.learner, self.generators = learner, generators
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.timeout_s = timeout_s
        self.specs: list | None = None  # what travels, fixed at the first sync
        self.cast: str | None = None
        self.fallbacks = 0  # syncs that went through the object store
        self.failed_epochs = 0
        self._members: tuple | None = None  # (generators, restarts seen) of the current epoch
        self._address = None  # the current epoch's GroupAddress
        generators.reload = lambda i: self.sync([i])  # a revived generator rejoins and is synced

    def __call__(self) -> SyncReport:
        return self.sync(range(len(self.generators.actors)))

    def sync(self, which: Sequence[int]) -> SyncReport:
        """Sync generators `which` (all, or a revived one); two tries, then the object store."""
        if self.specs is None:  # the generators' dtype travels (bf16 generators: half the bytes)
            self.cast = ray.get(self.generators.actors[which[0]].weights_dtype.remote())
            self.specs = self.learner.sync_specs(self.cast)
        version = self.learner.policy_version()
        for attempt in range(2):
            sent = self._try(list(which), version)
            if sent is not None:
                return SyncReport(version, sent["bytes"], "collective", attempt, sent["gather_s"], sent["send_s"])
            self.failed_epochs += 1
            log.warning("weight sync epoch %d failed; re-forming the group (attempt %d)",
                        self._address.epoch, attempt + 1)
            self.generators.wait_alive(which)
        self.fallbacks += 1
        log.warning("weight sync over the group failed twice; this sync goes through the object store")
        return dataclasses.replace(sync_through_object_store(self.learner, self.generators, which), retries=2)

    def _try(self, which: list[int], version: int) -> Optional[dict]:
        """One attempt on the current epoch (a new one when the members changed) -> rank 0's send
        report, or None when any member failed."""
        members = (tuple(which), self.generators.recovered_shards)
        if members != self._members:  # other members, or one restarted since: a fresh epoch
            self._address = self.learner.sync_address(1 + len(which), self.timeout_s)
            self._members = members
        address = self._address
        sends = self.learner.send_weights(address, self.bucket_bytes, self.cast)
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
            return None
        return sent

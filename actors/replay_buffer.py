"""The object-store replay buffer: a Ray actor that holds *references* to trajectory batches.

Payloads never pass through this actor or the driver: generators return their batch (it lands
in the object store), the driver hands the `ObjectRef` to the buffer, and learners fetch the
payload by reference. The buffer owns ordering, capacity, back-pressure and staleness:

- capacity: at most `capacity` batches; `put` waits (async) while full — producers slow down,
  nothing is dropped;
- staleness: `get(learner_version)` only returns batches generated at policy version
  >= learner_version - max_staleness. With the default 0 that is strictly on-policy. A batch
  that became too stale is never silently dropped: `get` raises, naming it.
- accounting: every batch put is taken exactly once; `stats()` reports the counts.
"""
from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional


class StaleBatchError(RuntimeError):
    pass


@dataclass
class BufferItem:
    refs: list  # [ObjectRef] of trajectory lists (one per generator shard); wrapped so Ray keeps them as refs
    policy_version: int
    num_trajectories: int
    batch_id: int


class ReplayBuffer:
    """Plain asyncio class (testable without Ray); `ray.remote(ReplayBuffer)` makes it an actor."""

    def __init__(self, capacity: int, max_staleness: int = 0):
        self.capacity = capacity
        self.max_staleness = max_staleness
        self._items: deque[BufferItem] = deque()
        self._cond: Optional[asyncio.Condition] = None
        self.put_batches = self.taken_batches = 0
        self.put_trajectories = self.taken_trajectories = 0
        self.producer_waits = 0

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # created on the actor's event loop
            self._cond = asyncio.Condition()
        return self._cond

    async def put(self, refs: list, policy_version: int, num_trajectories: int) -> int:
        """Add a batch (by reference); waits while the buffer is full. Returns its batch id."""
        cond = self._condition()
        async with cond:
            if len(self._items) >= self.capacity:
                self.producer_waits += 1
            await cond.wait_for(lambda: len(self._items) < self.capacity)
            item = BufferItem(list(refs), policy_version, num_trajectories, self.put_batches)
            self._items.append(item)
            self.put_batches += 1
            self.put_trajectories += num_trajectories
            cond.notify_all()
            return item.batch_id

    async def get(self, learner_version: int, timeout_s: Optional[float] = None) -> BufferItem:
        """Oldest batch (FIFO); waits until one exists. Raises if it is staler than allowed."""
        cond = self._condition()
        async with cond:
            await asyncio.wait_for(cond.wait_for(lambda: len(self._items) > 0), timeout_s)
            item = self._items[0]
            lag = learner_version - item.policy_version
            if lag > self.max_staleness:
                raise StaleBatchError(
                    f"batch {item.batch_id} was generated at policy version {item.policy_version}, "
                    f"{lag} behind the learner (run.max_staleness={self.max_staleness})"
                )
            self._items.popleft()
            self.taken_batches += 1
            self.taken_trajectories += item.num_trajectories
            cond.notify_all()
            return item

    def size(self) -> int:
        return len(self._items)

    def stats(self) -> dict[str, Any]:
        return {
            "put_batches": self.put_batches,
            "taken_batches": self.taken_batches,
            "put_trajectories": self.put_trajectories,
            "taken_trajectories": self.taken_trajectories,
            "in_buffer": len(self._items),
            "producer_waits": self.producer_waits,
            "capacity": self.capacity,
        }


def make_replay_buffer(capacity: int, max_staleness: int, name: Optional[str] = None) -> Any:
    """The buffer as a Ray actor. It does no compute, so it reserves no CPU (num_cpus=0)."""
    import ray

    opts: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 64}
    if name:
        opts["name"] = name
    return ray.remote(ReplayBuffer).options(**opts).remote(capacity, max_staleness)

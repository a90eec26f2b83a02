"""A communicator of its own for weight sync: learner rank 0 and the generators, bucket by bucket.

The default process group belongs to ZeRO-3 (learner ranks only), so the sync group is built
without it: a `TCPStore` served by learner rank 0, a `PrefixStore` per group epoch (a group that
lost a member is re-formed under a new epoch, never reused), and torch's own `ProcessGroupGloo`
(CPU) or `ProcessGroupNCCL` (GPU) on top — vLLM's weight-transfer engines target GPUs only, so
this is the path both devices share. Every operation has a timeout: a member that dies makes the
others' broadcast fail (gloo: at once, "connection closed"; a hung member: after the timeout),
never hang.

Both sides agree on what travels without sending it: `plan_buckets` cuts the named tensors (the
learner's state-dict order, shapes, dtypes) into buckets of at most `bucket_bytes`, one flat
buffer per (bucket, dtype); the learner fills and broadcasts one bucket at a time, so neither side
ever holds more than a bucket beyond its model.
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorSlot:
    """Where one named tensor lives in its bucket's flat buffer of `dtype`."""

    name: str
    shape: tuple
    dtype: torch.dtype
    offset: int  # elements into the flat buffer
    numel: int


@dataclass(frozen=True)
class Bucket:
    """Tensors sent together: one flat buffer per dtype (sizes in elements)."""

    slots: tuple
    sizes: dict  # dtype -> elements

    @property
    def nbytes(self) -> int:
        return sum(n * torch.empty(0, dtype=d).element_size() for d, n in self.sizes.items())


def plan_buckets(specs: Sequence[tuple[str, tuple, torch.dtype]], bucket_bytes: int) -> list[Bucket]:
    """Cut (name, shape, dtype) specs, in order, into buckets of at most `bucket_bytes` (a tensor
    larger than that gets a bucket of its own). The same specs give the same plan on every side."""
    buckets: list[Bucket] = []
    slots: list[TensorSlot] = []
    sizes: dict = {}
    used = 0
    for name, shape, dtype in specs:
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if slots and used + nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(slots), sizes))
            slots, sizes, used = [], {}, 0
        slots.append(TensorSlot(name, tuple(shape), dtype, sizes.get(dtype, 0), numel))
        sizes[dtype] = sizes.get(dtype, 0) + numel
        used += nbytes
    if slots:
        buckets.append(Bucket(tuple(slots), sizes))
    return buckets


def pack(bucket: Bucket, tensors: dict[str, torch.Tensor], device: torch.device) -> dict:
    """The bucket's flat buffers (dtype -> 1-D tensor) filled from `tensors`."""
    flat = {d: torch.empty(n, dtype=d, device=device) for d, n in bucket.sizes.items()}
    for s in bucket.slots:
        flat[s.dtype][s.offset : s.offset + s.numel].copy_(tensors[s.name].reshape(-1))
    return flat


def unpack(bucket: Bucket, flat: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) views into the received flat buffers, in plan order."""
    for s in bucket.slots:
        yield s.name, flat[s.dtype][s.offset : s.offset + s.numel].view(s.shape)


@dataclass(frozen=True)
class GroupAddress:
    """How to join one epoch of the sync group (learner rank 0 is its rank 0 and serves the store)."""

    host: str
    port: int
    world_size: int
    epoch: int
    timeout_s: float  # per operation: how long a broadcast waits for a dead or hung member
    join_timeout_s: float = 120.0  # how long members may take to arrive (actors start, import torch)


def _arrive(store: "dist.Store", address: GroupAddress) -> None:
    """Wait until every member has reached the store (up to `join_timeout_s`)."""
    store.add("arrived", 1)
    deadline = time.monotonic() + address.join_timeout_s
    while int(store.add("arrived", 0)) < address.world_size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"sync group epoch {address.epoch}: {int(store.add('arrived', 0))} of "
                               f"{address.world_size} members arrived within {address.join_timeout_s:.0f} s")
        time.sleep(0.05)


class SyncGroup:
    """One member of a sync-group epoch; rank 0 sends, the others receive."""

    def __init__(self, address: GroupAddress, rank: int, device: torch.device, store: "dist.TCPStore | None" = None):
        """store: rank 0 passes the store it already serves when it re-forms the group (one server
        per port); members connect a new client per epoch."""
        timeout = datetime.timedelta(seconds=address.timeout_s)
        self.rank, self.device, self.address = rank, device, address
        join = datetime.timedelta(seconds=address.join_timeout_s)  # a member may connect before rank 0 serves
        self.store = store or dist.TCPStore(address.host, address.port, None, rank == 0, timeout=join,
                                            wait_for_workers=False)
        store = dist.PrefixStore(f"e3rl-sync/{address.epoch}", self.store)
        _arrive(store, address)  # the group's own rendezvous uses the (short) operation timeout
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, address.world_size, opts)
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, address.world_size, timeout)

    def broadcast(self, flat: dict) -> None:
        """Broadcast each dtype's flat buffer from rank 0 (in place on receivers); raises on a
        dead or hung member instead of waiting for it."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        for d in sorted(flat, key=str):
            self.pg.broadcast([flat[d]], opts).wait()

    def send(self, buckets: Sequence[Bucket], tensors_for: "callable") -> int:
        """Rank 0: for each bucket, `tensors_for(bucket)` -> {name: tensor}; pack, broadcast, free.
        -> bytes sent."""
        sent = 0
        for b in buckets:
            flat = pack(b, tensors_for(b), self.device)
            self.broadcast(flat)
            sent += b.nbytes
            del flat
        return sent

    def receive(self, buckets: Sequence[Bucket]) -> Iterator[tuple[str, torch.Tensor]]:
        """A receiver: (name, tensor) pairs as each bucket arrives (valid until the next bucket)."""
        for b in buckets:
            flat = {d: torch.empty(n, dtype=d, device=self.device) for d, n in b.sizes.items()}
            self.broadcast(flat)
            yield from unpack(b, flat)

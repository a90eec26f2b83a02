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


def empty_buffers(bucket: Bucket, device: torch.device) -> dict:
    """The bucket's flat buffers (dtype -> 1-D tensor), uninitialised."""
    return {d: torch.empty(n, dtype=d, device=device) for d, n in bucket.sizes.items()}


def slot_writer(bucket: Bucket, flat: dict) -> "callable":
    """-> write(name, tensor): copy one tensor into its slot (casting to the slot's dtype)."""
    slots = {s.name: s for s in bucket.slots}

    def write(name: str, t: torch.Tensor) -> None:
        s = slots[name]
        flat[s.dtype][s.offset : s.offset + s.numel].copy_(t.reshape(-1))
    return write


def pack(bucket: Bucket, tensors: dict[str, torch.Tensor], device: torch.device) -> dict:
    """The bucket's flat buffers filled from `tensors`."""
    flat = empty_buffers(bucket, device)
    write = slot_writer(bucket, flat)
    for s in bucket.slots:
        write(s.name, tensors[s.name])
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

    def start_broadcast(self, flat: dict) -> list:
        """Start broadcasting each dtype's flat buffer from rank 0 (in place on receivers) ->
        the works to wait on; a wait raises on a dead or hung member instead of blocking."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return [self.pg.broadcast([flat[d]], opts) for d in sorted(flat, key=str)]

    def broadcast(self, flat: dict) -> None:
        for w in self.start_broadcast(flat):
            w.wait()

    def send(self, buckets: Sequence[Bucket], tensors_for: "callable") -> int:
        """Rank 0: for each bucket, `tensors_for(bucket)` -> {name: tensor}; pack and broadcast,
        the next bucket packed while this one travels. -> bytes sent."""
        sender = PipelinedSender(self)
        for b in buckets:
            sender.push(pack(b, tensors_for(b), self.device), b.nbytes)
        sender.flush()
        return sender.sent

    def receive(self, buckets: Sequence[Bucket]) -> Iterator[tuple[str, torch.Tensor]]:
        """A receiver: (name, tensor) pairs as each bucket arrives (valid until the next bucket
        is consumed). The next bucket's transfer is already under way into a second buffer while
        the caller loads this one: loading and the network overlap, two buckets at most."""
        pending = None  # (bucket, flat, works) in flight
        for b in buckets:
            flat = empty_buffers(b, self.device)
            works = self.start_broadcast(flat)
            if pending is not None:
                yield from self._landed(*pending)
            pending = (b, flat, works)
        if pending is not None:
            yield from self._landed(*pending)

    @staticmethod
    def _landed(bucket: Bucket, flat: dict, works: list) -> Iterator[tuple[str, torch.Tensor]]:
        for w in works:
            w.wait()
        yield from unpack(bucket, flat)


class PipelinedSender:
    """Rank 0's side of a stream: one bucket in flight while the caller fills the next (two
    buffers at most). Gathering from the shards and the broadcast then overlap instead of
    taking turns."""

    def __init__(self, group: SyncGroup):
        self.group, self.pending, self.sent = group, None, 0

    def push(self, flat: dict, nbytes: int) -> None:
        """Wait for the bucket in flight (raises if it failed), then start this one."""
        self.flush()
        self.pending = (self.group.start_broadcast(flat), flat, nbytes)

    def flush(self) -> None:
        """Wait for the bucket in flight, if any."""
        if self.pending is None:
            return
        works, _, nbytes = self.pending
        self.pending = None
        for w in works:
            w.wait()
        self.sent += nbytes

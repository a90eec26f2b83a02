"""The weight-sync group on its own: the bucket plan, and real gloo groups across processes.

Processes are spawned (no fork of a process holding torch threads); each joins the group over a
TCP store like a generator actor would. Timeouts are short so a failure shows in seconds.
"""
from __future__ import annotations

import multiprocessing as mp
import socket
import time

import pytest
import torch

from learner.sync_group import GroupAddress, SyncGroup, pack, plan_buckets, unpack

TIMEOUT_S = 5.0


def state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {f"layers.{i}.w": torch.randn(64, 48, generator=g) for i in range(6)}
    out["embed"] = torch.randn(300, 32, generator=g).to(torch.bfloat16)
    out["norm"] = torch.randn(48, generator=g)
    return out


def specs(sd: dict) -> list:
    return [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]


def test_plan_covers_every_tensor_within_the_bucket_limit_and_round_trips_bit_exact():
    sd = state()
    total = sum(v.numel() * v.element_size() for v in sd.values())
    limit = total // 10
    plan = plan_buckets(specs(sd), limit)
    names = [s.name for b in plan for s in b.slots]
    assert names == list(sd) and len(plan) >= 5  # several buckets, none holding the model
    assert all(b.nbytes <= limit or len(b.slots) == 1 for b in plan)  # only a lone oversized tensor exceeds it
    assert plan == plan_buckets(specs(sd), limit)  # both sides compute the same plan
    got = {}
    for b in plan:
        got |= {k: v.clone() for k, v in unpack(b, pack(b, sd, torch.device("cpu")))}
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in sd.items())


def _member(address: GroupAddress, rank: int, bucket_bytes: int, fault: tuple, out) -> None:
    """fault: (kind, at): ("die" | "hang", tensor index) or ("", -1)."""
    torch.set_num_threads(1)
    try:
        group = SyncGroup(address, rank, torch.device("cpu"))
        plan = plan_buckets(specs(state()), bucket_bytes)
        if rank == 0:
            sd = state()
            t0 = time.perf_counter()
            sent = group.send(plan, lambda b: {s.name: sd[s.name] for s in b.slots})
            out.put((rank, "sent", sent, time.perf_counter() - t0))
            return
        got = {}
        for i, (name, t) in enumerate(group.receive(plan)):
            if fault == ("die", i):
                import os

                os._exit(1)  # a generator dying mid-sync
            if fault == ("hang", i):
                time.sleep(10 * TIMEOUT_S)  # a generator hung mid-sync (alive, not receiving)
            got[name] = t.clone()
        ok = all(torch.equal(got[k], v) for k, v in state().items()) and got.keys() == state().keys()
        out.put((rank, "received", ok, 0.0))
    except Exception as e:  # noqa: BLE001 - reported to the test
        out.put((rank, "error", f"{type(e).__name__}: {str(e)[:200]}", time.perf_counter()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, faults: dict, bucket_bytes: int) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    address = GroupAddress("127.0.0.1", _free_port(), world, epoch=0, timeout_s=TIMEOUT_S)
    procs = [ctx.Process(target=_member, args=(address, r, bucket_bytes, faults.get(r, ("", -1)), out))
             for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.time() + 6 * TIMEOUT_S
    while len(results) < world - len(faults) and time.time() < deadline:
        try:
            rank, kind, value, _ = out.get(timeout=1.0)
            results[rank] = (kind, value)
        except Exception:  # noqa: BLE001 - queue.Empty
            pass
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    return results


def test_three_receivers_get_the_weights_bit_for_bit_bucket_by_bucket():
    sd = state()
    total = sum(v.numel() * v.element_size() for v in sd.values())
    res = _run(4, {}, total // 10)
    assert res[0] == ("sent", sum(b.nbytes for b in plan_buckets(specs(sd), total // 10)))
    assert all(res[r] == ("received", True) for r in (1, 2, 3)), res


def test_a_receiver_dying_mid_sync_fails_the_broadcast_instead_of_hanging_it():
    t0 = time.time()
    res = _run(3, {2: ("die", 3)}, 8192)
    assert res[0][0] == "error", res  # the sender learns, within the timeout, that the group broke
    assert time.time() - t0 < 4 * TIMEOUT_S


def test_a_hung_receiver_fails_the_broadcast_after_the_timeout():
    t0 = time.time()
    res = _run(3, {2: ("hang", 3)}, 8192)
    took = time.time() - t0
    assert res[0][0] == "error", res
    assert TIMEOUT_S * 0.8 < took < 4 * TIMEOUT_S, took  # it waited for the timeout, and no longer

import asyncio

import pytest

from actors.replay_buffer import ReplayBuffer, StaleBatchError, make_replay_buffer


def test_capacity_and_back_pressure_without_loss():
    async def scenario():
        buf = ReplayBuffer(capacity=2)
        puts = [asyncio.create_task(buf.put([f"ref{i}"], 0, 4)) for i in range(5)]
        await asyncio.sleep(0.05)
        assert buf.size() == 2 and sum(p.done() for p in puts) == 2  # three producers wait
        got = [await buf.get(0, timeout_s=1) for _ in range(5)]
        await asyncio.gather(*puts)
        return buf, got

    buf, got = asyncio.run(scenario())
    assert [g.refs for g in got] == [[f"ref{i}"] for i in range(5)]  # FIFO, each exactly once
    s = buf.stats()
    assert s["put_trajectories"] == s["taken_trajectories"] == 20 and s["in_buffer"] == 0
    assert s["producer_waits"] == 3


def test_staleness_bound_raises_instead_of_dropping():
    async def scenario():
        buf = ReplayBuffer(capacity=4, max_staleness=1)
        await buf.put(["a"], policy_version=3, num_trajectories=1)
        await buf.put(["b"], policy_version=5, num_trajectories=1)
        first = await buf.get(learner_version=4)  # lag 1: allowed
        with pytest.raises(StaleBatchError, match="policy version 5"):
            await buf.get(learner_version=7)  # lag 2 > 1
        return first, buf

    first, buf = asyncio.run(scenario())
    assert first.refs == ["a"] and buf.size() == 1  # the stale batch is still there, not dropped


def test_ray_buffer_keeps_payload_in_object_store(ray_session):
    ray = ray_session
    payload = ray.put(list(range(1000)))
    buf = make_replay_buffer(capacity=1, max_staleness=0)
    ray.get(buf.put.remote([payload], 0, 1))
    item = ray.get(buf.get.remote(0))
    assert isinstance(item.refs[0], ray.ObjectRef) and item.refs[0] == payload  # a reference, not a copy
    assert ray.get(item.refs[0])[-1] == 999
    assert ray.get(buf.stats.remote())["taken_batches"] == 1
    ray.kill(buf)

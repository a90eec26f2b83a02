"""Exact buffer accounting with the real roles in the shared Ray session: the loop (`e3rl.loop.train`)
with GeneratorGroup, the object-store replay buffer and the ZeRO-3 LearnerGroup.

On-policy means: every trajectory batch produced is trained on exactly once, at the policy version
that generated it; nothing is left in the buffer. Then, with the same real trajectory refs,
capacity and back-pressure: a full buffer makes the producer wait (nothing dropped), and a batch
that became stale is refused by name, never silently dropped. Two generators share the work, and
the threshold history they are handed is exactly what one generator that saw every segment would
hold: each step's judged first attempts folded in once.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import ray

from e3rl.config import load_config
from e3rl.core.threshold import UncertaintyHistory
from e3rl.data import encode_prompts, load_workload
from e3rl.loop import Hooks, LoopState, Roles, train
from e3rl.models import load_tokenizer
from e3rl.prompts import PromptStream
from e3rl.session import build_roles

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


class _Recorder:
    """Delegates to a role and records the object refs that pass through one method."""

    def __init__(self, role: Any, method: str, pick):
        self._role, self._method, self._pick = role, method, pick
        self.seen: list[list] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._role, name)
        if name != self._method:
            return attr

        def wrapped(*args, **kw):
            out = attr(*args, **kw)
            self.seen.append(list(self._pick(args, out)))
            return out

        return wrapped


@pytest.fixture(scope="module")
def looped(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("buffer_run")
    cfg = load_config(REPO / "configs/tiny.yaml", [f"run.output_dir={out}", f"run.steps={STEPS}",
                                                   "run.buffer_capacity=2", "resources.num_generators=2",
                                                   "learner.dtype=float32"])  # log-probs compared with the fp32 generator
    tok = load_tokenizer(cfg.model)
    work = load_workload(cfg, tok)
    stream = PromptStream(work.train, cfg.algo.prompts_per_step, seed=cfg.data.seed)
    roles = build_roles(cfg)
    try:
        gen = _Recorder(roles.generators, "generate", lambda args, res: res.refs)
        learner = _Recorder(roles.learner, "train_step", lambda args, res: args[0])
        logged: list[tuple[int, dict]] = []
        checkpoints: list[int] = []
        state = LoopState()

        def next_batch(step: int, round_: int):
            problems = stream.next_batch()
            return problems, encode_prompts(cfg, problems, tok), [step * len(problems) + i
                                                                   for i in range(len(problems))]

        hooks = Hooks(next_batch, lambda step: {}, lambda: checkpoints.append(state.step),
                      lambda step, m: logged.append((step, m)))
        train(Roles(gen, roles.buffer, learner), state, STEPS, cfg.run.seed, 0, 0, hooks)
        stats = ray.get(roles.buffer.stats.remote())
        trajs = [ray.get(refs) for refs in gen.seen]  # per step: [shard lists of Trajectory]
        final_gen_version = ray.get(roles.generators.actors[0].policy_version.remote())
        stale = _train_after_a_lost_sync(roles, cfg, hooks)
        yield dict(stale=stale, threads=roles.generators.torch_threads(), cfg=cfg, state=state, stats=stats, logged=logged, produced=gen.seen, trained=learner.seen,
                   trajs=trajs, checkpoints=checkpoints, final_gen_version=final_gen_version)
    finally:
        roles.generators.shutdown()
        roles.learner.shutdown()
        ray.kill(roles.buffer)


def _train_after_a_lost_sync(roles, cfg, hooks) -> tuple[list, str]:
    """Two more steps whose weight sync reaches no generator (it reports the learner's version, as
    a sync whose broadcast was lost would): the second step's rollouts are sampled with weights one
    version behind the learner's. -> (steps trained, the error that stopped the loop)."""
    from actors.replay_buffer import make_replay_buffer
    from e3rl.weight_sync import SyncReport

    lost = lambda: SyncReport(roles.learner.policy_version(), 0, "lost")
    trained: list = []
    learner = _Recorder(roles.learner, "train_step", lambda args, res: args[0])
    buffer = make_replay_buffer(capacity=2, max_staleness=0)
    state = LoopState()
    try:
        quiet = Hooks(hooks.next_batch, lambda step: {}, lambda: None, lambda step, m: None)
        train(Roles(roles.generators, buffer, learner, sync=lost), state, 2, cfg.run.seed, 0, 0, quiet)
        error = ""
    except Exception as e:  # the buffer actor's StaleBatchError, as Ray raises it
        error = f"{type(e).__name__}: {e}"
    finally:
        ray.kill(buffer)
    trained[:] = learner.seen
    return trained, error


def test_a_batch_sampled_with_stale_weights_is_refused_by_its_own_version(looped):
    """The loop once stamped each batch with the driver's version, so the buffer compared the learner's
    version with itself and a generator that missed a sync went on feeding stale rollouts unnoticed."""
    trained, error = looped["stale"]
    assert len(trained) == 1  # the first step's rollouts were on-policy; the second's were not trained
    assert "StaleBatchError" in error and "1 behind the learner" in error


def test_generators_on_one_node_split_its_cores(looped):
    """Two generators decode at the same time on this one node: each gets half of its cores."""
    from e3rl.models import usable_cores

    assert looped["threads"] == [max(1, usable_cores() // 2)] * 2


def test_every_trajectory_trained_exactly_once(looped):
    cfg, st = looped["cfg"], looped["stats"]
    per_step = cfg.samples_per_step
    assert per_step == 8
    assert looped["state"].step == STEPS and looped["state"].samples == STEPS * per_step
    assert st["put_batches"] == st["taken_batches"] == STEPS
    assert st["put_trajectories"] == st["taken_trajectories"] == STEPS * per_step
    assert st["in_buffer"] == 0 and st["producer_waits"] == 0 and st["capacity"] == 2
    assert looped["checkpoints"] == []  # save_every=0: the loop itself never checkpoints

    # the learner trained on exactly the refs produced in the same step, each once, in order
    produced, trained = looped["produced"], looped["trained"]
    assert len(produced) == len(trained) == STEPS
    for p, t in zip(produced, trained):
        assert [r.hex() for r in p] == [r.hex() for r in t]
    all_refs = [r.hex() for p in produced for r in p]
    assert len(all_refs) == len(set(all_refs))

    # per step: G x prompts distinct samples, generated at the policy version the learner then had
    seen_ids = set()
    for step, shards in enumerate(looped["trajs"]):
        flat = [t for shard in shards for t in shard]
        assert len(flat) == per_step
        assert {t.policy_version for t in flat} == {step}
        ids = {(t.group_id, t.sample_index) for t in flat}
        assert len(ids) == per_step
        seen_ids |= ids
    assert len(seen_ids) == STEPS * per_step

    steps = [s for s, _ in looped["logged"]]
    assert steps == [1, 2, 3]
    for step, m in looped["logged"]:
        assert m["learner/seqs"] == per_step  # the learner saw the whole batch
        assert m["gen/samples"] == per_step
        assert m["buffer/fill"] == 0.0
        assert m["sync/policy_version"] == step and m["learner/version"] == step
        assert m["learner/logp_diff_mean"] < 1e-3
    assert looped["final_gen_version"] == STEPS  # generators serve the last published weights


def test_threshold_history_pools_every_generator_once_per_step(looped):
    """It once was merged by summing the generators' counts and handed back to each: x N per step."""
    assert len(looped["trajs"][0]) == 2  # both generators produced a shard
    expected, total = UncertaintyHistory(decay=looped["cfg"].heal.history_decay), 0
    for shards in looped["trajs"]:
        first = [(u, z) for shard in shards for t in shard
                 for u, tau, z, e in zip(t.segments.uncertainty.tolist(), t.segments.threshold.tolist(),
                                         t.segments.score.tolist(), t.segments.erase_count.tolist())
                 if e == 0 and not math.isnan(tau)]  # every judged first attempt, kept or erased
        expected = expected.update([u for u, _ in first], [z for _, z in first], looped["cfg"].heal.threshold_k)
        total += len(first)
    history = looped["state"].history
    assert total > 0 and history["count"] == total
    assert history == pytest.approx(asdict(expected))


def test_capacity_backpressure_and_staleness_with_real_refs(looped):
    from actors.replay_buffer import make_replay_buffer

    batches = looped["produced"]
    buf = make_replay_buffer(capacity=1, max_staleness=0)
    try:
        assert ray.get(buf.put.remote(batches[0], 0, 8), timeout=30) == 0
        blocked = buf.put.remote(batches[1], 0, 8)  # buffer full: the producer must wait
        ready, _ = ray.wait([blocked], timeout=1.0)
        assert not ready
        st = ray.get(buf.stats.remote())
        assert st["in_buffer"] == 1 and st["producer_waits"] == 1 and st["put_batches"] == 1

        # a learner one version ahead may not take a version-0 batch (max_staleness=0) ...
        with pytest.raises(ray.exceptions.RayTaskError, match="StaleBatchError|policy version 0"):
            ray.get(buf.get.remote(1), timeout=30)
        assert ray.get(buf.size.remote()) == 1  # ... and the batch was not dropped
        assert not ray.wait([blocked], timeout=0.2)[0]

        first = ray.get(buf.get.remote(0), timeout=30)  # taking one unblocks the producer
        assert first.batch_id == 0 and [r.hex() for r in first.refs] == [r.hex() for r in batches[0]]
        assert ray.get(blocked, timeout=30) == 1
        second = ray.get(buf.get.remote(0), timeout=30)
        assert second.batch_id == 1 and [r.hex() for r in second.refs] == [r.hex() for r in batches[1]]
        # refs went through the buffer, payloads did not: they still resolve to the trajectories
        assert sum(len(x) for x in ray.get(second.refs)) == 8
        st = ray.get(buf.stats.remote())
        assert (st["put_batches"], st["taken_batches"], st["put_trajectories"], st["taken_trajectories"],
                st["in_buffer"]) == (2, 2, 16, 16, 0)
    finally:
        ray.kill(buf)

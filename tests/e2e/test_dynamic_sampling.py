"""DAPO dynamic sampling with the real roles in the shared Ray session: `e3rl.loop.train` driving the
GeneratorGroup, the object-store replay buffer and the ZeRO-3 LearnerGroup.

The reward (`tests.e2e.outcome_rewards`) sorts problems into kinds whose groups come out mixed,
all-correct, or all-wrong (with varying shaped rewards), and each scenario feeds the kinds it needs:
- on: round 0 of each step holds one uniform group, so refill rounds must run; every trained group
  has mixed outcomes, the batch is exactly prompts_per_step groups, the buffer counts exactly the
  trained trajectories, and the threshold history takes one step per training step;
- on, rounds exhausted (`max_refill_rounds=0`, only uniform groups): the step still trains a full
  batch, counted as fallback, with one warning line;
- off: one generation round with the step's usual group ids and seed, everything trained.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import ray

from e3rl.batching import DynamicSampling
from e3rl.config import load_config
from e3rl.core.dynamic_sampling import round_group_ids, round_seed
from e3rl.data import encode_prompts, load_workload
from e3rl.loop import Hooks, LoopState, Roles, train
from e3rl.models import load_tokenizer
from e3rl.session import build_roles
from tests.e2e.outcome_rewards import KINDS, kind

REPO = Path(__file__).resolve().parents[2]
N, G = 2, 4  # configs/tiny.yaml: prompts_per_step, group_size
REWARD_FN = "tests.e2e.outcome_rewards:outcome_reward"


class _Generators:
    """The GeneratorGroup, recording every generate call: its seed, group ids, the history handed to
    the actors, and the Rollout."""

    def __init__(self, group: Any):
        self._group, self.calls = group, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._group, name)

    def generate(self, problems, prompts, group_ids, **kw):
        history = self._group.history
        out = self._group.generate(problems, prompts, group_ids, **kw)
        self.calls.append(SimpleNamespace(seed=kw["seed"], groups=list(group_ids), history=history, rollout=out))
        return out


class _Learner:
    def __init__(self, learner: Any):
        self._learner, self.trained = learner, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._learner, name)

    def train_step(self, refs):
        self.trained.append(list(refs))
        return self._learner.train_step(refs)


@pytest.fixture(scope="module")
def env(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("dynamic_run")
    cfg = load_config(REPO / "configs/tiny.yaml", [f"run.output_dir={out}", f"reward.fn={REWARD_FN}",
                                                   "algo.dynamic_sampling=true", "algo.max_refill_rounds=4"])
    assert (cfg.algo.prompts_per_step, cfg.gen.group_size) == (N, G)
    tok = load_tokenizer(cfg.model)
    problems = load_workload(cfg, tok).train
    pools = {k: [p for p in problems if kind(p) == k] for k in KINDS}
    assert all(pools.values())
    roles = build_roles(cfg)
    try:
        yield SimpleNamespace(cfg=cfg, tok=tok, pools=pools, roles=roles)
    finally:
        roles.generators.shutdown()
        roles.learner.shutdown()


def _run(env, sampling: DynamicSampling, steps: int, plan: Callable[[int, int], list[str]]) -> SimpleNamespace:
    """`train` for `steps` steps on a fresh buffer; round r of step s draws problems of the kinds plan(s, r)."""
    from actors.replay_buffer import make_replay_buffer

    pools = {k: itertools.cycle(v) for k, v in env.pools.items()}
    gens, learner = _Generators(env.roles.generators), _Learner(env.roles.learner)
    buffer = make_replay_buffer(capacity=2, max_staleness=0)
    logged: list[tuple[int, dict]] = []

    def next_batch(step: int, round_: int):
        problems = [next(pools[k]) for k in plan(step, round_)]
        return (problems, encode_prompts(env.cfg, problems, env.tok),
                round_group_ids(step, round_, sampling.rounds, len(problems)))

    state = LoopState()
    hooks = Hooks(next_batch, lambda step: {}, lambda: None, lambda step, m: logged.append((step, m)))
    try:
        train(Roles(gens, buffer, learner), state, steps, env.cfg.run.seed, 0, 0, hooks, sampling)
        stats = ray.get(buffer.stats.remote())
    finally:
        ray.kill(buffer)
    trained = [[t for shard in ray.get(refs) for t in shard] for refs in learner.trained]
    return SimpleNamespace(cfg=env.cfg, state=state, stats=stats, metrics=[m for _, m in logged], calls=gens.calls, trained=trained,
                           trained_refs=learner.trained)


def _per_group(trajs) -> dict[int, list[bool]]:
    out: dict[int, list[bool]] = {}
    for t in trajs:
        out.setdefault(t.group_id, []).append(t.correct)
    return out


@pytest.fixture(scope="module")
def dynamic(env):
    # round 0: one uniform group (all-correct in step 1, all-wrong with varying shaped rewards in step 2)
    plan = lambda step, r: [("right", "wrong")[step % 2], "mixed"] if r == 0 else ["mixed", "mixed"]
    return _run(env, DynamicSampling.from_config(env.cfg), 2, plan)


def test_only_mixed_groups_train_and_the_buffer_counts_exactly_them(dynamic):
    assert [m["dynamic/rounds"] for m in dynamic.metrics][0] > 1
    assert len(dynamic.trained) == 2
    for trajs, m in zip(dynamic.trained, dynamic.metrics):
        groups = _per_group(trajs)
        assert len(groups) == N and all(len(c) == G and 0 < sum(c) < G for c in groups.values())
        assert len(trajs) == N * G == m["dynamic/trained_samples"] and m["dynamic/kept_groups"] == N
        assert m["dynamic/fallback_groups"] == 0 and m["dynamic/dropped_groups"] >= 1
        generated = m["dynamic/rounds"] * N
        assert m["gen/samples"] == generated * G > len(trajs)
        assert m["dynamic/kept_groups"] + m["dynamic/dropped_groups"] + m["dynamic/discarded_groups"] == generated
        assert m["learner/seqs"] == N * G
    st = dynamic.stats
    assert st["put_batches"] == st["taken_batches"] == 2 and st["in_buffer"] == 0
    assert st["put_trajectories"] == st["taken_trajectories"] == 2 * N * G
    assert dynamic.state.samples == sum(m["gen/samples"] for m in dynamic.metrics)


def test_rounds_get_fresh_seeds_and_group_ids_and_outcomes_match_the_trajectories(dynamic, env):
    rounds_per_step = [int(m["dynamic/rounds"]) for m in dynamic.metrics]
    assert len(dynamic.calls) == sum(rounds_per_step)
    calls = iter(dynamic.calls)
    step_seed = env.cfg.run.seed * 100_003
    for step, rounds in enumerate(rounds_per_step):
        mine = [next(calls) for _ in range(rounds)]
        assert [c.seed for c in mine] == [round_seed(step_seed + step, r) for r in range(rounds)]
        assert mine[0].seed == step_seed + step  # round 0 samples as without dynamic sampling
        ids = [g for c in mine for g in c.groups]
        assert len(ids) == len(set(ids)) == rounds * N
        assert all(c.history == mine[0].history for c in mine)  # every round gets the pre-step history
        for c in mine:  # the actor's GroupOutcome counts are the trajectories' own
            trajs = [t for shard in ray.get(c.rollout.refs) for t in shard]
            assert {o.group_id: (o.correct, o.size) for o in c.rollout.groups} == \
                {g: (sum(x), len(x)) for g, x in _per_group(trajs).items()}
    seeds = [c.seed for c in dynamic.calls]
    assert len(seeds) == len(set(seeds))


def test_threshold_history_takes_one_step_per_training_step(dynamic):
    calls = iter(dynamic.calls)
    expected = dynamic.calls[0].history
    for rounds in (int(m["dynamic/rounds"]) for m in dynamic.metrics):
        first = [x for _ in range(rounds) for x in next(calls).rollout.first_attempts]
        expected = expected.update([u for u, _ in first], [z for _, z in first],
                                   dynamic.cfg.heal.threshold_k)  # all rounds pooled, folded once
    assert dynamic.state.history == pytest.approx(asdict(expected))


def test_rounds_exhausted_fill_the_batch_with_uniform_groups_and_warn_once(env, caplog):
    sampling = replace(DynamicSampling.from_config(env.cfg), max_refill_rounds=0)
    with caplog.at_level(logging.WARNING, logger="e3rl.batching"):
        run = _run(env, sampling, 1, lambda step, r: ["right", "wrong"])
    (m,) = run.metrics
    assert (m["dynamic/rounds"], m["dynamic/kept_groups"], m["dynamic/fallback_groups"]) == (1, 0, N)
    assert m["dynamic/trained_samples"] == m["gen/samples"] == N * G
    assert len(run.trained[0]) == N * G
    assert run.stats["put_trajectories"] == run.stats["taken_trajectories"] == N * G
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "e3rl.batching"]
    assert len(warnings) == 1 and "algo.max_refill_rounds=0" in warnings[0].getMessage()
    assert "raise algo.max_refill_rounds" in warnings[0].getMessage()


def test_off_is_one_round_with_the_usual_group_ids(env):
    off = DynamicSampling.from_config(replace(env.cfg, algo=replace(env.cfg.algo, dynamic_sampling=False)))
    assert off == DynamicSampling(False, N, 4) and off.rounds == 1
    run = _run(env, off, 1, lambda step, r: ["right", "wrong"])  # uniform groups: trained all the same
    (call,) = run.calls
    assert call.groups == [0, 1] and call.seed == env.cfg.run.seed * 100_003
    (m,) = run.metrics
    assert not any(k.startswith("dynamic/") for k in m)
    assert m["gen/samples"] == len(run.trained[0]) == N * G
    assert run.stats["put_trajectories"] == run.stats["taken_trajectories"] == N * G
    assert [r.hex() for r in run.trained_refs[0]] == [r.hex() for r in call.rollout.refs]  # no filtering

"""The Ray shell: versioned weights by object-store reference, same output as the plain class."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.generator import RewindableGenerator
from actors.rollout_stats import FIRST_ATTEMPTS_KEY, judged_first_attempts
from e3rl.core.threshold import UncertaintyHistory
from e3rl.config import Config, GenConfig, HealConfig, ResourcesConfig
from e3rl.models import load_model
from tests.conftest import tiny_model_config

ray = pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[2]


def test_actor_loads_versioned_weights_and_matches_plain_class(ray_session, tokenizer):
    from actors.generator_actor import make_generator_actor

    cfg = Config(model=tiny_model_config(), gen=GenConfig(backend="hf", group_size=2, max_new_tokens=10),
                 heal=HealConfig(segment_tokens=4, threshold_k=0.0), resources=ResourcesConfig(torch_threads=1))
    actor = make_generator_actor(cfg, num_gpus=0, num_cpus=0.5, seed=11, max_restarts=0)
    policy = load_model(tiny_model_config(), seed=5)  # differs from the actor's own random init
    ref = ray.put({k: v.detach().cpu() for k, v in policy.state_dict().items()})
    assert ray.get(actor.load_weights.remote(ref, 1)) is True
    assert ray.get(actor.load_weights.remote(ref, 1)) is False  # same version: skipped
    prompts, groups = [tokenizer.encode("Step 1: add"), tokenizer.encode("Hi")], [3, 4]
    history = UncertaintyHistory(mean=30.0, var=1.0, count=10)  # the driver's, sent with the call (above every U)
    trajs_ref, stats_ref = actor.generate.remote(prompts, groups, ["a", "b"], history=history)
    trajs, stats = ray.get(trajs_ref), ray.get(stats_ref)
    assert stats["gen/samples"] == 4 and stats["gen/tokens_produced"] == sum(t.stream_ids.numel() for t in trajs)

    plain = RewindableGenerator.from_config(policy, tokenizer, cfg, seed=11)
    plain.history = history
    expected = plain.generate(prompts, groups, ["a", "b"])
    assert [t.prompt_uid for t in trajs] == ["a", "a", "b", "b"]
    assert all(t.policy_version == 1 for t in trajs)
    for a, b in zip(trajs, expected):
        assert torch.equal(a.stream_ids, b.stream_ids) and torch.equal(a.erased_at, b.erased_at)
        torch.testing.assert_close(a.behavior_logp, b.behavior_logp)
    # the judged first attempts the driver folds into the history (its torch may use another thread count: ~1e-8 apart)
    flat = [x for pair in stats[FIRST_ATTEMPTS_KEY] for x in pair]
    assert flat and flat == pytest.approx([x for pair in judged_first_attempts(expected) for x in pair])
    ray.kill(actor)


def test_actor_scores_rewards_and_overrides_group_size(ray_session, tokenizer):
    from actors.generator_actor import make_generator_actor
    from e3rl.tasks.base import Problem

    cfg = Config(model=tiny_model_config(), gen=GenConfig(backend="hf", group_size=2, max_new_tokens=6),
                 resources=ResourcesConfig(torch_threads=1))
    actor = make_generator_actor(cfg, num_cpus=0.5, seed=3)
    problems = [Problem("p0", "1+1", "2", "test"), Problem("p1", "2+2", "4", "test")]
    prompts = [tokenizer.encode(p.prompt) for p in problems]
    trajs_ref, stats_ref = actor.generate.remote(prompts, [0, 1], ["p0", "p1"], problems, 3, False)
    trajs, stats = ray.get([trajs_ref, stats_ref])
    assert len(trajs) == 6 and [t.sample_index for t in trajs] == [0, 1, 2, 0, 1, 2]
    # random weights never answer: every reward is a real score of 0 (math-verify ran, no errors)
    assert all(t.reward == 0.0 and not t.correct for t in trajs)
    # scored by the actor's reward worker process (forkserver inside a Ray actor): nothing failed
    assert (stats["reward/accuracy"], stats["reward/errors"], stats["reward/timeouts"]) == (0.0, 0.0, 0.0)
    assert all(t.rewinds == 0 for t in trajs)  # heal=False override
    ray.kill(actor)


def stalling_reward(response: str, problem) -> float:
    """A reward that never finishes on one problem (like sympy expanding `(x+1)^{9999}`)."""
    if problem.uid == "slow":
        import time

        time.sleep(3600)
    return 0.0


def test_a_stalled_reward_cannot_stall_the_step(ray_session, tokenizer):
    """The actor's scoring has a hard per-response limit (`reward.timeout_s`, default 5 s): the step
    returns, the stalled responses score 0 and are counted. It once scored in the actor itself, with
    no limit: one such answer held the whole step."""
    from actors.generator_actor import make_generator_actor
    from e3rl.config import RewardConfig
    from e3rl.tasks.base import Problem

    cfg = Config(model=tiny_model_config(), gen=GenConfig(backend="hf", group_size=2, max_new_tokens=4),
                 reward=RewardConfig(fn=f"{__name__}:stalling_reward"), resources=ResourcesConfig(torch_threads=1))
    actor = make_generator_actor(cfg, num_cpus=0.5, seed=3,
                                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    problems = [Problem("slow", "1+1", "2", "test"), Problem("fast", "2+2", "4", "test")]
    prompts = [tokenizer.encode(p.prompt) for p in problems]
    try:
        trajs_ref, stats_ref = actor.generate.remote(prompts, [0, 1], ["slow", "fast"], problems)
        ready, _ = ray.wait([stats_ref], timeout=150)  # 2 stalled responses x 5 s, plus start-up under load
        assert ready, "the step did not finish: a stalled reward held it"
        stats, trajs = ray.get(stats_ref), ray.get(trajs_ref)
        assert stats["reward/timeouts"] == 2.0 and stats["reward/errors"] == 0.0
        assert all(t.reward == 0.0 for t in trajs)
    finally:
        ray.kill(actor)

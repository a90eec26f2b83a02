"""The Ray shell: versioned weights by object-store reference, same output as the plain class."""
from __future__ import annotations

import pytest
import torch

from actors.generator import RewindableGenerator
from e3rl.config import Config, GenConfig, HealConfig
from e3rl.models import load_model
from tests.conftest import tiny_model_config

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session():
    # RAY_AUTH_MODE unset makes an embedded ray.init turn token auth on for later CLI calls (NOTES.md)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


def test_actor_loads_versioned_weights_and_matches_plain_class(ray_session, tokenizer):
    from actors.generator_actor import make_generator_actor

    cfg = Config(model=tiny_model_config(), gen=GenConfig(group_size=2, max_new_tokens=10),
                 heal=HealConfig(segment_tokens=4, threshold_k=0.0))
    actor = make_generator_actor(cfg, num_gpus=0, num_cpus=0.5, seed=11, max_restarts=0)
    policy = load_model(tiny_model_config(), seed=5)  # differs from the actor's own random init
    ref = ray.put({k: v.detach().cpu() for k, v in policy.state_dict().items()})
    assert ray.get(actor.load_weights.remote(ref, 1)) is True
    assert ray.get(actor.load_weights.remote(ref, 1)) is False  # same version: skipped
    prompts, groups = [tokenizer.encode("Step 1: add"), tokenizer.encode("Hi")], [3, 4]
    trajs = ray.get(actor.generate.remote(prompts, groups, ["a", "b"]))

    plain = RewindableGenerator.from_config(policy, tokenizer, cfg, seed=11)
    expected = plain.generate(prompts, groups, ["a", "b"])
    assert [t.prompt_uid for t in trajs] == ["a", "a", "b", "b"]
    assert all(t.policy_version == 1 for t in trajs)
    for a, b in zip(trajs, expected):
        assert torch.equal(a.stream_ids, b.stream_ids) and torch.equal(a.erased_at, b.erased_at)
        torch.testing.assert_close(a.behavior_logp, b.behavior_logp)
    history = ray.get(actor.get_history.remote())  # (its torch may use another thread count: ~1e-8 apart)
    assert history.count == plain.history.count and history.mean == pytest.approx(plain.history.mean)
    ray.kill(actor)

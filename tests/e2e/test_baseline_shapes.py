"""Every Qwen3-4B baseline config, shrunk to the tiny model, trains end to end with the real roles
(GeneratorGroup, object-store buffer, ZeRO-3 LearnerGroup) in the shared Ray session.

The `algo` section (and DAPO's overlong shaping) is read from `configs/qwen3-4b-<name>.yaml`
itself, so the shape tested is the shipped one; only the sizes shrink: 2 prompts per step, and a
config that trains in mini-batches gets 2 of them (1 prompt each). The reward
(`tests.e2e.outcome_rewards`) gives the problems of its `mixed` kind groups with mixed outcomes, so
advantages are non-zero; DAPO draws from all kinds, so its dynamic sampling has groups to drop.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import ray
import yaml

from e3rl.batching import DynamicSampling
from e3rl.config import load_config
from e3rl.core.dynamic_sampling import round_group_ids
from e3rl.data import encode_prompts, load_workload
from e3rl.loop import Hooks, LoopState, train
from e3rl.models import load_tokenizer
from e3rl.prompts import PromptStream
from e3rl.session import build_roles
from tests.e2e.outcome_rewards import kind

REPO = Path(__file__).resolve().parents[2]
STEPS = 2
SHAPES = ("grpo", "dapo", "drgrpo", "gspo", "sapo")


def shape_overrides(name: str, max_new_tokens: int) -> list[str]:
    """The shipped baseline's algo (and overlong reward) settings as overrides of configs/tiny.yaml."""
    shipped = yaml.safe_load((REPO / f"configs/qwen3-4b-{name}.yaml").read_text())
    out = []
    for key, value in shipped["algo"].items():
        if key == "prompts_per_step":
            continue
        if key == "mini_batch_prompts":
            value = 1 if value else 0  # 2 mini-batches of 1 prompt when the baseline uses mini-batches
        out.append(f"algo.{key}={value}")
    reward, budget = shipped.get("reward", {}), shipped["gen"]["max_new_tokens"]
    if reward.get("overlong_buffer"):  # the same fraction of the response budget
        out += [f"reward.overlong_buffer={round(max_new_tokens * reward['overlong_buffer'] / budget)}",
                f"reward.overlong_penalty={reward['overlong_penalty']}"]
    return out


@pytest.fixture(scope="module", params=SHAPES)
def shape(request, ray_session, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp(f"shape_{name}")
    base = load_config(REPO / "configs/tiny.yaml")
    cfg = load_config(REPO / "configs/tiny.yaml", [f"run.output_dir={out}", "reward.fn=tests.e2e.outcome_rewards:outcome_reward",
                                                   *shape_overrides(name, base.gen.max_new_tokens)])
    tok = load_tokenizer(cfg.model)
    problems = load_workload(cfg, tok).train
    if not cfg.algo.dynamic_sampling:  # mixed groups only, so every mini-batch carries a gradient
        problems = [p for p in problems if kind(p) == "mixed"]
    stream = PromptStream(problems, cfg.algo.prompts_per_step, seed=cfg.data.seed)
    sampling = DynamicSampling.from_config(cfg)
    roles = build_roles(cfg)
    logged: list[dict] = []

    def next_batch(step: int, round_: int):
        problems = stream.next_batch()
        return problems, encode_prompts(cfg, problems, tok), round_group_ids(step, round_, sampling.rounds, len(problems))

    try:
        state = train(roles, LoopState(), STEPS, cfg.run.seed, 0, 0,
                      Hooks(next_batch, lambda step: {}, lambda: None, lambda step, m: logged.append(m)), sampling)
        buffer = ray.get(roles.buffer.stats.remote())
        yield name, cfg, state, logged, buffer
    finally:
        roles.generators.shutdown()
        roles.learner.shutdown()
        ray.kill(roles.buffer)


def test_baseline_shape_trains_as_its_paper_defines(shape):
    name, cfg, state, steps, buffer = shape
    updates = cfg.updates_per_step
    assert updates == (1 if name == "grpo" else 2)
    assert len(steps) == STEPS and state.version == STEPS * updates
    for m in steps:
        assert m["learner/updates"] == updates and m["learner/skipped"] == 0
        assert m["learner/seqs"] == cfg.samples_per_step  # dynamic sampling keeps the batch size
    if updates == 1:
        assert all(m["learner/approx_kl"] == 0 and m["learner/clip_frac"] == 0 for m in steps)  # ratio exactly 1
    else:  # the frozen pi_old: from the second optimizer step on the ratio moves
        assert all(m["learner/approx_kl"] > 0 for m in steps)
    if name == "sapo":
        assert all(m["learner/clip_frac"] > 0 for m in steps)  # the gate took a share of the gradient
    assert buffer["put_trajectories"] == buffer["taken_trajectories"] == STEPS * cfg.samples_per_step


def test_dapo_shape_samples_dynamically_and_shapes_overlong_rewards(shape):
    name, cfg, state, steps, buffer = shape
    if name != "dapo":
        assert not any(k.startswith("dynamic/") for m in steps for k in m)
        return
    assert cfg.algo.dynamic_sampling and cfg.reward.overlong_buffer > 0
    for m in steps:
        assert m["dynamic/kept_groups"] + m["dynamic/fallback_groups"] == cfg.algo.prompts_per_step
        assert m["dynamic/trained_samples"] == cfg.samples_per_step
        assert m["gen/samples"] == m["dynamic/rounds"] * cfg.samples_per_step  # every round is counted
        assert "reward/overlong_penalty" in m
    assert state.samples == sum(m["gen/samples"] for m in steps)

"""Thin Ray shell around `RewindableGenerator`: build from the Config, take versioned weights,
generate and score.

All decoding logic lives in the plain class (testable without Ray). Weights arrive as an
object-store reference: Ray resolves a ref passed as a top-level argument, so the learner
`ray.put`s one CPU state dict per version and every generator reads the same copy. `generate`
returns two objects: the trajectories (they stay in the object store; the driver passes the ref
on without fetching) and a small stats dict the driver does fetch. Rewards are scored here,
after decoding, so scoring never stalls the decode loop and no payload crosses the driver.
"""
from __future__ import annotations

import dataclasses
import os
import random
import time
from typing import Callable, Optional, Sequence

import ray
import torch

from actors.generator import RewindableGenerator
from actors.rollout_stats import rollout_stats
from e3rl.config import Config
from e3rl.core.threshold import UncertaintyHistory
from e3rl.core.trajectory import Trajectory
from e3rl.models import actor_threads, load_model, load_tokenizer, resolve_device
from e3rl.tasks.base import Problem


def make_reward_fn(cfg: Config) -> Callable[[str, Problem], float]:
    """The configured reward: `auto`/`math_verify` built in, or a user's `module:function`."""
    from e3rl.rewards import format_reward, load_reward_fn, math_reward, problem_reward

    spec = cfg.reward.fn
    base = (problem_reward if spec == "auto"
            else (lambda resp, prob: math_reward(resp, prob.answer)) if spec == "math_verify"
            else load_reward_fn(spec))
    w = cfg.reward.format_weight
    if w == 0:
        return base
    return lambda resp, prob: base(resp, prob) + w * format_reward(resp)


def score(trajs: Sequence[Trajectory], problems: Sequence[Problem], group_size: int,
          reward_fn: Callable[[str, Problem], float]) -> int:
    """Fill `reward` in place (G consecutive trajectories per problem). -> number of scoring errors."""
    errors = 0
    for i, t in enumerate(trajs):
        try:
            t.reward = float(reward_fn(t.response_text, problems[i // group_size]))
        except Exception:  # a broken answer or reward fn scores 0 and is counted, never crashes a run
            t.reward, errors = 0.0, errors + 1
    return errors


class GeneratorWorker:
    """Owns one model (GPU-resident when there is one) and its rewindable generator."""

    def __init__(self, cfg: Config, seed: int = 0):
        torch.set_num_threads(actor_threads(cfg.resources.torch_threads))
        self.cfg = cfg
        device = resolve_device(cfg.model.device)
        model = load_model(cfg.model, device=device, seed=cfg.run.seed)
        self.generator = RewindableGenerator.from_config(model, load_tokenizer(cfg.model), cfg, seed)
        self.reward_fn = make_reward_fn(cfg)
        self.batches = 0
        self._fault_rng = random.Random(seed)

    def load_weights(self, weights, version: int) -> bool:
        """Load a state dict (or a ref to one) unless this version is already loaded. True if loaded."""
        if version == self.generator.policy_version:
            return False
        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        self.generator.load_weights(weights, version)
        return True

    @ray.method(num_returns=2)
    def generate(self, prompts: list, group_ids: list, prompt_uids: Optional[list] = None,
                 problems: Optional[list] = None, group_size: Optional[int] = None,
                 heal: Optional[bool] = None, seed: Optional[int] = None) -> tuple[list, dict]:
        """Trajectories (scored when `problems` are given) and their stats.

        `group_size` / `heal` override the config for evaluation (e.g. k samples, healing on/off).
        `seed` reseeds sampling, so a step's rollouts are a function of (run seed, step, shard):
        a regenerated shard or a resumed run samples exactly what the original would have.
        """
        self._maybe_fail()
        g = self.generator
        if seed is not None:
            g.rng.manual_seed(seed)
        saved = (g.gen, g.heal_active)
        if group_size is not None:
            g.gen = dataclasses.replace(g.gen, group_size=group_size)
        if heal is not None:
            g.heal_active = heal
        try:
            t0 = time.perf_counter()
            trajs = g.generate(prompts, group_ids, prompt_uids)
            seconds = time.perf_counter() - t0
        finally:
            g.gen, g.heal_active = saved
        errors = score(trajs, problems, len(trajs) // max(len(prompts), 1), self.reward_fn) if problems else 0
        self.batches += 1
        peak = g.stats.get("peak_cache_bytes", 0)
        return trajs, rollout_stats(trajs, seconds, peak) | {"gen/score_errors": float(errors)}

    def _maybe_fail(self) -> None:
        """Fault injection (run.fault.*) for reliability tests: exit the actor process."""
        f = self.cfg.run.fault
        if ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed:
            return  # inject once: the restarted actor must be able to finish the shard
        if (0 <= f.generator_die_after <= self.batches) or (f.generator_die_prob and self._fault_rng.random() < f.generator_die_prob):
            os._exit(1)

    def policy_version(self) -> int:
        return self.generator.policy_version

    def get_history(self) -> UncertaintyHistory:
        return self.generator.history

    def set_history(self, history: UncertaintyHistory) -> None:
        self.generator.history = history

    def stats(self) -> dict:
        return dict(self.generator.stats)


def make_generator_actor(cfg: Config, num_gpus: float = 0.0, num_cpus: float = 1.0, seed: int = 0,
                         max_restarts: int = 0, **options):
    """Start one generator actor; `options` go to `.options()` (name, runtime_env, scheduling_strategy, ...)."""
    cls = ray.remote(GeneratorWorker)
    return cls.options(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts, **options).remote(cfg, seed)

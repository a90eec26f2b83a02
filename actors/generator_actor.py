"""Thin Ray shell around `RewindableGenerator`: build from the Config, take versioned weights, generate.

All logic lives in the plain class (testable without Ray). Weights arrive as an object-store
reference: Ray resolves a ref passed as a top-level argument, so the learner `ray.put`s one CPU
state dict per version and every generator reads the same copy. `generate` returns trajectories
into the object store; the driver passes the ref on without fetching it.
"""
from __future__ import annotations

from typing import Callable, Optional

import ray

from actors.generator import RewindableGenerator
from e3rl.config import Config
from e3rl.core.threshold import UncertaintyHistory
from e3rl.models import load_model, load_tokenizer, resolve_device


class GeneratorWorker:
    """Owns one model (GPU-resident when there is one) and its rewindable generator."""

    def __init__(self, cfg: Config, seed: int = 0):
        device = resolve_device(cfg.model.device)
        model = load_model(cfg.model, device=device, seed=cfg.run.seed)
        self.generator = RewindableGenerator.from_config(model, load_tokenizer(cfg.model), cfg, seed)
        self.score_fn: Optional[Callable] = None  # (trajs) -> None: fills rewards in place

    def load_weights(self, weights, version: int) -> bool:
        """Load a state dict (or a ref to one) unless this version is already loaded. True if loaded."""
        if version == self.generator.policy_version:
            return False
        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        self.generator.load_weights(weights, version)
        return True

    def generate(self, prompts: list, group_ids: list, prompt_uids: Optional[list] = None) -> list:
        trajs = self.generator.generate(prompts, group_ids, prompt_uids)
        if self.score_fn is not None:
            self.score_fn(trajs)
        return trajs

    def set_score_fn(self, fn: Optional[Callable]) -> None:
        self.score_fn = fn

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

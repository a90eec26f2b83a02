"""Thin Ray shell around `RewindableGenerator`: build from the Config, take versioned weights,
generate and score.

All decoding logic lives in the plain class (testable without Ray). Weights arrive as an
object-store reference: Ray resolves a ref passed as a top-level argument, so the learner
`ray.put`s one CPU state dict per version and every generator reads the same copy. `generate`
returns two objects: the trajectories (they stay in the object store; the driver passes the ref
on without fetching) and a small stats dict the driver does fetch. Rewards are scored here,
after decoding, by the actor's `Scorer` (worker processes, a hard time limit per response), so
one slow answer cannot stall a step and no payload crosses the driver.
"""
from __future__ import annotations

import dataclasses
import os
import random
import time
from typing import Iterator, Optional, Sequence

import ray
import torch

from actors.generator import RewindableGenerator
from actors.rollout_stats import (FIRST_ATTEMPTS_KEY, OUTCOMES_KEY, judged_first_attempts, engine_stats, group_outcomes,
                                  rollout_stats)
from e3rl.config import Config
from e3rl.core.shaping import overlong_penalty
from e3rl.core.threshold import UncertaintyHistory
from e3rl.core.trajectory import Trajectory
from e3rl.data import resolve_reward_thinking
from e3rl.models import actor_threads, load_model, load_tokenizer, resolve_backend, resolve_device
from e3rl.rewards import Scorer, score_stats
from e3rl.tasks.base import Problem


def score(trajs: Sequence[Trajectory], problems: Sequence[Problem], group_size: int, scorer: Scorer,
          max_len: int) -> dict[str, float]:
    """Fill `reward` and `correct` in place (G consecutive trajectories per problem).
    -> `reward/accuracy`, `reward/timeouts`, `reward/errors` of the batch.

    With `reward.overlong_buffer` > 0, DAPO's soft overlong punishment against the response budget
    `max_len` (gen.max_new_tokens) is added to the reward, measured on kept tokens (erased attempts
    are not part of the answer); `correct` never changes. -> also `reward/overlong_penalty` (mean).
    """
    scores = scorer.score([t.response_text for t in trajs], [problems[i // group_size] for i in range(len(trajs))])
    cfg = scorer.cfg
    penalties = [overlong_penalty(int(t.kept_ids.numel()), max_len, cfg.overlong_buffer, cfg.overlong_penalty)
                 for t in trajs]
    for t, s, p in zip(trajs, scores, penalties):
        t.reward, t.correct = s.reward + p, s.correct
    out = score_stats(scores)
    if cfg.overlong_buffer > 0:
        out["reward/overlong_penalty"] = sum(penalties) / max(len(trajs), 1)
    return out


def build_generator(cfg: Config, seed: int, threads: Optional[int] = None):
    """The rollout engine `gen.backend` names, on the run's model: the HF decode loop
    (`RewindableGenerator`) or a vLLM engine (`VllmGenerator`). Both expose `generate`,
    `load_weights`, `rng`, `history`, `gen`, `heal_active`, `policy_version` and `stats`."""
    tokenizer = load_tokenizer(cfg.model)
    cfg = resolve_backend(cfg)  # the driver resolved `auto` already; a config built elsewhere may not have
    if cfg.gen.backend == "vllm":
        from actors.vllm_engine import check_vllm_installed
        from actors.vllm_generator import VllmGenerator

        check_vllm_installed(cfg.gen)
        return VllmGenerator.from_config(cfg, tokenizer, seed, threads)
    model = load_model(cfg.model, device=resolve_device(cfg.model.device), seed=cfg.run.seed)
    return RewindableGenerator.from_config(model, tokenizer, cfg, seed)


class GeneratorWorker:
    """Owns one model (GPU-resident when there is one) and its rewindable generator."""

    def __init__(self, cfg: Config, seed: int = 0, threads_share: int = 1):
        threads = actor_threads(cfg.resources.torch_threads, share=threads_share)
        torch.set_num_threads(threads)
        # the driver resolved `reward.thinking: auto` already; a config built elsewhere may not have
        if cfg.reward.thinking == "auto":
            cfg = resolve_reward_thinking(cfg, load_tokenizer(cfg.model))
        self.cfg = cfg
        self.generator = build_generator(cfg, seed, threads)
        self.scorer = Scorer(cfg.reward)  # worker processes, reused across steps
        self.batches = 0
        self.syncs = 0  # weight syncs begun (run.fault.generator_die_in_sync)
        self._fault_rng = random.Random(seed)

    def torch_threads(self) -> int:
        return torch.get_num_threads()

    def load_weights(self, weights, version: int) -> bool:
        """Load a state dict (or a ref to one) unless this version is already loaded. True if loaded."""
        if version == self.generator.policy_version:
            return False
        self.syncs += 1
        if self.syncs - 1 == self.cfg.run.fault.generator_die_in_sync and not self._reconstructed():
            os._exit(1)
        from learner.weights import FlatPolicy

        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        if isinstance(weights, FlatPolicy):  # published by the learner (object-store sync)
            self.generator.receive_weights(weights.items(), version)
        else:
            self.generator.load_weights(weights, version)
        return True

    def receive_weights(self, address, rank: int, specs: list, bucket_bytes: int, version: int) -> int:
        """Join the sync group's epoch (as `rank`) and load the policy as its buckets arrive.
        -> the version now loaded (-1: the stream broke; the group reloads this actor before it samples)."""
        from learner.sync_group import SyncGroup, plan_buckets

        try:
            g = getattr(self, "_sync", None)
            if g is None or g.address != address:
                self._sync = None
                self._sync = g = SyncGroup(address, rank, resolve_device(self.cfg.model.device))
            stream = g.receive(plan_buckets(specs, bucket_bytes))
            self.syncs += 1
            if self.syncs - 1 == self.cfg.run.fault.generator_die_in_sync and not self._reconstructed():
                stream = _exit_after_first_bucket(stream, plan_buckets(specs, bucket_bytes)[0])
            self.generator.receive_weights(stream, version)
        except (RuntimeError, TimeoutError):  # forming or receiving failed: the driver re-forms or falls back
            self._sync = None
            return -1
        return self.generator.policy_version

    @ray.method(num_returns=2)
    def generate(self, prompts: list, group_ids: list, prompt_uids: Optional[list] = None,
                 problems: Optional[list] = None, group_size: Optional[int] = None,
                 heal: Optional[bool] = None, seed: Optional[int] = None,
                 history: Optional[UncertaintyHistory] = None, sampling: Optional[dict] = None) -> tuple[list, dict]:
        """Trajectories (scored when `problems` are given) and their stats.

        `group_size` / `heal` / `sampling` (gen temperature, top_p, top_k) override the config for
        evaluation (e.g. k samples, healing on/off, a model card's inference sampling).
        `seed` reseeds sampling, so a step's rollouts are a function of (run seed, step, shard):
        a regenerated shard or a resumed run samples exactly what the original would have.
        `history` is the run's threshold history (the driver owns it and sends it with every
        call, so a restarted actor needs no state); the stats carry, under `FIRST_ATTEMPTS_KEY`, the
        (U, gap score) of this call's judged first attempts, for the driver to fold into the history
        once per step, and,
        under `OUTCOMES_KEY`, each scored group's `GroupOutcome` (for dynamic sampling).
        """
        self._maybe_fail()
        g = self.generator
        if seed is not None:
            g.rng.manual_seed(seed)
        if history is not None:
            g.history = history
        saved = (g.gen, g.heal_active)
        if group_size is not None:
            g.gen = dataclasses.replace(g.gen, group_size=group_size)
        if sampling:
            g.gen = dataclasses.replace(g.gen, **sampling)
        if heal is not None:
            g.heal_active = heal
        try:
            t0 = time.perf_counter()
            trajs = g.generate(prompts, group_ids, prompt_uids)
            seconds = time.perf_counter() - t0
        finally:
            g.gen, g.heal_active = saved
        scored = {}
        if problems:
            scored = score(trajs, problems, len(trajs) // max(len(prompts), 1), self.scorer, g.gen.max_new_tokens)
        self.batches += 1
        stats = rollout_stats(trajs, seconds, g.stats.get("peak_cache_bytes", 0)) | engine_stats(g.stats) | scored
        return trajs, stats | {FIRST_ATTEMPTS_KEY: judged_first_attempts(trajs),
                               OUTCOMES_KEY: group_outcomes(trajs) if problems else []}

    @staticmethod
    def _reconstructed() -> bool:
        """A restarted actor injects no fault: it must be able to finish what its death interrupted."""
        return ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed

    def _maybe_fail(self) -> None:
        """Fault injection (run.fault.*) for reliability tests: exit the actor process."""
        f = self.cfg.run.fault
        due = (0 <= f.generator_die_after <= self.batches) or (f.generator_die_prob and self._fault_rng.random() < f.generator_die_prob)
        if due and not self._reconstructed():  # asked only when due: the Ray call behind it warns
            os._exit(1)

    def policy_version(self) -> int:
        return self.generator.policy_version

    def weights_dtype(self) -> str:
        """The dtype this generator's model computes in ("bfloat16"): what a weight sync sends."""
        g = self.generator
        dtype = g.engine.dtype if hasattr(g, "engine") else next(g.model.parameters()).dtype
        return str(dtype).removeprefix("torch.")

    def model_state(self) -> dict:
        """Inspection (HF backend): the model's state dict as CPU tensors."""
        return {k: v.detach().cpu() for k, v in self.generator.model.state_dict().items()}

    def stats(self) -> dict:
        return dict(self.generator.stats)


def _exit_after_first_bucket(stream, first) -> Iterator:
    """Fault injection: pass the first bucket's tensors on (the model is then half-updated), then
    exit the process, as a generator that dies in the middle of a sync would."""
    for i, item in enumerate(stream):
        yield item
        if i + 1 == len(first.slots):
            os._exit(1)


def make_generator_actor(cfg: Config, num_gpus: float = 0.0, num_cpus: float = 1.0, seed: int = 0,
                         max_restarts: int = 0, threads_share: int = 1, **options):
    """Start one generator actor; `options` go to `.options()` (name, runtime_env, scheduling_strategy, ...).
    `threads_share`: generators on its node (they split its cores)."""
    cls = ray.remote(GeneratorWorker)
    return cls.options(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts,
                       **options).remote(cfg, seed, threads_share)

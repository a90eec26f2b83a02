"""The driver loop: one timed line per phase. No math here (it lives in e3rl.core and the roles)
and no algorithm switches (chosen at setup, in the config's derived values).

    (data -> generate, one or more rounds) -> buffer -> train -> sync -> (eval, checkpoint) -> log
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional

import ray

from e3rl.batching import DynamicSampling, NextBatch, collect_batch
from e3rl.weight_sync import SyncReport, sync_through_object_store


@dataclass
class PhaseTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t

    def as_metrics(self) -> dict[str, float]:
        return {f"time/{k}_s": v for k, v in self.seconds.items()} | {"time/step_s": sum(self.seconds.values())}


@dataclass
class Roles:
    generators: Any  # actors.generator_group.GeneratorGroup
    buffer: Any  # Ray actor handle of actors.replay_buffer.ReplayBuffer
    learner: Any  # learner.group.LearnerGroup
    sync: Optional[Callable[[], int]] = None  # the collective weight sync; None: through the object store


@dataclass
class LoopState:
    """What a resumed run needs besides weights and optimizer (those are in the checkpoint)."""

    step: int = 0
    version: int = 0
    samples: int = 0
    tokens: int = 0  # generated, erased ones included
    cursor: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)


@dataclass
class Hooks:
    """The run's side effects, injected so the loop stays a loop."""

    next_batch: NextBatch  # (step, generation round) -> (problems, prompt ids, group ids)
    evaluate: Callable[[int], dict[str, float]]
    checkpoint: Callable[[], None]
    log: Callable[[int, dict[str, float]], None]
    should_stop: Callable[[], bool] = lambda: False
    trace: Callable[[int, list], None] = lambda step, refs: None  # (step, trajectory refs) after training


def sync_weights(roles: Roles) -> SyncReport:
    if roles.sync is not None:  # resources.weight_sync: collective (e3rl.weight_sync)
        return roles.sync()
    return sync_through_object_store(roles.learner, roles.generators)


def budget_spent(state: LoopState, token_budget: int) -> bool:
    return token_budget > 0 and state.tokens >= token_budget


def train(roles: Roles, state: LoopState, steps: int, seed: int, eval_every: int, save_every: int,
          hooks: Hooks, sampling: DynamicSampling = DynamicSampling(), token_budget: int = 0) -> LoopState:
    """Run steps state.step+1 .. steps, or until `token_budget` tokens are generated; returns the
    final state (also updated in place)."""
    state.version = sync_weights(roles).version
    while state.step < steps and not budget_spent(state, token_budget) and not hooks.should_stop():
        t = PhaseTimer()
        batch = collect_batch(roles.generators, hooks.next_batch, state.step, seed * 100_003 + state.step,
                              sampling, timer=t)  # the "data" and "generate" phases, each round
        roles.generators.fold_history(batch.first_attempts)
        with t("buffer"):
            # the batch's own version (its oldest trajectory's), so a generator that missed a sync is caught
            ray.get(roles.buffer.put.remote(batch.refs, batch.policy_version, batch.trained_samples))
            item = ray.get(roles.buffer.get.remote(state.version))
        with t("train"):
            learn = roles.learner.train_step(item.refs)
        with t("sync"):
            synced = sync_weights(roles)
        state.version = synced.version
        state.history = asdict(roles.generators.history)
        state.step += 1
        state.samples += batch.generated_samples
        state.tokens += int(batch.metrics.get("gen/tokens_produced", 0))
        hooks.trace(state.step, item.refs)
        metrics = batch.metrics | learn | t.as_metrics() | synced.metrics() | {
            "buffer/fill": float(ray.get(roles.buffer.size.remote()))}
        last = state.step >= steps or budget_spent(state, token_budget)  # evaluated after the loop
        if eval_every and state.step % eval_every == 0 and not last:
            metrics |= hooks.evaluate(state.step)
        hooks.log(state.step, metrics)  # then the checkpoint: a crash between them redoes and re-logs the step
        if save_every and state.step % save_every == 0:
            hooks.checkpoint()
    return state

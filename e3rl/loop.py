"""The driver loop: one timed line per phase. No math here (it lives in e3rl.core) and no
algorithm switches (they were chosen at setup, in the config's derived values).

    generate -> buffer -> train -> sync -> (eval, checkpoint) -> log
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import ray

from e3rl.config import Config


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


@dataclass
class LoopState:
    """Everything a resumed run needs besides weights and optimizer (those are in the checkpoint)."""

    step: int = 0
    version: int = 0
    samples: int = 0
    cursor: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)


def train(
    cfg: Config,
    roles: Roles,
    next_batch: Callable[[], list],
    state: LoopState,
    evaluate: Callable[[int], dict[str, float]],
    checkpoint: Callable[[LoopState], None],
    log: Callable[[int, dict[str, float]], None],
) -> LoopState:
    """Run steps state.step .. cfg.run.steps; returns the final state."""
    run = cfg.run
    roles.generators.load_weights(roles.learner.publish_weights(state.version), state.version)
    while state.step < run.steps:
        t = PhaseTimer()
        with t("data"):
            batch = next_batch()
        with t("generate"):
            refs, gen_stats = roles.generators.generate(batch, state.version)
        with t("buffer"):
            ray.get(roles.buffer.put.remote(refs, state.version, gen_stats["gen/samples"]))
            item = ray.get(roles.buffer.get.remote(state.version))
        with t("train"):
            learn = roles.learner.train_step(item.refs)
        with t("sync"):
            state.version += 1
            roles.generators.load_weights(roles.learner.publish_weights(state.version), state.version)
        state.step += 1
        state.samples += int(gen_stats["gen/samples"])
        state.history = roles.generators.merge_histories()
        metrics = gen_stats | learn | t.as_metrics() | {"sync/policy_version": state.version,
                                                        "buffer/fill": ray.get(roles.buffer.size.remote())}
        if run.eval_every and state.step % run.eval_every == 0 and state.step < run.steps:
            metrics |= evaluate(state.step)
        if run.save_every and state.step % run.save_every == 0:
            checkpoint(state)
        log(state.step, metrics)
    return state

"""Thin Ray shell around `LearnerWorker`: all logic lives in the plain class (testable without Ray)."""
from __future__ import annotations

import ray
import torch

from e3rl.config import Config
from e3rl.models import actor_threads
from learner.worker import LearnerWorker


class LearnerRank(LearnerWorker):
    """Process-level setup that belongs to the actor, not the plain class: torch threads
    (the `threads_share` ranks on its node split its cores; generators are idle while the learner trains)."""

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, threads_share: int = 1):
        torch.set_num_threads(actor_threads(cfg.resources.torch_threads, share=threads_share))
        super().__init__(cfg, rank, world_size)


LearnerActor = ray.remote(max_restarts=0, max_concurrency=1)(LearnerRank)
"""One ZeRO-3 rank per actor. Sized and placed by `learner.group.LearnerGroup`."""

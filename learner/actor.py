"""Thin Ray shell around `LearnerWorker`: all logic lives in the plain class (testable without Ray)."""
from __future__ import annotations

import ray

from learner.worker import LearnerWorker

LearnerActor = ray.remote(max_restarts=0, max_concurrency=1)(LearnerWorker)
"""One ZeRO-3 rank per actor. Sized and placed by `learner.group.LearnerGroup`."""

"""Run metrics, written four ways from one call: metrics.jsonl, TensorBoard, Ray metrics, console.

Names are namespaced (`gen/…`, `e3rl/…`, `learner/…`, `sync/…`, `time/…`, `eval/…`). Ray gauges
(`ray.util.metrics`) are exported on the cluster's Prometheus endpoint with a `ray_e3rl_` prefix
and show in the dashboard's metrics view.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

# Gauges exported to Ray's metrics endpoint: metric name -> description.
RAY_GAUGES = {
    "gen/reward_mean": "mean training reward of the step",
    "e3rl/rewinds_per_sample": "segment erasures per trajectory",
    "buffer/fill": "trajectory batches waiting in the replay buffer",
    "gen/tokens_per_s": "generated (kept + erased) tokens per second",
    "sync/policy_version": "policy version served to generators",
    "time/generate_s": "seconds spent generating in the step",
    "time/train_s": "seconds spent in the learner step",
    "time/sync_s": "seconds spent broadcasting weights",
    "eval/accuracy": "held-out accuracy of the plain policy (sampled)",
    "eval/accuracy_healed": "held-out accuracy with test-time self-healing (sampled)",
}


def _ray_name(name: str) -> str:
    return "e3rl_" + name.replace("/", "_")


def drop_rows_after(path: Path, step: int) -> int:
    """Keep the rows of steps <= `step` (atomic rewrite). A resumed run redoes the steps after its
    checkpoint, so their rows from the lost session go: every step is logged exactly once.
    -> rows dropped."""
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line torn by a kill mid-write
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return len(lines) - len(keep)


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training-step rows, evaluation rows) of a run's metrics.jsonl, in file order."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "gen/reward_mean" in r], [r for r in rows if "eval/accuracy" in r]


class MetricsLogger:
    def __init__(self, out_dir: Path, steps: int, progress: bool = True, use_ray: bool = True,
                 resumed_step: int = 0):
        self.out_dir = Path(out_dir)
        self.steps = steps
        self.progress = progress
        drop_rows_after(self.out_dir / "metrics.jsonl", resumed_step)
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a", buffering=1)
        self._tb = self._tensorboard()
        self._gauges = self._ray_gauges() if use_ray else {}
        self._t0 = time.time()

    def _tensorboard(self) -> Optional[Any]:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: the jsonl still has everything
            return None
        return SummaryWriter(str(self.out_dir / "tensorboard"))

    def _ray_gauges(self) -> dict:
        try:
            from ray.util.metrics import Gauge
        except Exception:
            return {}
        return {k: Gauge(_ray_name(k), description=d) for k, d in RAY_GAUGES.items()}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        self._jsonl.write(json.dumps({"step": step, "wall_s": round(time.time() - self._t0, 3), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        for k, g in self._gauges.items():
            if k in clean:
                g.set(clean[k])
        if self.progress:
            self._bar(step, clean)

    def _bar(self, step: int, m: dict[str, float]) -> None:
        done = int(20 * step / max(self.steps, 1))
        parts = [f"[{'#' * done}{'.' * (20 - done)}] step {step}/{self.steps}"]
        for key, label in (("gen/reward_mean", "reward"), ("e3rl/rewinds_per_sample", "rewinds/sample"),
                           ("eval/accuracy", "eval acc"), ("time/step_s", "s/step")):
            if key in m:
                parts.append(f"{label} {m[key]:.3f}")
        print("  ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()

"""The learner group: N ZeRO-3 ranks as Ray actors behind one object; each call fans out and gathers.

Placement: one bundle per rank ({CPU: resources.cpus_per_learner, GPU: gpus_per_learner}) in a
placement group with `resources.placement_strategy`. If the cluster cannot hold it within
`placement_timeout_s` we remove it and raise one clear line instead of pending forever.
Rendezvous: rank 0 reports its node IP and a free port; every rank uses them as MASTER_ADDR/PORT
and joins torch.distributed (gloo on CPU, NCCL on GPU, chosen from the device).
Data: `train_step` puts the batch in the object store once; every rank reads the same object.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import ray
import torch
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from e3rl.config import Config, RunHalted
from e3rl.placement import bundles_per_node, reserve_bundles
from e3rl.core.trajectory import Trajectory
from learner import checkpoint as ckpt
from learner.sync_group import GroupAddress
from learner.weights import WeightHandle

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def bundle(cfg: Config) -> dict[str, float]:
    r = cfg.resources
    b = {"CPU": r.cpus_per_learner, "GPU": r.gpus_per_learner, **r.learner_resources}
    b = {k: float(v) for k, v in b.items() if v > 0}
    return b or {"CPU": 0.01}  # Ray rejects empty bundles


def default_runtime_env(cfg: Config, extra_env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Actors need our packages on their path (they do not see the driver's sys.path) and, on
    CPU, DeepSpeed's CPU accelerator chosen up front (skips its accelerator probing)."""
    path = os.pathsep.join(p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path}
    if cfg.resources.gpus_per_learner == 0:
        env["DS_ACCELERATOR"] = "cpu"
    env.update(extra_env or {})
    return {"env_vars": env}


def reserve(cfg: Config, timeout_s: float) -> Any:
    """A ready placement group for the learner ranks, or a one-line ConfigError after `timeout_s`."""
    return reserve_bundles([bundle(cfg)] * cfg.learner.num_workers, cfg.resources.placement_strategy, timeout_s,
                           role="learner ranks", fields="learner.num_workers / resources.cpus_per_learner")


class LearnerGroup:
    """N learner ranks; every method is one fan-out + gather and returns rank 0's answer."""

    def __init__(self, cfg: Config, init_state: Optional[dict[str, torch.Tensor]] = None,
                 placement_timeout_s: float = 60.0, extra_env: Optional[dict[str, str]] = None):
        from learner.actor import LearnerActor

        self.cfg = cfg
        self.skipped_in_a_row = 0
        n, b = cfg.learner.num_workers, bundle(cfg)
        self.pg = reserve(cfg, placement_timeout_s)
        env = default_runtime_env(cfg, extra_env)
        share = bundles_per_node(self.pg)
        self.workers = [
            LearnerActor.options(
                num_cpus=b.get("CPU", 0), num_gpus=b.get("GPU", 0), runtime_env=env,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(cfg, i, n, share[i])
            for i in range(n)
        ]
        try:
            addr, port = ray.get(self.workers[0].master_address.remote())
            state = ray.put(init_state) if init_state is not None else None
            self.info = self._all("setup", addr, port, state)
        except Exception:
            self.shutdown()
            raise

    def _all(self, method: str, *args: Any) -> list[Any]:
        return ray.get([getattr(w, method).remote(*args) for w in self.workers])

    def train_step(self, trajs: Sequence[Any]) -> dict[str, float]:
        """One training step (`algo.epochs` x mini-batches optimizer steps, inside the ranks). -> metrics.

        `trajs`: Trajectory objects, or object-store refs to lists of them (as the replay buffer
        holds): refs are passed through, and every rank fetches the payload itself.
        """
        if all(isinstance(t, ray.ObjectRef) for t in trajs):
            ref = list(trajs)  # nested refs stay refs: Ray does not resolve them for us
        else:
            ref = ray.put(list(trajs))
        out = self._all("train_step", ref)[0]
        self._count_skip(out)
        return out

    def _count_skip(self, m: dict[str, float]) -> None:
        """A skipped optimizer step left the weights untouched; `run.max_skipped_steps` in a row stop the run."""
        all_skipped = m["learner/skipped"] == m["learner/updates"]
        self.skipped_in_a_row = (self.skipped_in_a_row if all_skipped else 0) + int(m["learner/skipped_trailing"])
        limit = self.cfg.run.max_skipped_steps
        if limit and self.skipped_in_a_row >= limit:
            what = "loss=nan" if m["learner/nonfinite_loss"] else f"grad norm {m['learner/grad_norm']:g}"
            raise RunHalted(
                f"learner: {self.skipped_in_a_row} consecutive optimizer steps skipped as non-finite ({what}); "
                f"weights are those of policy version {int(m['learner/version'])} — lower learner.lr, "
                "check the reward and data, or raise run.max_skipped_steps")

    def publish_weights(self) -> WeightHandle:
        """Gather on rank 0, one ray.put; generators `ray.get(handle.ref)` (see learner.weights)."""
        return self._all("publish_weights")[0]

    def sync_address(self, world_size: int, timeout_s: float) -> GroupAddress:
        """A new epoch of the sync group: learner rank 0's node (it serves the store), a port kept
        for the group's life, and an epoch number never handed out before on that port. The epoch
        names the store keys the members rendezvous under, so it must be unique per store, not
        per caller: two callers counting their own epochs (a re-created `CollectiveSync`, a bench
        with a second set of generators) met under one epoch's stale keys, and gloo's full-mesh
        connect then waited on members that had left."""
        if getattr(self, "_sync_port", None) is None:
            self._sync_host, self._sync_port = ray.get(self.workers[0].master_address.remote())
            self._sync_epoch = 0
        self._sync_epoch += 1
        return GroupAddress(self._sync_host, self._sync_port, world_size, self._sync_epoch, timeout_s)

    def send_weights(self, address: GroupAddress, bucket_bytes: int, cast: Optional[str] = None) -> list:
        """Start streaming the policy into the sync group (every rank gathers, rank 0 sends; `cast`:
        the generators' dtype); -> the ranks' refs: the caller starts the receivers, then gets rank
        0's result."""
        return [w.send_weights.remote(address, bucket_bytes, cast) for w in self.workers]

    def policy_version(self) -> int:
        return ray.get(self.workers[0].policy_version.remote())

    def sync_specs(self, cast: Optional[str] = None) -> list:
        return ray.get(self.workers[0].sync_specs.remote(cast))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._all("state_dict")[0]

    def forward_logits(self, trajs: Sequence[Trajectory]) -> torch.Tensor:
        return self._all("forward_logits", list(trajs))[0]

    def save_checkpoint(self, root: str, step: int, keep_last: Optional[int] = None,
                        extra: Optional[dict[str, Any]] = None) -> str:
        return self._all("save_checkpoint", str(root), step, keep_last, extra)[0]

    def load_checkpoint(self, root_or_dir: str) -> Optional[dict[str, Any]]:
        """Restore the newest complete checkpoint under a root (or a given dir); None if none."""
        p = Path(root_or_dir)
        d = p if ckpt.is_complete(p) else ckpt.latest_checkpoint(p)
        if d is None:
            return None
        return self._all("load_checkpoint", str(d))[0]

    def export_hf(self, out_dir: str) -> str:
        return self._all("export_hf", str(out_dir))[0]

    def shutdown(self) -> None:
        for w in getattr(self, "workers", []):
            ray.kill(w)
        self.workers = []
        if getattr(self, "pg", None) is not None:
            remove_placement_group(self.pg)
            self.pg = None

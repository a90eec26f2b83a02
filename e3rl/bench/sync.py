"""`python -m e3rl.bench sync [--model default|toy] [--generators 1,2,4] --out FILE.json`: weight sync time.

One ZeRO-3 learner rank and N generator actors (HF backend) on the embedded default's model
(SmolLM2-135M) or a toy; for each N, in the same run:
- `collective`: `CollectiveSync` — gather each bucket from the shards, broadcast over the gloo sync
  group, load in place (the first call forms the group and is reported apart);
- `object_store`: gather the whole state dict, one `ray.put`, every generator `ray.get`s and loads;
- the floors: a raw `broadcast` of the same bytes in the same buckets between N + 1 bare actors on
  a sync group (no gather, no load), and one `ray.put` + `ray.get` of the same bytes.
Medians over `--repeats` calls. And learner rank 0's peak RSS above its resting RSS during one
sync of each transport (Linux's resettable high-water mark), next to the model's size.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Optional, Sequence

import torch

from e3rl.bench import report


class RawPeer:
    """A bare sync-group member: broadcasts (rank 0) or receives flat buffers, nothing else."""

    def join(self, address, rank: int) -> None:
        from learner.sync_group import SyncGroup

        torch.set_num_threads(1)
        self.group = SyncGroup(address, rank, torch.device("cpu"))

    def run(self, bucket_bytes: int, total_bytes: int) -> float:
        t0 = time.perf_counter()
        left = total_bytes
        while left > 0:
            n = min(bucket_bytes, left)
            self.group.broadcast({torch.uint8: torch.ones(n, dtype=torch.uint8)})
            left -= n
        return time.perf_counter() - t0


def _reset_peak_rss(_worker=None) -> int:
    """Reset this process's peak RSS (Linux: /proc/self/clear_refs "5") -> its RSS now, bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def _peak_rss(_worker=None) -> int:
    """This process's peak RSS since the last reset, bytes."""
    return _status_kb("VmHWM") * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _extra_peak_rss(worker, fn) -> int:
    """How far learner rank 0's RSS rose above where it stood while `fn` ran (bytes)."""
    import ray

    base = ray.get(worker.__ray_call__.remote(_reset_peak_rss))
    fn()
    return ray.get(worker.__ray_call__.remote(_peak_rss)) - base


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _raw_broadcast_s(n: int, port: int, host: str, bucket_bytes: int, total: int, repeats: int, epoch: int) -> float:
    import ray

    from learner.sync_group import GroupAddress

    peer = ray.remote(num_cpus=0.1)(RawPeer)
    peers = [peer.remote() for _ in range(n + 1)]
    address = GroupAddress(host, port, n + 1, epoch, 120.0)
    ray.get([p.join.remote(address, r) for r, p in enumerate(peers)])
    times = []
    for _ in range(repeats):
        times.append(ray.get([p.run.remote(bucket_bytes, total) for p in peers])[0])
    for p in peers:
        ray.kill(p)
    return statistics.median(times)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m e3rl.bench sync", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--model", choices=("default", "toy"), default="default")
    ap.add_argument("--generators", default="1,2,4")
    ap.add_argument("--bucket-mb", type=float, default=32.0,
                    help="collective bucket (the default is under a tenth of SmolLM2-135M's 513 MB in fp32)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(list(argv or []))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from actors.generator_group import GeneratorGroup
    from e3rl.bench.learner import _bench_config, _object_store_floor
    from e3rl.config import GenConfig
    from e3rl.models import load_model, materialize_builtin
    from e3rl.weight_sync import CollectiveSync
    from learner.group import LearnerGroup
    from learner.worker import free_port

    if args.model == "default":
        materialize_builtin("builtin:smollm2-135m-instruct")
    counts = [int(x) for x in args.generators.split(",")]
    base = _bench_config(1, 16, 2, 8, args.model)
    base = dataclasses.replace(base, gen=dataclasses.replace(base.gen, backend="hf"),
                               model=dataclasses.replace(base.model, tokenizer=base.model.tokenizer
                                                         or "builtin:smollm2-135m-instruct"),
                               resources=dataclasses.replace(base.resources, cpus_per_generator=0.1, torch_threads=1))
    init = {k: v.clone() for k, v in load_model(base.model, seed=base.run.seed).state_dict().items()}
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        learner = LearnerGroup(base, init_state=init)
        bucket = int(args.bucket_mb * 2**20)
        for n in counts:
            cfg = dataclasses.replace(base, resources=dataclasses.replace(base.resources, num_generators=n))
            gens = GeneratorGroup(cfg)
            sync = CollectiveSync(learner, gens, args.bucket_mb, 120.0)
            t0 = time.perf_counter()
            sync()
            first = time.perf_counter() - t0
            parts = [sync() for _ in range(args.repeats)]

            def via_store():
                h = learner.publish_weights()
                gens.load_weights(h.ref, h.version)
                return h

            collective = _median_s(sync, args.repeats)
            store = _median_s(via_store, args.repeats)
            nbytes = via_store().num_bytes
            rss_collective = _extra_peak_rss(learner.workers[0], sync)
            rss_store = _extra_peak_rss(learner.workers[0], via_store)
            raw = _raw_broadcast_s(n, free_port(), "127.0.0.1", bucket, nbytes, args.repeats, epoch=n)
            floor = _object_store_floor(nbytes, args.repeats)
            rows.append({"generators": n, "bytes": nbytes, "collective_s": round(collective, 4),
                         "collective_first_s": round(first, 4), "raw_broadcast_s": round(raw, 4),
                         "collective_vs_raw": round(collective / raw, 2), "object_store_s": round(store, 4),
                         "object_store_floor_s": round(floor, 4), "object_store_vs_floor": round(store / floor, 2),
                         "gather_s": round(statistics.median(p.gather_s for p in parts), 4),
                         "send_s": round(statistics.median(p.send_s for p in parts), 4),
                         "failed_epochs": sync.failed_epochs, "fallbacks": sync.fallbacks,
                         "learner_extra_peak_rss_mb": {"collective": round(rss_collective / 2**20, 1),
                                                       "object_store": round(rss_store / 2**20, 1)},
                         "model_mb": round(nbytes / 2**20, 1)})
            gens.shutdown()
        learner.shutdown()
    finally:
        ray.shutdown()
    return report({"model": args.model, "bucket_mb": args.bucket_mb, "repeats": args.repeats, "rows": rows},
                  args.out)


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))

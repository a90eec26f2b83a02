"""Sampled trajectories kept with the run (traces/step_NNNNNN.arrow, Arrow IPC files in the
Trajectory schema), so the report can show real token streams, surprisal and erased segments
without the trainer holding them. Written atomically; read back with the core's Arrow codec."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from e3rl.core.trajectory import TRAJECTORY_SCHEMA, Trajectory, from_record_batch, to_record_batch


def trace_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "traces" / f"step_{step:06d}.arrow"


def write_trace(run_dir: Path, step: int, trajs: list[Trajectory]) -> Path:
    path = trace_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, TRAJECTORY_SCHEMA) as w:
        w.write_batch(to_record_batch(trajs))
    os.replace(tmp, path)
    return path


def read_traces(run_dir: Path) -> dict[int, list[Trajectory]]:
    """{step: trajectories} for every trace file of the run, in step order."""
    out: dict[int, list[Trajectory]] = {}
    for p in sorted((Path(run_dir) / "traces").glob("step_*.arrow")):
        with pa.memory_map(str(p)) as src:
            table = pa.ipc.open_file(src).read_all()
        out[int(p.stem.split("_")[1])] = [t for b in table.to_batches() for t in from_record_batch(b)]
    return out

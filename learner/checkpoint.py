"""Crash-safe checkpoints of the ZeRO-3 engine, and an HF-format export of the policy.

Layout under a run's checkpoint root (a filesystem every rank sees, as DeepSpeed requires):
    step_00000010/            one complete checkpoint
        ckpt/                 DeepSpeed's files (model + optimizer shards of every rank)
        meta.json             our state (step, policy version): JSON, never pickled
        COMPLETE              written last: every file's relative path and size
    latest                    name of the newest saved checkpoint (atomic; for humans and tools)
    .tmp-step_00000012/       a save in progress (ignored, removed by the next save)
A save writes into the temp dir, then one rename publishes it. A checkpoint whose COMPLETE marker
is missing or whose files do not match their recorded sizes (truncated copy, full disk) is
ignored in favour of the previous complete one. Loading never unpickles code: DeepSpeed's own
loader calls `torch.load(weights_only=False)`; we swap in `torch.load(weights_only=True)` with the
two DeepSpeed classes its files hold allowlisted, so a tampered checkpoint fails to load instead of
running code.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

TAG = "ckpt"
COMPLETE = "COMPLETE"
LATEST = "latest"
META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def temp_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f".tmp-step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _file_sizes(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file() and p.name != COMPLETE}


def write_meta(d: Path, meta: dict[str, Any]) -> None:
    _atomic_write(d / META, json.dumps(meta, indent=1))


def read_meta(d: Path) -> dict[str, Any]:
    return json.loads((Path(d) / META).read_text())


def mark_complete(d: Path) -> None:
    """Record every file and its size; the marker's presence means 'fully written'."""
    _atomic_write(d / COMPLETE, json.dumps({"files": _file_sizes(d)}, indent=1))


def is_complete(d: str | os.PathLike) -> bool:
    """Marker present and every recorded file present with its recorded size."""
    d = Path(d)
    try:
        recorded = json.loads((d / COMPLETE).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((d / rel).is_file() and (d / rel).stat().st_size == size for rel, size in recorded.items())


def _step_of(d: Path) -> int:
    m = _STEP_DIR.match(d.name)
    return int(m.group(1)) if m else -1


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint dirs, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and _step_of(d) >= 0 and is_complete(d)]
    return sorted(dirs, key=_step_of)


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint (None if there is none).

    The scan, not the `latest` pointer, decides: a crash between the rename and the pointer write
    leaves the pointer one behind, and a truncated newest dir must lose to the previous one. The
    pointer is kept for humans and external tools.
    """
    found = complete_checkpoints(root)
    return found[-1] if found else None


def prepare_save(root: str | os.PathLike, step: int) -> Path:
    """Rank 0, before the collective save: a clean temp dir."""
    tmp = temp_dir(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish_save(root: str | os.PathLike, step: int, meta: dict[str, Any], keep_last: int) -> Path:
    """Rank 0, after every rank wrote: meta, marker, rename, `latest`, prune."""
    root, tmp, final = Path(root), temp_dir(root, step), step_dir(root, step)
    write_meta(tmp, meta)
    mark_complete(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write(root / LATEST, final.name)
    prune(root, keep_last)
    return final


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop older ones and stale temp dirs."""
    for d in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob(".tmp-step_*"):
        shutil.rmtree(d, ignore_errors=True)


def save_engine(engine: Any, root: str | os.PathLike, step: int, meta: dict[str, Any], keep_last: int,
                rank: int, barrier: Callable[[], None]) -> Optional[Path]:
    """Collective: every rank calls it. -> the checkpoint dir on rank 0, None elsewhere."""
    if rank == 0:
        prepare_save(root, step)
    barrier()
    engine.save_checkpoint(str(temp_dir(root, step)), tag=TAG, save_latest=False)
    barrier()
    final = finish_save(root, step, meta, keep_last) if rank == 0 else None
    barrier()
    return final


def weights_only_load(path: str, map_location: Any = None) -> Any:
    """`torch.load(weights_only=True)` of a DeepSpeed checkpoint file: tensors, plain containers and
    the two DeepSpeed classes its optimizer states hold (a stage enum and the loss-scaler record)."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
        return torch.load(path, map_location=map_location, weights_only=True)


def load_engine(engine: Any, d: str | os.PathLike) -> dict[str, Any]:
    """Collective: restore model, optimizer and LR-scheduler states; -> our meta."""
    d = Path(d)
    if not is_complete(d):
        raise FileNotFoundError(f"checkpoint {d} is incomplete or truncated — pass a complete one "
                                f"(latest_checkpoint(root) picks the newest complete)")
    loader = getattr(engine, "checkpoint_engine", None)
    if loader is not None:
        loader.load = weights_only_load  # instance attribute: shadows DeepSpeed's weights_only=False load
    try:
        path, _ = engine.load_checkpoint(str(d), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    finally:
        if loader is not None:
            del loader.load
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {d}/{TAG}")
    return read_meta(d)


def export_hf(lm: Any, state: dict[str, Any], out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Rank 0: save_pretrained(+ tokenizer) of the gathered `state`, published by one rename."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm.save_pretrained(tmp, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out

"""The run directory: what a run leaves behind, written so nothing is half-written or lost.

    <output_dir>/config.yaml      the resolved config (the run's identity)
                 metrics.jsonl    one line per step
                 tensorboard/     TensorBoard events
                 checkpoints/     DeepSpeed checkpoints (atomic, keep-last-N, `latest` pointer)
                 policy/          final HF-format policy (save_pretrained + tokenizer)
                 summary.json     steps, samples, reward first/last, accuracy, rewinds, tokens/s, phase times
                 traces/          a few trajectories per step (Arrow IPC) for the report
                 report.html      self-contained run report (plots, coloured sample trajectories)
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import yaml

from e3rl.config import Config, ConfigError, config_from_dict, save_config


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=float))
    os.replace(tmp, path)


def write_result(path: str, result: Any, prog: str) -> None:
    """A CLI's JSON result at `path` (parent dirs created, written atomically), announced on stdout."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print(f"{prog}: wrote {out}")


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        name = f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, name + ".")
        elif va != vb:
            out.append(name)
    return out


# Fields that may change between a run and its resumption without making it another run.
_RESUMABLE_CHANGES = ("run.steps", "run.progress", "resources.", "run.eval_every", "run.save_every", "run.trace_",
                      "run.report", "run.max_skipped_steps", "run.fault.")


def _as_saved(cfg: Config, old: Config) -> Config:
    """`cfg` with what the driver resolves only later (`reward.thinking: auto`, from the tokenizer) taken
    from the saved run, so the early check compares what is known; `prepare` checks the resolved config."""
    if cfg.reward.thinking != "auto":
        return cfg
    return dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, thinking=old.reward.thinking))


def check(cfg: Config) -> Path:
    """Refuse a dir holding a *different* run (or other files), writing nothing. -> the run dir."""
    out = Path(cfg.run.output_dir)
    saved = out / "config.yaml"
    if saved.is_file():
        try:
            old = config_from_dict(yaml.safe_load(saved.read_text()))
        except (ConfigError, yaml.YAMLError):
            old = None
        diffs = ["(unreadable config.yaml)"] if old is None else _differences(old.to_dict(), _as_saved(cfg, old).to_dict())
        diffs = [d for d in diffs if not d.startswith(_RESUMABLE_CHANGES)]
        if diffs or cfg.run.resume == "never":
            why = f"it differs in {', '.join(diffs[:4])}" if diffs else "run.resume=never"
            raise ConfigError(
                f"run.output_dir: {out} holds another run ({why}) — choose a new run.output_dir "
                "or resume it with the same config and run.resume=auto"
            )
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"run.output_dir: {out} is not empty and holds no e3rl run — choose a new run.output_dir")
    return out


def prepare(cfg: Config) -> Path:
    """Create or reopen the run dir (after `check`). Call it once every input is validated, so a
    bad model, dataset or cluster leaves no half-made run dir behind."""
    out = check(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    return out

"""From the config to problems and prompt token ids: the one place data sources are resolved.

`data.train` / `data.eval` entries are `gym:<task>` (reasoning-gym, generated offline), a local
parquet/jsonl file, or a hub dataset name (DeepMath-103K, AIME, MATH500 schemas). Held-out gym
sets use a disjoint seed so no training problem is evaluated on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e3rl.config import Config, ConfigError
from e3rl.tasks.base import DEFAULT_INSTRUCTION, LoadStats, Problem, build_prompt
from e3rl.tasks.gym import GYM_INSTRUCTION, load_gym
from e3rl.tasks.math_data import load_math

EVAL_SEED_OFFSET = 1_000_003


@dataclass
class Workload:
    train: list[Problem]
    evals: dict[str, list[Problem]]
    stats: dict[str, LoadStats]


def looks_local(spec: str) -> bool:
    """A path on this machine (vs a hub dataset name or a gym task)."""
    return spec.startswith((".", "/", "~")) or Path(spec).suffix in (".jsonl", ".json", ".parquet")


def load_source(spec: str, size: int, seed: int, cfg: Config, tokenizer: Any, field: str) -> tuple[list[Problem], LoadStats]:
    """Problems of one `data.train` / `data.eval` entry; a ConfigError when none is usable."""
    problems, stats = _load_source(spec, size, seed, cfg, tokenizer, field)
    if not problems:
        raise ConfigError(f"{field}: {spec!r} {_why_no_rows(stats)}")
    return problems, stats


def _why_no_rows(s: LoadStats) -> str:
    """What emptied a source, and the fix (`<problem> — <fix>`)."""
    if s.total == 0:
        return "holds no rows — give a file with at least one problem"
    if s.skipped_no_answer == s.total:
        return f"has no row with both a question and an answer ({s.total} rows) — fill in the answer column"
    return (f"keeps no row: {s.skipped_filtered} of {s.total} filtered out by difficulty or prompt length"
            f"{f', {s.skipped_no_answer} without an answer' if s.skipped_no_answer else ''} — widen "
            "data.difficulty_min/difficulty_max or raise data.max_prompt_tokens")


def _load_source(spec: str, size: int, seed: int, cfg: Config, tokenizer: Any, field: str) -> tuple[list[Problem], LoadStats]:
    d = cfg.data
    if spec.startswith("gym:"):
        if size <= 0:
            raise ConfigError(f"{field}: gym tasks are generated and need a size — set data.train_size / data.eval_size")
        try:
            return load_gym(spec[4:], size, seed, **d.gym_kwargs)
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"{field}: reasoning-gym could not build {spec!r} ({e}) — check the task name and data.gym_kwargs") from None
    if looks_local(spec) and not Path(spec).expanduser().exists():
        raise ConfigError(f"{field}: dataset file {spec!r} does not exist — give a parquet/jsonl path, a hub name, or gym:<task>")
    difficulty = None if (d.difficulty_min, d.difficulty_max) == (0.0, 10.0) else (d.difficulty_min, d.difficulty_max)
    fmt, fmt_field = (d.format, "data.format") if field == "data.train" else (d.eval_format, "data.eval_format")
    try:
        return load_math(spec, format=None if fmt == "auto" else fmt, difficulty=difficulty,
                         max_prompt_len=d.max_prompt_tokens, tokenizer=tokenizer, n=size or None, seed=seed)
    except FileNotFoundError as e:
        raise ConfigError(f"{field}: {e} — give an existing parquet/jsonl path") from None
    except ValueError as e:
        raise ConfigError(f"{field}: {e} — set {fmt_field} (auto detects it) or give a file with those columns") from None


def load_workload(cfg: Config, tokenizer: Any) -> Workload:
    d = cfg.data
    train, stats = load_source(d.train, d.train_size, d.seed, cfg, tokenizer, "data.train")
    all_stats = {"train": stats}
    evals = {}
    for spec in d.eval:
        probs, st = load_source(spec, d.eval_size, d.seed + EVAL_SEED_OFFSET, cfg, tokenizer, "data.eval")
        evals[spec] = probs
        all_stats[f"eval:{spec}"] = st
    return Workload(train, evals, all_stats)


def instruction_for(cfg: Config, problem: Problem) -> str:
    if cfg.data.instruction != "auto":
        return cfg.data.instruction
    return GYM_INSTRUCTION if "rg_task" in problem.meta else DEFAULT_INSTRUCTION


def render_prompt(cfg: Config, problem: Problem, tokenizer: Any) -> str:
    """One problem's prompt text as this run renders it (instruction, system prompt, template kwargs)."""
    d = cfg.data
    return build_prompt(problem, tokenizer, instruction_for(cfg, problem), d.system_prompt or None,
                        dict(d.chat_template_kwargs))


def encode_prompts(cfg: Config, problems: list[Problem], tokenizer: Any) -> list[list[int]]:
    """Chat-templated prompt token ids (the template already holds any BOS token)."""
    out = []
    for p in problems:
        text = render_prompt(cfg, p, tokenizer)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def prompt_leaves_thinking_open(cfg: Config, tokenizer: Any) -> bool:
    """Whether this run's prompts leave the model to think and close it with `</think>` (True), or
    do not (False: no thinking in the chat template, or the generation prompt already closes an
    empty thinking block, as Qwen3's does with thinking off). What `reward.thinking: auto` means."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or "</think>" not in template:
        return False
    probe = Problem(uid="probe", prompt="What is 1 + 1?", answer="2", source="probe")
    text = render_prompt(cfg, probe, tokenizer)
    return not text.rstrip().endswith("</think>")


def resolve_reward_thinking(cfg: Config, tokenizer: Any) -> Config:
    """The config with `reward.thinking: auto` made concrete from the chat template (`required` when
    the prompts leave the model to think, else `none`). The driver resolves it once, so the run dir records what
    was scored; a generator actor handed an unresolved config resolves it the same way."""
    if cfg.reward.thinking != "auto":
        return cfg
    import dataclasses

    on = prompt_leaves_thinking_open(cfg, tokenizer)
    return dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, thinking="required" if on else "none"))

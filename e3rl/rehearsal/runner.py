"""`python -m e3rl.run CONFIG --rehearse [--plan]`: the plan, its static checks, and the run.

`--plan` prints what the rehearsal scales and checks, in seconds, everything that needs no training:
the rehearsed config, the data sources through their real loaders and schemas, that transformers
builds the architecture (on the meta device: no weights), the engine's settings, and that the
machine can place the actors. The full rehearsal then writes the stand-ins, runs one step, resumes
from its checkpoint for a second, evaluates before and after, exports and reports (all by
`run_session`, the production path), and checks what that exercised (`checks`).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from e3rl.config import Config, ConfigError
from e3rl.rehearsal.checks import Check, run_dir_checks, step_checks
from e3rl.rehearsal.plan import Change, Machine, StandIns, rehearsal_config

log = logging.getLogger("e3rl")


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _short(v: Any, n: int = 48) -> str:
    text = ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return text if len(text) <= n else "..." + text[-(n - 3):]


def change_table(changes: Sequence[Change]) -> str:
    return format_table([(c.field, _short(c.written), _short(c.rehearsed), c.why) for c in changes],
                        ("field", "as written", "rehearsed", "why"))


def check_table(checks: Sequence[Check]) -> str:
    return format_table([("ok" if c.ok else "FAILED", c.name, c.seen) for c in checks], ("", "check", "seen"))


def static_checks(cfg: Config, stand: StandIns, machine: Machine) -> Config:
    """Everything the rehearsed config needs short of training; returns it with the backend and
    the reward's thinking mode resolved, as the run would."""
    from e3rl.data import load_workload, resolve_reward_thinking
    from e3rl.models import check_model, load_tokenizer, resolve_backend
    from e3rl.ray_setup import resource_shortfall
    from e3rl.rehearsal.standins import build_tokenizer, write_data

    cfg = resolve_backend(cfg).check_training()
    for path, (schema, rows) in stand.data.items():
        write_data(Path(path), schema, rows)  # milliseconds; the loaders below read them as the run will
    if stand.model_dir is not None and not (stand.model_dir / "config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(stand.tokenizer) if stand.tokenizer else build_tokenizer()
        _build_on_meta(stand, len(tok))
    else:
        check_model(cfg.model)
        tok = load_tokenizer(cfg.model)
    cfg = resolve_reward_thinking(cfg, tok)
    work = load_workload(cfg, tok)
    log.info("rehearsal data: %d training problems, eval %s", len(work.train), {k: len(v) for k, v in work.evals.items()})
    if cfg.gen.backend == "vllm":
        from actors.vllm_engine import check_vllm_installed

        check_vllm_installed(cfg.gen)
    shortfall = resource_shortfall(cfg, machine.cpus, machine.gpus, "this machine")
    if shortfall:
        raise ConfigError(f"rehearsal: {shortfall}")
    return cfg


def _build_on_meta(stand: StandIns, vocab: int) -> None:
    """transformers builds the tiny architecture (no weights, no time): a model type or key it does
    not know fails here, not in an actor."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(stand.arch)
    model_type = kw.pop("model_type")
    kw.pop("architectures", None)
    kw.setdefault("vocab_size", vocab)
    try:
        config = AutoConfig.for_model(model_type, **kw)
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.path: transformers cannot build a {model_type!r} model ({str(e).splitlines()[0][:160]}) "
                          "— check the model dir's config.json") from None


def _expected_architecture(stand: StandIns) -> str:
    """The causal-LM class the export must name ("" when the model was not replaced)."""
    archs = stand.arch.get("architectures") or []
    if archs or not stand.arch:
        return archs[0] if archs else ""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(stand.arch["model_type"], "")
    return name if isinstance(name, str) else name[0]


def rehearse(cfg: Config, plan_only: bool, stop: Any, out: Any = None) -> int:
    """Rehearse `cfg` (as loaded, overrides applied). 0 when every check passed, else 1."""
    out = out or sys.stdout
    t0 = time.time()
    machine = Machine.detect()
    from e3rl.models import cache_root

    rehearsed, changes, stand = rehearsal_config(cfg, machine, cache_root())
    print(f"e3rl rehearsal on {machine.cpus} cores, {machine.gpus} GPUs (native bf16: {machine.bf16}): "
          f"the config as written, except\n{change_table(changes)}\n", file=out, flush=True)
    rehearsed = static_checks(rehearsed, stand, machine)
    if plan_only:
        print(f"e3rl rehearsal plan: ok — config, data, model construction, engine settings and placement "
              f"checked in {time.time() - t0:.1f} s", file=out)
        return 0
    from e3rl.rehearsal.standins import write_stand_ins
    from e3rl.session import run_session

    write_stand_ins(stand)
    run_dir = Path(rehearsed.run.output_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # a rehearsal starts afresh; its dir is its own (`-rehearsal`)
    first = dataclasses.replace(rehearsed, run=dataclasses.replace(rehearsed.run, steps=1))
    run_session(first, stop)
    _disconnect_ray()
    run_session(rehearsed, stop)  # resumes from the first half's checkpoint
    from e3rl.metrics import read_metrics

    steps, _ = read_metrics(run_dir)
    checks = step_checks(steps, rehearsed.heal_active) + run_dir_checks(run_dir, rehearsed.run.steps,
                                                                        _expected_architecture(stand))
    ok = all(c.ok for c in checks)
    print(f"\ne3rl rehearsal {'passed' if ok else 'FAILED'} in {time.time() - t0:.0f} s ({run_dir}):\n"
          f"{check_table(checks)}", file=out, flush=True)
    return 0 if ok else 1


def _disconnect_ray() -> None:
    """Each half connects to Ray as a run does (an embedded one is started afresh, a cluster joined again)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()

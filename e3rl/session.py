"""One training run, wired: run dir, data, Ray, roles, resume, loop, evaluation, outputs.

Everything here is setup and bookkeeping; the loop itself is `e3rl.loop.train`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from e3rl import rundir
from e3rl.batching import DynamicSampling
from e3rl.config import Config
from e3rl.core.dynamic_sampling import round_group_ids
from e3rl.core.passk import flatten
from e3rl.core.threshold import UncertaintyHistory
from e3rl.data import encode_prompts, load_workload, resolve_reward_thinking
from e3rl.evaluation import EvalSet, evaluate, headline
from e3rl.loop import Hooks, LoopState, Roles, budget_spent, train
from e3rl.metrics import MetricsLogger, read_metrics
from e3rl.models import check_model, load_tokenizer, materialize_builtin, prepare_backend, resolve_backend
from e3rl.prompts import PromptStream
from e3rl.rewards import check_reward_fn
from e3rl.traces import write_trace
from e3rl.weight_sync import CollectiveSync

log = logging.getLogger("e3rl")


def build_roles(cfg: Config) -> Roles:
    from actors.generator_group import GeneratorGroup
    from actors.replay_buffer import make_replay_buffer
    from learner.group import LearnerGroup

    generators = GeneratorGroup(cfg)
    buffer = make_replay_buffer(cfg.run.buffer_capacity, cfg.run.max_staleness)
    learner = LearnerGroup(cfg)
    r = cfg.resources
    sync = CollectiveSync(learner, generators, r.sync_bucket_mb, r.sync_timeout_s) if r.weight_sync == "collective" else None
    return Roles(generators, buffer, learner, sync)


def _resume(cfg: Config, roles: Roles, out: Path, stream: PromptStream) -> LoopState:
    state = LoopState()
    if cfg.run.resume != "auto":
        return state
    meta = roles.learner.load_checkpoint(str(out / "checkpoints"))
    if meta is None:
        return state
    state = LoopState(step=int(meta["step"]), version=int(meta["version"]), samples=int(meta.get("samples", 0)),
                      tokens=int(meta.get("tokens", 0)), cursor=meta.get("cursor", {}), history=meta.get("history", {}))
    stream.load_state(state.cursor)
    if state.history:
        roles.generators.history = UncertaintyHistory(**state.history)
    log.info("resumed from step %d (policy version %d)", state.step, state.version)
    return state


def run_session(cfg: Config, stop: Any) -> dict[str, Any]:
    t_start = time.time()
    cfg = resolve_backend(cfg).check_training()
    rundir.check(cfg)  # every input is validated before the run dir is written (rundir.prepare below)
    if cfg.model.path.startswith("builtin:"):
        materialize_builtin(cfg.model.path)  # once, before actors race to convert it
    check_model(cfg.model)
    prepare_backend(cfg)
    check_reward_fn(cfg.reward.fn)
    tokenizer = load_tokenizer(cfg.model)
    cfg = resolve_reward_thinking(cfg, tokenizer)
    work = load_workload(cfg, tokenizer)
    log.info("data: %s", {k: asdict(v) for k, v in work.stats.items()})
    eval_sets = [EvalSet(name, probs, encode_prompts(cfg, probs, tokenizer)) for name, probs in work.evals.items()]

    from e3rl.ray_setup import check_resources, connect

    info = connect(cfg)
    log.info("ray: %s (dashboard %s)", info.address, info.dashboard_url or "off")
    check_resources(cfg)
    out = rundir.prepare(cfg)
    roles = build_roles(cfg)
    threads = {"generators": roles.generators.torch_threads(), "learner_ranks": [i["threads"] for i in roles.learner.info]}
    log.info("torch threads per actor: %s", threads)
    stream = PromptStream(work.train, cfg.algo.prompts_per_step, seed=cfg.data.seed)
    state = _resume(cfg, roles, out, stream)
    logger = MetricsLogger(out, cfg.run.steps, progress=cfg.run.progress, resumed_step=state.step)
    k = cfg.run.eval_group_size

    def run_eval(step: int) -> dict[str, float]:
        """The plain policy's accuracy (`eval/…`, comparable across methods) and, where healing
        applies at test time, the healed accuracy under its own names (`eval_healed/…`)."""
        plain = evaluate(roles.generators, eval_sets, k, heal=False, seed=cfg.run.seed + 7, sampling=cfg.eval_sampling)
        out = flatten(plain) | {"eval/accuracy": headline(plain, k)}
        if cfg.eval_heal_active:
            healed = evaluate(roles.generators, eval_sets, k, heal=True, seed=cfg.run.seed + 7,
                              sampling=cfg.eval_sampling)
            out |= flatten(healed, prefix="eval_healed") | {"eval/accuracy_healed": headline(healed, k)}
        return out

    sampling = DynamicSampling.from_config(cfg)

    def next_batch(step: int, round_: int) -> tuple[list, list, list]:
        problems = stream.next_batch()
        state.cursor = stream.state()  # after a step's last round: what its checkpoint saves
        groups = round_group_ids(step, round_, sampling.rounds, len(problems))
        return problems, encode_prompts(cfg, problems, tokenizer), groups

    def checkpoint() -> None:
        extra = {"samples": state.samples, "tokens": state.tokens, "cursor": state.cursor, "history": state.history}
        roles.learner.save_checkpoint(str(out / "checkpoints"), state.step, cfg.run.keep_last, extra)

    def trace(step: int, refs: list) -> None:
        if cfg.run.trace_every and cfg.run.trace_samples and step % cfg.run.trace_every == 0 and refs:
            import ray

            write_trace(out, step, ray.get(refs[0])[: cfg.run.trace_samples])

    before = run_eval(state.step) if eval_sets else {}
    logger.log(state.step, before)
    hooks = Hooks(next_batch, run_eval, checkpoint, logger.log, lambda: stop.stop, trace)
    first_step = state.step
    train(roles, state, cfg.run.steps, cfg.run.seed, cfg.run.eval_every, cfg.run.save_every, hooks, sampling,
          cfg.run.token_budget)
    checkpoint()
    if not stop.stop:  # interrupted: the checkpoint is written; export and evaluate when the run completes
        roles.learner.export_hf(str(out / "policy"))
    after = run_eval(state.step) if eval_sets and not stop.stop else {}
    logger.log(state.step, after)
    logger.close()
    summary = write_summary(out, cfg, before, after, first_step, state, time.time() - t_start, threads,
                            roles.learner.info[0]["dtype"])
    if cfg.run.report:
        from e3rl.report import write_report

        log.info("report: %s", write_report(out))
    roles.generators.shutdown()
    roles.learner.shutdown()
    return summary


def write_summary(out: Path, cfg: Config, before: dict, after: dict, first_step: int, state: LoopState,
                  wall_s: float, threads: Optional[dict[str, list[int]]] = None, learner_dtype: str = "") -> dict[str, Any]:
    steps, _ = read_metrics(out)
    phases: dict[str, float] = {}
    for r in steps:
        for key, v in r.items():
            if key.startswith("time/") and key != "time/step_s":
                phases[key[5:-2]] = phases.get(key[5:-2], 0.0) + v
    gen_s = sum(r.get("gen/seconds", 0.0) for r in steps)
    samples = sum(r.get("gen/samples", 0.0) for r in steps)
    train_s = sum(r.get("time/step_s", 0.0) for r in steps)
    summary = {
        "steps": state.step,
        "steps_this_session": state.step - first_step,
        "complete": state.step >= cfg.run.steps or budget_spent(state, cfg.run.token_budget),
        "samples": state.samples,
        "tokens_generated": state.tokens,
        "reward_first": steps[0]["gen/reward_mean"] if steps else float("nan"),
        "reward_last": steps[-1]["gen/reward_mean"] if steps else float("nan"),
        "reward_last5_mean": sum(r["gen/reward_mean"] for r in steps[-5:]) / max(len(steps[-5:]), 1),
        "accuracy_before": before.get("eval/accuracy", float("nan")),
        "accuracy_after": after.get("eval/accuracy", float("nan")),
        **({"accuracy_healed_before": before.get("eval/accuracy_healed", float("nan")),
            "accuracy_healed_after": after.get("eval/accuracy_healed", float("nan"))} if cfg.eval_heal_active else {}),
        "eval_before": {k: v for k, v in before.items() if k.startswith(("eval/", "eval_healed/"))},
        "eval_after": {k: v for k, v in after.items() if k.startswith(("eval/", "eval_healed/"))},
        "eval_samples_per_problem": cfg.run.eval_group_size,
        "rewinds_per_sample": sum(r.get("e3rl/rewinds_per_sample", 0.0) for r in steps) / max(len(steps), 1),
        "gen_tokens_per_s": sum(r.get("gen/tokens_produced", 0.0) for r in steps) / max(gen_s, 1e-9),
        "samples_per_s": samples / max(train_s, 1e-9),
        "tokens_per_sample": sum(r.get("gen/tokens_produced", 0.0) for r in steps) / max(samples, 1.0),
        "kept_tokens_per_sample": sum(r.get("gen/tokens_kept", 0.0) for r in steps) / max(samples, 1.0),
        "peak_kv_bytes": max((r.get("gen/peak_kv_bytes", 0.0) for r in steps), default=0.0),
        "phase_seconds": phases,
        "wall_s": wall_s,
        "torch_threads": threads or {},
        "learner_dtype": learner_dtype,  # what `learner.dtype: auto` resolved to on this machine
        "e3rl": cfg.heal_active,
        "gen_backend": cfg.gen.backend,
        "allocation": cfg.allocation,
        "final_policy": str(out / "policy"),
    }
    rundir.write_json_atomic(out / "summary.json", summary)
    return summary

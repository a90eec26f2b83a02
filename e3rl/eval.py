"""Held-out evaluation of a policy: Avg@k and unbiased Pass@k per benchmark, with test-time
self-healing on, off, or both (then also the delta on - off).

    python -m e3rl.eval --data FILE_OR_gym:TASK [--data ...] [--model DIR | --config CFG.yaml]
                        [--k 32] [--heal on|off|both] [--out FILE.json] [--size N] [section.key=value ...]

It runs on the training generator actors (`GeneratorGroup` on Ray: a running Ray is reused, else
an embedded one is started, as `e3rl.run` does), so `resources.num_generators` scales it the same
way. `--model DIR` evaluates a local HF dir such as a run's `policy/` export with its own
tokenizer; the run's `config.yaml` next to it supplies the generation settings unless `--config`
is given. Both modes sample with the same seed, so the delta compares like with like. The table
goes to stdout, the JSON to `--out`. Bad input stops it with one line and exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from e3rl.config import Config, ConfigError, load_config
from e3rl.data import EVAL_SEED_OFFSET, encode_prompts, load_source, resolve_reward_thinking
from e3rl.evaluation import EvalSet, default_ks, evaluate
from e3rl.rundir import write_result

log = logging.getLogger("e3rl")
MODES = {"on": ("on",), "off": ("off",), "both": ("on", "off")}
EXTRA = {"rewinds_per_sample": "rewinds", "kept_len_mean": "kept_len"}  # shown after the accuracies


def _fail(flag: str, problem: str, fix: str) -> None:
    raise ConfigError(f"{flag}: {problem} — {fix}")


class CliParser(argparse.ArgumentParser):
    """Bad arguments raise `ConfigError` (one line, exit 2 through `cli_main`), where argparse would
    print its usage and the message over two lines."""

    def __init__(self, prog: str, description: Optional[str]):
        super().__init__(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} — see `{self.prog} --help`")


def cli_main(prog: str, run: Callable[[], tuple[dict[str, Any], Optional[str]]],
             table: Callable[[dict[str, Any]], str]) -> int:
    """The frame the evaluation CLIs share: log to stderr, `run()` -> (result, --out path), bad
    input -> one line and exit 2, the table to stdout, the JSON to the path."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        res, out = run()
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(table(res))
    if out:
        write_result(out, res, prog)
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = CliParser("python -m e3rl.eval", __doc__)
    p.add_argument("--data", action="append", default=[], metavar="FILE_OR_gym:TASK",
                   help="benchmark: a jsonl/parquet file, a hub name, or gym:<task> (repeatable)")
    p.add_argument("--model", help="local HF model dir (sets model.path)")
    p.add_argument("--config", help="run config YAML (default: DIR/../config.yaml of --model, else built-in)")
    p.add_argument("--k", type=int, default=32, help="samples per problem (default 32)")
    p.add_argument("--heal", choices=tuple(MODES), default="both", help="test-time self-healing (default both)")
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--size", type=int, help="problems per benchmark, seeded subset (0 = all; default data.eval_size)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, applied last")
    return p.parse_intermixed_args(argv)


def build_config(a: argparse.Namespace) -> Config:
    if not a.data:
        _fail("--data", "no benchmark given", "pass --data FILE.jsonl or --data gym:TASK (repeatable)")
    if len(set(a.data)) != len(a.data):
        _fail("--data", "a benchmark is given twice", "pass each benchmark once")
    if a.k < 1:
        _fail("--k", f"must be >= 1, got {a.k}", "e.g. --k 32")
    if a.size is not None and a.size < 0:
        _fail("--size", f"must be >= 0, got {a.size}", "0 = all problems of a file")
    config, pinned = a.config, []
    if a.model:
        model = Path(a.model).expanduser()
        if not model.is_dir():
            _fail("--model", f"{a.model!r} is not a directory", "pass a local HF model dir such as runs/NAME/policy")
        if config is None and (model.parent / "config.yaml").is_file():
            config = str(model.parent / "config.yaml")
            log.info("using the run's config %s", config)
        pinned = [f"model.path={json.dumps(str(model))}", "model.tokenizer=", "model.gguf_file="]
    if config is not None and not Path(config).is_file():
        _fail("--config", f"file {config!r} does not exist", "pass a YAML such as configs/tiny.yaml")
    if config is None and a.model:  # a user's model outside a run: score committed (boxed) answers only
        pinned.append("reward.require_box=true")
    # evaluation trains nothing, so behaviour log-probs are never used: with the learner's recompute
    # declared, eval decoding (e.g. T = 0.6, top-p 0.95) is valid on either backend
    return load_config(config, ["algo.behaviour_logp=recompute"] + pinned + list(a.overrides))


def load_sets(cfg: Config, specs: Sequence[str], size: int, tokenizer: Any) -> list[EvalSet]:
    """Same loaders and held-out seed as a training run's `data.eval` sets."""
    sets = []
    for spec in specs:
        if spec.startswith("gym:") and size == 0:
            _fail("--size", f"{spec} is generated and needs a size", "pass --size N, e.g. --size 64")
        try:
            problems, stats = load_source(spec, size, cfg.data.seed + EVAL_SEED_OFFSET, cfg, tokenizer, "--data")
        except ConfigError:
            raise
        except Exception as e:  # a hub name offline, an unreadable file
            _fail("--data", f"could not load {spec!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                  "give a local jsonl/parquet file, or run where the hub is reachable")
        if not problems:
            _fail("--data", f"{spec!r} has no usable problems ({stats})", "check its answer column and data.max_prompt_tokens")
        sets.append(EvalSet(spec, problems, encode_prompts(cfg, problems, tokenizer)))
    return sets


def prepare_model(cfg: Config) -> tuple[Config, Any]:
    """The model checked (one line if its path is missing), its backend resolved and prepared
    once (before actors race to convert it) -> (the resolved config, its tokenizer)."""
    from e3rl.models import load_tokenizer, materialize_builtin, prepare_backend, resolve_backend

    p = cfg.model.path
    if p != "random" and not p.startswith("builtin:") and not Path(p).expanduser().exists():
        _fail("model.path", f"{p!r} does not exist", "pass --model DIR (a local HF dir; hub names are not downloaded)")
    cfg = resolve_backend(cfg)
    if cfg.model.path.startswith("builtin:"):
        materialize_builtin(cfg.model.path)
    prepare_backend(cfg)
    tokenizer = load_tokenizer(cfg.model)
    return resolve_reward_thinking(cfg, tokenizer), tokenizer


@contextlib.contextmanager
def generator_group(cfg: Config) -> Iterator[Any]:
    """The training generator actors for `cfg` on Ray: a running Ray is reused, else an embedded one
    is started (as `e3rl.run` does) and shut down after."""
    import ray

    from actors.generator_group import GeneratorGroup
    from e3rl.ray_setup import connect

    own_ray = not ray.is_initialized()
    if own_ray:
        connect(cfg)
    group = None
    try:
        group = GeneratorGroup(cfg)
        yield group
    finally:
        if group is not None:
            group.shutdown()
        if own_ray:
            ray.shutdown()


def run_eval(cfg: Config, specs: Sequence[str], k: int, heal: str, size: Optional[int]) -> dict[str, Any]:
    cfg, tokenizer = prepare_model(cfg)
    sets = load_sets(cfg, specs, cfg.data.eval_size if size is None else size, tokenizer)
    results, seconds = {}, {}
    with generator_group(cfg) as group:
        for mode in MODES[heal]:
            t0 = time.perf_counter()
            results[mode] = evaluate(group, sets, k, heal=mode == "on", seed=cfg.run.seed, sampling=cfg.eval_sampling)
            seconds[mode] = time.perf_counter() - t0
    out = {"model": cfg.model.path, "k": k, "ks": default_ks(k), "heal": heal, "seed": cfg.run.seed,
           "problems": {s.name: len(s.problems) for s in sets}, "results": results, "seconds": seconds}
    if heal == "both":
        keys = [f"avg@{k}"] + [f"pass@{j}" for j in default_ks(k)] + list(EXTRA)
        out["delta"] = {b: {key: results["on"][b][key] - results["off"][b][key] for key in keys} for b in results["on"]}
    return out


def table(res: dict[str, Any]) -> str:
    """One row per benchmark and mode (plus `delta` for --heal both), aligned columns."""
    cols = [f"avg@{res['k']}"] + [f"pass@{j}" for j in res["ks"]] + list(EXTRA)
    rows = [["benchmark", "heal", "n", *[EXTRA.get(c, c) for c in cols]]]
    for bench, n in res["problems"].items():
        blocks = [(m, res["results"][m][bench], "") for m in res["results"]]
        blocks += [("delta", res["delta"][bench], "+")] if "delta" in res else []
        for i, (mode, m, sign) in enumerate(blocks):
            rows.append([bench if i == 0 else "", mode, "" if sign else str(n), *(f"{m[c]:{sign}.3f}" for c in cols)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    def run() -> tuple[dict[str, Any], Optional[str]]:
        a = parse_args(sys.argv[1:] if argv is None else argv)
        return run_eval(build_config(a), a.data, a.k, a.heal, a.size), a.out

    return cli_main("e3rl.eval", run, table)

if __name__ == "__main__":
    sys.exit(main())

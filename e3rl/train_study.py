"""Does healing during training help? Paired intervals for an `e3rl.experiment` (E3RL, GRPO,
Erase@k, the same seeds), from each finished run's final policy evaluated on one fixed held-out
set with plain sampling.

    python -m e3rl.study train --experiment runs/experiment [--data gym:chain_sum] [--size 200]
                               [--k 4] [--pairs erase5:grpo,...] [--out FILE.json]

- Every final policy (`<experiment>/<variant>/seed<s>/policy`) samples k answers to the same
  `--size` held-out problems (the held-out draw of `data.seed=0`, whatever seed trained it), plain
  sampling, the run's own decoding settings, sampling seed 0. Each run's per-problem correctness
  is kept next to it (`heldout_eval.json`), so re-running evaluates only new runs: seeds can be
  added session by session.
- A pair `a:b` compares variant a with b on the seeds both finished: the per-(seed, problem)
  difference of Avg@k, with a crossed bootstrap over seeds x problems (seeds are what training
  draws; problems what evaluation draws), and the minimum detectable effect of that many seeds
  at the observed seed-to-seed spread.
- Per run, from its metrics: generated tokens (erased ones count), the policy entropy on the
  training batches (first and last step, and its least-squares slope per step), and
  `learner/logp_diff_mean` (the generator-learner log-prob mismatch).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

from e3rl.core.stats import Interval, bootstrap_mean_ci, crossed_bootstrap_mean_ci, min_detectable_effect

HEALED = "+heal"  # a variant's final policy sampled with test-time healing
EVAL_FILES = {"plain": "heldout_eval.json", "healed": "heldout_eval_healed.json"}


# ------------------------------------------------------------------ pure parts
def paired_table(a: dict[int, list[float]], b: dict[int, list[float]]) -> tuple[list[int], list[list[float]]]:
    """Per-seed, per-problem values of two variants -> (the seeds both have, [seed][problem] a - b)."""
    seeds = sorted(set(a) & set(b))
    for s in seeds:
        if len(a[s]) != len(b[s]):
            raise ValueError(f"paired_table: seed {s} has {len(a[s])} vs {len(b[s])} problems")
    return seeds, [[x - y for x, y in zip(a[s], b[s])] for s in seeds]


def compare_pair(a: dict[int, list[float]], b: dict[int, list[float]], seed: int = 0) -> dict[str, Any]:
    """a - b over the seeds both have: the mean, the crossed interval (>= 2 seeds), the per-seed
    mean differences, their SD and the MDE (80% power, two-sided 5%) at that SD and seed count."""
    seeds, table = paired_table(a, b)
    per_seed = [statistics.fmean(row) for row in table]
    out: dict[str, Any] = {"seeds": seeds, "per_seed": per_seed,
                           "mean_a": statistics.fmean(statistics.fmean(a[s]) for s in seeds) if seeds else None,
                           "mean_b": statistics.fmean(statistics.fmean(b[s]) for s in seeds) if seeds else None,
                           "difference": None, "seed_sd": None, "mde": None}
    if len(seeds) >= 2:
        sd = statistics.stdev(per_seed)
        out |= {"difference": crossed_bootstrap_mean_ci(table, seed=seed), "seed_sd": sd,
                "mde": min_detectable_effect(sd, len(seeds))}
    return out


def compare_scalar(a: dict[int, float], b: dict[int, float], seed: int = 0) -> dict[str, Any]:
    """a - b for one number per run (e.g. its entropy slope), paired by seed, bootstrapped over seeds."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    return {"seeds": seeds, "per_seed": diffs,
            "difference": bootstrap_mean_ci(diffs, seed=seed) if len(seeds) >= 2 else None}


def slope(ys: Sequence[float]) -> float:
    """Least-squares slope of ys against 0, 1, 2, ... (per step)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, statistics.fmean(ys)
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


def run_trends(steps: Sequence[dict[str, float]]) -> dict[str, float]:
    """From a run's per-step metrics: tokens generated, entropy first/last/slope, mean log-prob mismatch."""
    ent = [r["learner/entropy"] for r in steps if "learner/entropy" in r]
    diff = [r["learner/logp_diff_mean"] for r in steps if "learner/logp_diff_mean" in r]
    return {"tokens_generated": float(sum(r.get("gen/tokens_produced", 0.0) for r in steps)),
            "samples": float(sum(r.get("gen/samples", 0.0) for r in steps)),
            "entropy_first": ent[0] if ent else float("nan"), "entropy_last": ent[-1] if ent else float("nan"),
            "entropy_slope": slope(ent), "logp_diff_mean": statistics.fmean(diff) if diff else float("nan")}


def parse_pairs(text: str, variants: Sequence[str]) -> list[tuple[str, str]]:
    from e3rl.config import ConfigError

    pairs = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        a, _, b = item.partition(":")
        if not b or a not in variants or b not in variants:
            raise ConfigError(f"--pairs: {item!r} is not variant:variant of this experiment's {list(variants)} — "
                              "e.g. --pairs erase5:grpo")
        pairs.append((a, b))
    return pairs


def default_pairs(variants: Sequence[str], baseline: str = "grpo", test_time_heal: bool = False) -> list[tuple[str, str]]:
    """Every variant against GRPO, and E3RL (Erase@5) against GRPO given one more step (at least
    E3RL's generated tokens: the equal-token comparison, conservative for E3RL). With test-time
    healing evaluated too: healing at test time only (GRPO healed vs plain), in training given
    healing at test time (Erase@5 healed vs GRPO healed), and everywhere vs nowhere."""
    pairs = [(v, baseline) for v in variants if v != baseline and v != "grpo_plus1" and baseline in variants]
    if "erase5" in variants and "grpo_plus1" in variants:
        pairs.append(("erase5", "grpo_plus1"))
    if test_time_heal and baseline in variants:
        b = baseline + HEALED
        pairs += [(b, baseline)] + [(v + HEALED, x) for v in variants if v.startswith("erase") for x in (b, baseline)]
    return pairs


# ------------------------------------------------------------------ the runs
def finished_runs(experiment: Path) -> dict[str, dict[int, Path]]:
    """{variant: {seed: run dir}} for every run with a final policy."""
    out: dict[str, dict[int, Path]] = {}
    for policy in sorted(experiment.glob("*/seed*/policy")):
        run = policy.parent
        if (run / "summary.json").is_file() and run.name[4:].isdigit():
            out.setdefault(run.parent.name, {})[int(run.name[4:])] = run
    return out


def evaluate_run(run: Path, spec: str, size: int, k: int, modes: Sequence[str] = ("plain",)) -> dict[str, Any]:
    """The run's final policy on the fixed held-out set, sampled plainly and/or with test-time
    healing ("plain", "healed") -> {mode: result}. Each mode is cached in the run dir; the missing
    ones are sampled on one generator group."""
    import argparse

    from e3rl.eval import build_config, generator_group, load_sets, prepare_model
    from e3rl.evaluation import sample_rows
    from e3rl.rundir import write_json_atomic

    key = {"data": spec, "size": size, "k": k, "data_seed": 0, "sample_seed": 0}
    out: dict[str, Any] = {}
    for mode in modes:
        cache = run / EVAL_FILES[mode]
        if cache.is_file() and (got := json.loads(cache.read_text())).get("key") == key:
            out[mode] = got
    todo = [m for m in modes if m not in out]
    if not todo:
        return out
    cfg = build_config(argparse.Namespace(data=[spec], model=str(run / "policy"), config=None, k=k, size=size,
                                          overrides=["data.seed=0", "run.seed=0", "run.progress=false"]))
    cfg, tokenizer = prepare_model(cfg)
    es = load_sets(cfg, [spec], size, tokenizer)[0]
    with generator_group(cfg) as group:
        for mode in todo:
            rows = sample_rows(group, es, k, heal=mode == "healed", seed=0)[0]
            out[mode] = {"key": key, "problems": [p.uid for p in es.problems],
                         "correct": [[bool(t.correct) for t in row] for row in rows],
                         "tokens_per_sample": statistics.fmean(len(t.stream_ids) for row in rows for t in row)}
            write_json_atomic(run / EVAL_FILES[mode], out[mode])
    return out


def run_train_study(experiment: Path, spec: str, size: int, k: int, pairs_text: str,
                    test_time_heal: bool = False) -> dict[str, Any]:
    from e3rl.config import ConfigError
    from e3rl.experiment import VARIANTS
    from e3rl.metrics import read_metrics

    if not experiment.is_dir():
        raise ConfigError(f"--experiment: {str(experiment)!r} is not a directory — pass an e3rl.experiment --out dir")
    runs = finished_runs(experiment)
    if not runs:
        raise ConfigError(f"--experiment: no finished run (<variant>/seed<k>/policy) under {experiment} — "
                          "run python -m e3rl.experiment first")
    modes = ("plain", "healed") if test_time_heal else ("plain",)
    names = [v + suffix for v in runs for suffix in ("", HEALED)[:len(modes)]]
    pairs = parse_pairs(pairs_text, names) if pairs_text else default_pairs(list(runs), test_time_heal=test_time_heal)
    needed = {x.removesuffix(HEALED) for pair in pairs for x in pair}  # evaluate only what is compared
    per_run: dict[str, dict[int, dict[str, Any]]] = {}
    for v, seeds in ((v, seeds) for v, seeds in runs.items() if v in needed):
        for s, run in sorted(seeds.items()):
            evs = evaluate_run(run, spec, size, k, modes)
            trends = run_trends(read_metrics(run)[0])
            for mode, ev in evs.items():
                per_run.setdefault(v + (HEALED if mode == "healed" else ""), {})[s] = {
                    "avg": [sum(r) / k for r in ev["correct"]], "pass": [float(any(r)) for r in ev["correct"]],
                    "eval_tokens_per_sample": ev["tokens_per_sample"], **trends}
    variants = {}
    for v, seeds in per_run.items():
        xs = list(seeds.values())
        base = v.removesuffix(HEALED)
        label = VARIANTS.get(base, (base,))[0] + (", healed at test time" if v != base else "")
        variants[v] = {"label": label, "seeds": sorted(seeds),
                       **{f"{m}": statistics.fmean(statistics.fmean(x[m]) if isinstance(x[m], list) else x[m]
                                                   for x in xs)
                          for m in ("avg", "pass", "tokens_generated", "entropy_first", "entropy_last",
                                    "entropy_slope", "logp_diff_mean")}}
    comparisons = {}
    for a, b in pairs:
        avg = compare_pair({s: r["avg"] for s, r in per_run[a].items()}, {s: r["avg"] for s, r in per_run[b].items()})
        ent = compare_scalar({s: r["entropy_slope"] for s, r in per_run[a].items()},
                             {s: r["entropy_slope"] for s, r in per_run[b].items()})
        tok = [per_run[a][s]["tokens_generated"] / per_run[b][s]["tokens_generated"] for s in avg["seeds"]]
        comparisons[f"{a}:{b}"] = {"avg@k": avg, "entropy_slope": ent,
                                   "token_ratio": statistics.fmean(tok) if tok else None}
    return {"experiment": str(experiment), "data": spec, "size": size, "k": k, "variants": variants,
            "comparisons": comparisons,
            "per_run": {v: {str(s): r for s, r in seeds.items()} for v, seeds in per_run.items()}}


def _fmt(i: Optional[dict[str, Any]]) -> str:
    return "n/a (< 2 seeds)" if i is None else f"{i['mean']:+.3f} [{i['low']:+.3f}, {i['high']:+.3f}]"


def table(res: dict[str, Any]) -> str:
    """The JSON form (`to_json`) as text: one row per variant, one line per comparison."""
    lines = [f"{res['data']}: {res['size']} held-out problems x k={res['k']}, plain sampling ({HEALED}: healed)",
             "variant              seeds  avg@k   pass@k  tokens  entropy first->last (slope/step)  logp_diff"]
    for v, r in res["variants"].items():
        lines.append(f"{v:<20} {len(r['seeds']):>5}  {r['avg']:.3f}   {r['pass']:.3f}  {r['tokens_generated']:>6.0f}  "
                     f"{r['entropy_first']:.3f} -> {r['entropy_last']:.3f} ({r['entropy_slope']:+.4f})"
                     f"          {r['logp_diff_mean']:.2e}")
    for pair, c in res["comparisons"].items():
        a = c["avg@k"]
        mde = f", MDE {a['mde']:.3f}" if a["mde"] is not None else ""
        lines.append(f"  {pair}: avg@k {_fmt(a['difference'])} over {len(a['seeds'])} seeds{mde}; "
                     f"entropy slope {_fmt(c['entropy_slope']['difference'])}; tokens x{c['token_ratio'] or float('nan'):.3f}")
        if pair.endswith(":grpo_plus1") and (c["token_ratio"] or 0.0) > 1.0:
            lines.append("    ! grpo_plus1 generated fewer tokens than its comparator: not an equal-token comparison")
    return "\n".join(lines)


def to_json(res: dict[str, Any]) -> dict[str, Any]:
    """Intervals as plain dicts."""
    def conv(x: Any) -> Any:
        if isinstance(x, Interval):
            return {"mean": x.mean, "low": x.low, "high": x.high, "level": x.level, "excludes_zero": x.excludes_zero()}
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, list):
            return [conv(v) for v in x]
        return x
    return conv(res)

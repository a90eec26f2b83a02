"""Does healing help at test time? A fixed policy, healing on vs off, with intervals; and, at each
erasure, the counterfactual the method assumes.

    python -m e3rl.study heal [--model DIR | --config CFG.yaml] [--data gym:chain_sum] [--size 200]
                              [--k 4] [--branches 4] [--max-events 200] [--out FILE.json]
                              [section.key=value ...]

1. Accuracy with healing on vs off, k samples per problem, same seed, paired by problem:
   - at equal samples: Avg@k and Pass@k;
   - at equal generated tokens: healing spends tokens on erased segments, so plain sampling gets
     k x tokens_on / tokens_off samples per problem (erased tokens count; fractional: Pass@ at a
     budget between two sample counts is interpolated, `pass_at_budget`). Avg@ does not change
     in expectation with more samples; Pass@ does.
   Differences (on - off) get 95% bootstrap intervals over problems.
2. Branches: for (up to --max-events, a seeded sample of) the erasures of the healed samples, the
   erased segment and the replacement kept at its position each continue --branches times from
   the same prefix, healing off, within the same token budget; both endings are scored. The
   difference P(right | replacement) - P(right | erased) is averaged per problem, then
   bootstrapped over problems (erasures of one problem are not independent).

It runs on the generator actors as `e3rl.eval` does (same flags for model, config and data).
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import defaultdict
from statistics import fmean
from typing import Any, Optional, Sequence

from e3rl.config import ConfigError
from e3rl.core.branches import ErasureBranch, erasure_branches
from e3rl.core.passk import pass_at_budget
from e3rl.core.stats import Interval, bootstrap_mean_ci


# ------------------------------------------------------------------ pure parts
def equal_token_budget(tokens_on: float, tokens_off: float, k: int) -> float:
    """Plain samples per problem (fractional) that spend what k healed samples spent (at least k)."""
    if tokens_off <= 0:
        return float(k)
    return max(float(k), k * tokens_on / tokens_off)


def compare_modes(on: Sequence[Sequence[bool]], off: Sequence[Sequence[bool]], k: int,
                  budget: Optional[float] = None, seed: int = 0) -> dict[str, Interval]:
    """Per-problem correctness, healed (k samples) and plain (>= k samples: the first k are the
    equal-samples comparison; Pass@ at `budget` samples, fractional, over all of them is the
    equal-tokens one) -> paired intervals of on - off."""
    if len(on) != len(off) or any(len(a) != k or len(b) < k for a, b in zip(on, off)):
        raise ValueError("compare_modes: every problem needs k healed and >= k plain samples")
    avg = [sum(a) / k - sum(b[:k]) / k for a, b in zip(on, off)]
    pass_k = [float(any(a)) - float(any(b[:k])) for a, b in zip(on, off)]
    pass_eq = [float(any(a)) - pass_at_budget(len(b), sum(b), budget or len(b)) for a, b in zip(on, off)]
    return {"avg@k": bootstrap_mean_ci(avg, seed=seed), "pass@k": bootstrap_mean_ci(pass_k, seed=seed),
            "pass@equal_tokens": bootstrap_mean_ci(pass_eq, seed=seed)}


def branch_effect(events: Sequence[tuple[int, float, float]], seed: int = 0) -> Optional[Interval]:
    """(problem, P(right | replacement), P(right | erased)) per erasure -> the mean difference,
    averaged within each problem first and bootstrapped over problems. None with < 2 problems."""
    by_problem: dict[int, list[float]] = defaultdict(list)
    for p, repl, erased in events:
        by_problem[p].append(repl - erased)
    if len(by_problem) < 2:
        return None
    return bootstrap_mean_ci([sum(d) / len(d) for d in by_problem.values()], seed=seed)


# ------------------------------------------------------------------ the run
def _continue_branches(group: Any, tokenizer: Any, scorer: Any, es: Any, picked: list[tuple[int, ErasureBranch]],
                       n: int, budget: int, seed: int) -> list[tuple[int, float, float]]:
    """Continue each picked erasure's two branches n times (healing off) and score the endings.
    A branch whose segment ends in EOS has ended: its continuations are not used (stop strings
    are not special-cased; the shipped configs have none)."""
    import ray

    from e3rl.evaluation import EVAL_GROUP_BASE
    from e3rl.models import eos_token_ids

    eos = set(eos_token_ids(tokenizer))

    prompts, problems, heads = [], [], []
    for p, b in picked:
        for seg in (b.replacement, b.erased):
            prompts.append(es.prompts[p] + b.prefix + seg)
            problems.append(es.problems[p])
            heads.append(b.prefix + seg)
    groups = [EVAL_GROUP_BASE + (1 << 20) + i for i in range(len(prompts))]
    rollout = group.generate(problems, prompts, groups, group_size=n, heal=False, seed=seed)
    trajs = [t for part in ray.get(rollout.refs) for t in part]
    texts, probs = [], []
    for i, head in enumerate(heads):
        for t in trajs[i * n:(i + 1) * n]:
            ended = bool(head) and head[-1] in eos
            ids = (head if ended else head + t.kept_ids.tolist())[:budget]  # the original sample's budget
            texts.append(tokenizer.decode(ids, skip_special_tokens=True))
            probs.append(problems[i])
    right = [s.correct for s in scorer.score(texts, probs)]
    rate = [sum(right[i * n:(i + 1) * n]) / n for i in range(len(heads))]
    return [(p, rate[2 * j], rate[2 * j + 1]) for j, (p, _) in enumerate(picked)]


def run_heal_study(cfg: Any, spec: str, k: int, size: Optional[int], n_branches: int, max_events: int) -> dict[str, Any]:
    from e3rl.eval import generator_group, load_sets, prepare_model
    from e3rl.evaluation import sample_rows
    from e3rl.rewards import Scorer

    cfg, tokenizer = prepare_model(cfg)
    es = load_sets(cfg, [spec], cfg.data.eval_size if size is None else size, tokenizer)[0]
    n = len(es.problems)
    seconds = {}
    with generator_group(cfg) as group, Scorer(cfg.reward) as scorer:
        t0 = time.perf_counter()
        on = sample_rows(group, es, k, heal=True, seed=cfg.run.seed)[0]
        seconds["healed"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        off = sample_rows(group, es, k, heal=False, seed=cfg.run.seed)[0]
        tok_on = sum(len(t.stream_ids) for row in on for t in row) / (n * k)
        tok_off = sum(len(t.stream_ids) for row in off for t in row) / (n * k)
        budget = equal_token_budget(tok_on, tok_off, k)
        k_eq = math.ceil(budget - 1e-9)
        if k_eq > k:  # more plain samples, another seed: the budget healing spent
            more = sample_rows(group, es, k_eq - k, heal=False, seed=cfg.run.seed + 1)[0]
            off = [a + b for a, b in zip(off, more)]
        seconds["plain"] = time.perf_counter() - t0

        events = [(p, b) for p, row in enumerate(on) for t in row for b in erasure_branches(t)]
        picked = random.Random(cfg.run.seed).sample(events, min(max_events, len(events)))
        t0 = time.perf_counter()
        outcomes = _continue_branches(group, tokenizer, scorer, es, picked, n_branches, cfg.gen.max_new_tokens,
                                      cfg.run.seed + 2) if picked else []
        seconds["branches"] = time.perf_counter() - t0
    correct_on = [[bool(t.correct) for t in row] for row in on]
    correct_off = [[bool(t.correct) for t in row] for row in off]
    diffs = compare_modes(correct_on, correct_off, k, budget, seed=cfg.run.seed)
    effect = branch_effect(outcomes, seed=cfg.run.seed)
    return {
        "model": cfg.model.path, "data": spec, "problems": n, "k": k, "seed": cfg.run.seed, "seconds": seconds,
        "accuracy": {"healed_avg@k": fmean(sum(r) / k for r in correct_on),
                     "plain_avg@k": fmean(sum(r[:k]) / k for r in correct_off),
                     "healed_pass@k": fmean(float(any(r)) for r in correct_on),
                     "plain_pass@k": fmean(float(any(r[:k])) for r in correct_off),
                     "plain_pass@equal_tokens": fmean(pass_at_budget(len(r), sum(r), budget) for r in correct_off)},
        "tokens_per_sample": {"healed": tok_on, "plain": tok_off}, "plain_samples_at_equal_tokens": budget,
        "plain_samples_drawn": k_eq, "per_problem": {"healed": correct_on, "plain": correct_off},
        "rewinds_per_sample": sum(t.rewinds for row in on for t in row) / (n * k),
        "difference": {key: _interval(v) for key, v in diffs.items()},
        "branches": {"erasures": len(events), "continued": len(picked), "continuations_each": n_branches,
                     "p_right_replacement": fmean(o[1] for o in outcomes) if outcomes else None,
                     "p_right_erased": fmean(o[2] for o in outcomes) if outcomes else None,
                     "difference": _interval(effect) if effect else None},
    }


def _interval(i: Interval) -> dict[str, Any]:
    return {"mean": i.mean, "low": i.low, "high": i.high, "level": i.level, "excludes_zero": i.excludes_zero()}


def table(res: dict[str, Any]) -> str:
    a, d, b = res["accuracy"], res["difference"], res["branches"]
    fmt = lambda i: f"{i['mean']:+.3f} [{i['low']:+.3f}, {i['high']:+.3f}]" if i else "n/a"
    lines = [f"{res['data']}: {res['problems']} problems x k={res['k']}; tokens/sample healed "
             f"{res['tokens_per_sample']['healed']:.1f} vs plain {res['tokens_per_sample']['plain']:.1f} "
             f"(equal tokens: {res['plain_samples_at_equal_tokens']:.2f} plain samples)",
             f"  avg@k          healed {a['healed_avg@k']:.3f}  plain {a['plain_avg@k']:.3f}  on-off {fmt(d['avg@k'])}",
             f"  pass@k         healed {a['healed_pass@k']:.3f}  plain {a['plain_pass@k']:.3f}  on-off {fmt(d['pass@k'])}",
             f"  pass@eq tokens healed {a['healed_pass@k']:.3f}  plain {a['plain_pass@equal_tokens']:.3f}  "
             f"on-off {fmt(d['pass@equal_tokens'])}",
             f"  branches: {b['continued']} of {b['erasures']} erasures x {b['continuations_each']} continuations; "
             f"P(right | replacement) - P(right | erased) {fmt(b['difference'])}"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from e3rl.eval import CliParser, build_config, cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["train"]:
        return _train_main(args[1:])

    def run() -> tuple[dict[str, Any], Optional[str]]:
        if not args or args[0] != "heal":
            raise ConfigError("name a study — python -m e3rl.study heal|train [options] (see --help after it)")
        h = CliParser("python -m e3rl.study heal", __doc__)
        h.add_argument("--model", help="local HF model dir (sets model.path), as in e3rl.eval")
        h.add_argument("--config", help="run config YAML (default: DIR/../config.yaml of --model, else built-in)")
        h.add_argument("--data", default="gym:chain_sum", help="one benchmark: a file or gym:<task>")
        h.add_argument("--size", type=int, default=200, help="problems (seeded held-out subset)")
        h.add_argument("--k", type=int, default=4, help="samples per problem and mode")
        h.add_argument("--branches", type=int, default=4, help="continuations per branch of an erasure")
        h.add_argument("--max-events", type=int, default=200, help="erasures continued (a seeded sample)")
        h.add_argument("--out", help="write the JSON result here")
        h.add_argument("overrides", nargs="*", metavar="section.key=value")
        a = h.parse_intermixed_args(args[1:])
        if a.branches < 1 or a.max_events < 0:
            raise ConfigError("--branches / --max-events: must be >= 1 / >= 0 — e.g. --branches 4 --max-events 200")
        cfg = build_config(argparse.Namespace(data=[a.data], model=a.model, config=a.config, k=a.k, size=a.size,
                                              overrides=a.overrides))
        return run_heal_study(cfg, a.data, a.k, a.size, a.branches, a.max_events), a.out

    return cli_main("e3rl.study", run, table)


def _train_main(args: list[str]) -> int:
    from pathlib import Path

    from e3rl import train_study
    from e3rl.eval import CliParser, cli_main
    from e3rl.experiment import parse_seeds

    def run() -> tuple[dict[str, Any], Optional[str]]:
        h = CliParser("python -m e3rl.study train", train_study.__doc__)
        h.add_argument("--experiment", help="an e3rl.experiment --out dir (its finished runs)")
        h.add_argument("--records", help="the runs' records dir (default <experiment>/records): read, and "
                                         "written for runs evaluated now; alone, the analysis of what it holds")
        h.add_argument("--data", default="gym:chain_sum", help="one benchmark: a file or gym:<task>")
        h.add_argument("--size", type=int, default=200, help="held-out problems (seeded, data.seed=0)")
        h.add_argument("--k", type=int, default=4, help="samples per problem")
        h.add_argument("--pairs", default="", help="a:b comparisons, or a-b:c-d (two gaps) (default: every "
                                                   "variant vs grpo, erase5 vs grpo_eqtok)")
        h.add_argument("--test-time-heal", action="store_true",
                       help="also sample every policy with test-time healing (variants named <v>+heal)")
        h.add_argument("--temperature", type=float,
                       help="also sample every compared policy at this temperature (variants named <v>@T<t>, "
                            "<v>@T<t>+heal with --test-time-heal)")
        h.add_argument("--seeds", help="only these seeds: N (0..N-1) or A-B (default: every seed found)")
        h.add_argument("--out", help="write the JSON result here")
        h.add_argument("--plot", help="draw accuracy per seed, entropy and log-prob mismatch curves to this PNG")
        a = h.parse_args(args)
        if a.size < 2 or a.k < 1:
            raise ConfigError(f"--size / --k: need >= 2 problems and >= 1 sample, got {a.size} / {a.k} — e.g. --size 200 --k 4")
        if a.temperature is not None and not a.temperature > 0:
            raise ConfigError(f"--temperature: need a sampling temperature > 0, got {a.temperature} — e.g. --temperature 0.7")

        res = train_study.run_train_study(Path(a.experiment) if a.experiment else None, a.data, a.size, a.k,
                                          a.pairs, a.test_time_heal, Path(a.records) if a.records else None,
                                          a.temperature, parse_seeds(a.seeds) if a.seeds else None)
        if a.plot:
            from e3rl.study_plots import plot_study

            print(f"e3rl.study: wrote {plot_study(res, Path(a.plot))}")
        return train_study.to_json(res), a.out

    return cli_main("e3rl.study", run, train_study.table)

if __name__ == "__main__":
    sys.exit(main())

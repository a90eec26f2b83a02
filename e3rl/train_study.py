"""Does healing during training help? Paired intervals for an `e3rl.experiment` (E3RL, GRPO,
Erase@k, the same seeds), from each finished run's final policy evaluated on one fixed held-out
set with plain sampling.

    python -m e3rl.study train [--experiment runs/experiment] [--records DIR] [--data gym:chain_sum]
                               [--size 200] [--k 4] [--pairs erase5:grpo,...] [--test-time-heal]
                               [--temperature T] [--seeds A-B] [--out FILE.json]

- Every final policy (`<experiment>/<variant>/seed<s>/policy`) samples k answers to the same
  `--size` held-out problems (the held-out draw of `data.seed=0`, whatever seed trained it), plain
  sampling, the run's own decoding settings, sampling seed 0.
- What a comparison needs of a run (its per-problem correctness, per-step entropy, log-prob
  mismatch and reward, token counts) is kept as a small record, `<records>/<variant>/seed<s>.json`
  (default `<experiment>/records`). Re-running evaluates only runs without one, and the analysis
  runs from records alone (`--records DIR` without `--experiment`): run dirs (1.6 GB each) need
  not outlive their record, and records committed to git carry an experiment across machines.
- A pair `a:b` compares variant a with b on the seeds both finished: the per-(seed, problem)
  difference of Avg@k, with a crossed bootstrap over seeds x problems (seeds are what training
  draws; problems what evaluation draws), and the minimum detectable effect of that many seeds
  at the observed seed-to-seed spread. A pair `a-b:c-d` compares two such gaps the same way (does
  a condition, e.g. the learner's precision, change what healing gains over GRPO?).
- `--temperature T` also samples each compared policy at T (`<v>@T<t>`, `<v>@T<t>+heal`): is
  test-time healing more than a colder sampler? Two ways of sampling the same policies are also
  compared at equal generated tokens (Pass@1 and Pass@m, the token ratio per seed). `--seeds`
  restricts the study to seeds whose runs or records have what it asks for.
- Per run, from its metrics: generated tokens (erased ones count), the policy entropy on the
  training batches (first and last step, and its least-squares slope per step), and
  `learner/logp_diff_mean` (the generator-learner log-prob mismatch).
"""
from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

from e3rl.core.passk import pass_at_budget, pass_at_k
from e3rl.core.stats import Interval, bootstrap_mean_ci, crossed_bootstrap_mean_ci, min_detectable_effect, t_mean_ci

HEALED = "+heal"  # a variant's final policy sampled with test-time healing
EQUAL_TOKENS = "grpo_eqtok"  # GRPO given the tokens Erase@5 generated on the same seed
MODES = ("plain", "healed")  # at the run's own sampling temperature; "plain@T0.7" etc. at another


def mode_name(healed: bool, temperature: Optional[float] = None) -> str:
    """A record's evaluation mode: "plain" / "healed" at the run's own temperature, with "@T<t>"
    when sampled at another (`--temperature`)."""
    return MODES[healed] + ("" if temperature is None else f"@T{temperature:g}")


def mode_temperature(mode: str) -> Optional[float]:
    _, sep, t = mode.partition("@T")
    return float(t) if sep else None


def mode_suffix(mode: str) -> str:
    """The analysis name's suffix of a variant sampled in `mode`: "", "+heal", "@T0.7", "@T0.7+heal"."""
    base, sep, t = mode.partition("@T")
    return (f"@T{t}" if sep else "") + (HEALED if base == "healed" else "")


def policy_of(name: str) -> str:
    """The trained variant behind an analysis name: "grpo@T0.7+heal" -> "grpo"."""
    return name.removesuffix(HEALED).partition("@T")[0]
CURVES = {"entropy": "learner/entropy", "logp_diff": "learner/logp_diff_mean", "reward": "gen/reward_mean",
          "tokens": "gen/tokens_produced"}  # per-step series a record keeps (its plots)
SUMMARY_KEYS = ("steps", "samples", "tokens_generated", "wall_s", "phase_seconds", "rewinds_per_sample",
                "accuracy_before", "accuracy_after", "learner_dtype")


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
    mean differences, their SD and the MDE (80% power, two-sided 5%) at that SD and seed count,
    and the t-interval of the per-seed means (`t_check`: the small-seed-count check on the
    crossed bootstrap, which resamples only the seed values it saw)."""
    seeds, table = paired_table(a, b)
    per_seed = [statistics.fmean(row) for row in table]
    out: dict[str, Any] = {"seeds": seeds, "per_seed": per_seed,
                           "mean_a": statistics.fmean(statistics.fmean(a[s]) for s in seeds) if seeds else None,
                           "mean_b": statistics.fmean(statistics.fmean(b[s]) for s in seeds) if seeds else None,
                           "difference": None, "seed_sd": None, "mde": None, "t_check": None}
    if len(seeds) >= 2:
        sd = statistics.stdev(per_seed)
        out |= {"difference": crossed_bootstrap_mean_ci(table, seed=seed), "seed_sd": sd,
                "mde": min_detectable_effect(sd, len(seeds)), "t_check": t_mean_ci(per_seed)}
    return out


def pass_gap_at_equal_tokens(healed: Sequence[int], plain: Sequence[int], k: int, m: int,
                             ratio: float) -> list[float]:
    """Per problem, healed Pass@m minus plain Pass@ at the same generated tokens (m x `ratio`
    plain samples, `ratio` = healed / plain tokens per sample; `pass_at_budget` interpolates a
    fractional count), from each problem's correct count among k samples per mode.

    Avg@k compares healing at equal *samples*; a healed sample costs more tokens, and the fair
    question at equal tokens is how often the same token budget holds a right answer (the
    Part 1 metric). With k samples per mode, m x ratio must not exceed k."""
    if not 0 < m * ratio <= k:
        raise ValueError(f"pass_gap_at_equal_tokens: {m} healed samples x ratio {ratio:.3f} must lie in (0, k={k}]")
    return [pass_at_k(k, h, m) - pass_at_budget(k, p, m * ratio) for h, p in zip(healed, plain)]


def healed_samples_to_compare(ratios: Sequence[float], k: int) -> list[int]:
    """The healed sample counts m at which every run's plain equal-token budget m x ratio fits in
    its k plain samples: m = 1 (one answer) and the largest such m (the closest to Pass@k)."""
    top = int(k // max(max(ratios), 1.0))
    return sorted({1, top}) if top >= 1 else []


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


def encode_correct(rows: Sequence[Sequence[bool]]) -> list[str]:
    """Per-problem correctness of k samples as one "0110" string per problem (a record's compact form)."""
    return ["".join("1" if c else "0" for c in row) for row in rows]


def decode_correct(rows: Sequence[str]) -> list[list[bool]]:
    return [[c == "1" for c in row] for row in rows]


def problems_digest(uids: Sequence[str]) -> str:
    """One hash of the held-out problems in order: records are paired only over the same set."""
    return hashlib.sha256("\n".join(uids).encode()).hexdigest()[:16]


def run_record(variant: str, seed: int, evals: dict[str, dict[str, Any]], steps: Sequence[dict[str, float]],
               summary: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What the comparisons and plots need of one finished run: its evaluations by mode (key,
    problems digest, correctness strings, tokens per sample), its trends and per-step curves, and
    from its summary the run's size and wall time."""
    curves = {name: [r[key] for r in steps if key in r] for name, key in CURVES.items()}
    run = {k: (summary or {})[k] for k in SUMMARY_KEYS if k in (summary or {})}
    return {"variant": variant, "seed": seed, "evals": dict(evals), "trends": run_trends(steps), "curves": curves,
            "run": run}


def record_evals(record: Optional[dict[str, Any]], key: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The modes of a record evaluated under `key` (the held-out set, k and seeds asked for now)."""
    if not record:
        return {}
    return {m: ev for m, ev in record["evals"].items() if ev.get("key") == key}


def terms_of(side: str) -> tuple[str, ...]:
    """A pair's side: one analysis name ("erase5") or the gap between two ("erase5-grpo")."""
    return tuple(side.split("-", 1)) if "-" in side else (side,)


def parse_pairs(text: str, variants: Sequence[str]) -> list[tuple[str, str]]:
    """`a:b` compares two variants; `a-b:c-d` compares two gaps (does a condition change what a
    method gains? e.g. `erase5_bf16-grpo_bf16:erase5-grpo`). Both sides of a pair are one or the other."""
    from e3rl.config import ConfigError

    pairs = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        a, _, b = item.partition(":")
        names = terms_of(a) + terms_of(b) if b else ()
        if not b or len(terms_of(a)) != len(terms_of(b)) or any(x not in variants for x in names):
            raise ConfigError(f"--pairs: {item!r} is not variant:variant (or a-b:c-d) of this experiment's "
                              f"{list(variants)} — e.g. --pairs erase5:grpo")
        pairs.append((a, b))
    return pairs


def side_values(per_run: dict[str, dict[int, dict[str, Any]]], side: str, field: str) -> dict[int, Any]:
    """{seed: value} of a pair's side: a variant's own (a list per problem, or one number per run),
    or for a gap `x-y` the difference on the seeds both have, problem by problem."""
    if len(terms_of(side)) == 1:
        return {s: r[field] for s, r in per_run[side].items()}
    x, y = (side_values(per_run, t, field) for t in terms_of(side))
    if field == "avg":
        return dict(zip(*paired_table(x, y)))
    return {s: x[s] - y[s] for s in sorted(set(x) & set(y))}


def default_pairs(variants: Sequence[str], baseline: str = "grpo", test_time_heal: bool = False) -> list[tuple[str, str]]:
    """Every variant against GRPO, and E3RL (Erase@5) against GRPO given E3RL's generated tokens
    (`grpo_eqtok`: the equal-token comparison; it ends with at least as many). With test-time
    healing evaluated too: healing at test time only (GRPO healed vs plain), in training given
    healing at test time (Erase@5 healed vs GRPO healed), and everywhere vs nowhere."""
    pairs = [(v, baseline) for v in variants if v != baseline and v != EQUAL_TOKENS and baseline in variants]
    if "erase5" in variants and EQUAL_TOKENS in variants:
        pairs.append(("erase5", EQUAL_TOKENS))
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


def load_records(records: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """{variant: {seed: record}} of every `<records>/<variant>/seed<s>.json`."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for f in sorted(records.glob("*/seed*.json")):
        if f.stem[4:].isdigit():
            out.setdefault(f.parent.name, {})[int(f.stem[4:])] = json.loads(f.read_text())
    return out


def evaluate_run(run: Path, spec: str, size: int, k: int, modes: Sequence[str]) -> dict[str, Any]:
    """The run's final policy on the fixed held-out set, sampled plainly and/or with test-time
    healing ("plain", "healed"; "...@T<t>" at temperature t) -> {mode: evaluation}."""
    import argparse

    from e3rl.eval import build_config, generator_group, load_sets, prepare_model
    from e3rl.evaluation import sample_rows

    key = eval_key(spec, size, k)
    out: dict[str, Any] = {}
    for temperature in dict.fromkeys(mode_temperature(m) for m in modes):  # one generator group each
        extra = [] if temperature is None else [f"gen.temperature={temperature}"]
        cfg = build_config(argparse.Namespace(data=[spec], model=str(run / "policy"), config=None, k=k, size=size,
                                              overrides=["data.seed=0", "run.seed=0", "run.progress=false", *extra]))
        cfg, tokenizer = prepare_model(cfg)
        es = load_sets(cfg, [spec], size, tokenizer)[0]
        with generator_group(cfg) as group:
            for mode in (m for m in modes if mode_temperature(m) == temperature):
                rows = sample_rows(group, es, k, heal=mode.startswith("healed"), seed=0)[0]
                out[mode] = {"key": key, "problems": problems_digest([p.uid for p in es.problems]),
                             "correct": encode_correct([[bool(t.correct) for t in row] for row in rows]),
                             "tokens_per_sample": statistics.fmean(len(t.stream_ids) for row in rows for t in row),
                             "temperature": cfg.gen.temperature}
    return out


def eval_key(spec: str, size: int, k: int) -> dict[str, Any]:
    return {"data": spec, "size": size, "k": k, "data_seed": 0, "sample_seed": 0}


def collect_records(runs: dict[str, dict[int, Path]], have: dict[str, dict[int, dict[str, Any]]], records: Path,
                    variants: Optional[set[str]], spec: str, size: int, k: int,
                    modes: Sequence[str], seeds: Optional[set[int]] = None) -> dict[str, dict[int, dict[str, Any]]]:
    """Every (variant, seed) with a finished run (`runs`) or a record (`have`), of `seeds` if given,
    -> its record holding
    `modes` under this key. A finished run without one is evaluated (only the missing modes) and
    its record written to `records`; a record whose run is gone must already hold them."""
    from e3rl.config import ConfigError
    from e3rl.metrics import read_metrics
    from e3rl.rundir import write_json_atomic

    key = eval_key(spec, size, k)
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for v in sorted(set(runs) | set(have)):
        if variants is not None and v not in variants:
            continue
        for s in sorted(set(runs.get(v, {})) | set(have.get(v, {}))):
            if seeds is not None and s not in seeds:
                continue
            rec, run = have.get(v, {}).get(s), runs.get(v, {}).get(s)
            evals = record_evals(rec, key)
            todo = [m for m in modes if m not in evals]
            if todo and run is None:
                raise ConfigError(f"--records: {v} seed {s} has no {'/'.join(todo)} evaluation of {spec} x {size} "
                                  f"x k={k} and its run dir is gone — re-run it, or compare what the records hold")
            if todo or rec is None:  # so the run is here
                new = evaluate_run(run, spec, size, k, todo) if todo else {}
                rec = run_record(v, s, {**(rec["evals"] if rec else {}), **new}, read_metrics(run)[0],
                                 json.loads((run / "summary.json").read_text()))
                (records / v).mkdir(parents=True, exist_ok=True)
                write_json_atomic(records / v / f"seed{s}.json", rec)
            out.setdefault(v, {})[s] = rec
    return out


def test_time_equal_tokens(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], k: int) -> dict[str, Any]:
    """The same policies sampled two ways (healed vs plain, or at two temperatures): a's Pass@m vs
    b's Pass@ at the same generated tokens, each seed at its own token ratio (its evaluations'
    tokens per sample), paired by seed and problem like Avg@k."""
    seeds = sorted(set(a) & set(b))
    ratio = {s: a[s]["eval_tokens_per_sample"] / b[s]["eval_tokens_per_sample"] for s in seeds}
    out: dict[str, Any] = {"token_ratio": {str(s): r for s, r in ratio.items()}}
    for m in healed_samples_to_compare(list(ratio.values()), k) if seeds else []:
        gap = {s: pass_gap_at_equal_tokens(a[s]["correct_counts"], b[s]["correct_counts"], k, m, ratio[s])
               for s in seeds}
        out[f"pass@{m}"] = compare_pair(gap, {s: [0.0] * len(g) for s, g in gap.items()})
    return out


def run_train_study(experiment: Optional[Path], spec: str, size: int, k: int, pairs_text: str,
                    test_time_heal: bool = False, records: Optional[Path] = None,
                    temperature: Optional[float] = None, seeds: Optional[Sequence[int]] = None) -> dict[str, Any]:
    from e3rl.config import ConfigError
    from e3rl.experiment import VARIANTS

    if experiment is not None and not experiment.is_dir():
        raise ConfigError(f"--experiment: {str(experiment)!r} is not a directory — pass an e3rl.experiment --out dir")
    if experiment is None and records is None:
        raise ConfigError("--experiment / --records: give an e3rl.experiment --out dir, a records dir, or both")
    records = records if records is not None else experiment / "records"
    modes = [mode_name(h, t) for t in (None, temperature)[:1 + (temperature is not None)]
             for h in (False, True)[:1 + test_time_heal]]
    runs = finished_runs(experiment) if experiment else {}
    have = load_records(records) if records.is_dir() else {}
    found = set(runs) | set(have)
    if not found:
        raise ConfigError(f"--experiment / --records: no finished run (<variant>/seed<k>/policy) and no record "
                          f"under {experiment or records} — run python -m e3rl.experiment first")
    names = [v + mode_suffix(m) for v in sorted(found) for m in modes]
    pairs = parse_pairs(pairs_text, names) if pairs_text else default_pairs(sorted(found), test_time_heal=test_time_heal)
    needed = {policy_of(x) for pair in pairs for side in pair for x in terms_of(side)}  # evaluate only what is compared
    key = eval_key(spec, size, k)
    per_run: dict[str, dict[int, dict[str, Any]]] = {}
    digests = set()
    chosen = set(seeds) if seeds is not None else None
    for v, recs in collect_records(runs, have, records, needed, spec, size, k, modes, chosen).items():
        for s, rec in recs.items():
            for mode, ev in record_evals(rec, key).items():
                correct = decode_correct(ev["correct"])
                digests.add(ev["problems"])
                per_run.setdefault(v + mode_suffix(mode), {})[s] = {
                    "avg": [sum(r) / k for r in correct], "pass": [float(any(r)) for r in correct],
                    "correct_counts": [sum(r) for r in correct],
                    "eval_tokens_per_sample": ev["tokens_per_sample"], **rec["trends"]}
    if len(digests) > 1:
        raise ConfigError(f"--records: the records hold {len(digests)} different held-out sets under one key "
                          "(another task config?) — compare records of one experiment")
    variants = {}
    for v, by_seed in per_run.items():
        xs = list(by_seed.values())
        base, temp = policy_of(v), v.removesuffix(HEALED).partition("@T")[2]
        label = (VARIANTS.get(base, (base,))[0] + (f", sampled at T = {temp}" if temp else "")
                 + (", healed at test time" if v.endswith(HEALED) else ""))
        variants[v] = {"label": label, "seeds": sorted(by_seed),
                       **{f"{m}": statistics.fmean(statistics.fmean(x[m]) if isinstance(x[m], list) else x[m]
                                                   for x in xs)
                          for m in ("avg", "pass", "tokens_generated", "entropy_first", "entropy_last",
                                    "entropy_slope", "logp_diff_mean")}}
    comparisons = {}
    for a, b in pairs:
        avg = compare_pair(side_values(per_run, a, "avg"), side_values(per_run, b, "avg"))
        ent = compare_scalar(side_values(per_run, a, "entropy_slope"), side_values(per_run, b, "entropy_slope"))
        gaps = len(terms_of(a)) > 1  # a gap has no token ratio of its own
        tok = [] if gaps else [per_run[a][s]["tokens_generated"] / per_run[b][s]["tokens_generated"]
                               for s in avg["seeds"]]
        comparisons[f"{a}:{b}"] = {"avg@k": avg, "entropy_slope": ent,
                                   "token_ratio": statistics.fmean(tok) if tok else None}
        if not gaps and policy_of(a) == policy_of(b):  # the same policies sampled two ways: also at equal generated tokens
            comparisons[f"{a}:{b}"]["equal_tokens"] = test_time_equal_tokens(per_run[a], per_run[b], k)
    return {"experiment": str(experiment) if experiment else None, "records": str(records), "data": spec,
            "size": size, "k": k, "variants": variants, "comparisons": comparisons,
            "per_run": {v: {str(s): r for s, r in by_seed.items()} for v, by_seed in per_run.items()}}


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
        t = f" (t over seeds [{a['t_check']['low']:+.3f}, {a['t_check']['high']:+.3f}])" if a.get("t_check") else ""
        lines.append(f"  {pair}: avg@k {_fmt(a['difference'])}{t} over {len(a['seeds'])} seeds{mde}; "
                     f"entropy slope {_fmt(c['entropy_slope']['difference'])}"
                     + (f"; tokens x{c['token_ratio']:.3f}" if c["token_ratio"] is not None else ""))
        for name, e in (c.get("equal_tokens") or {}).items():
            if name.startswith("pass@"):
                lines.append(f"    at equal generated tokens, {name} of a vs b: {_fmt(e['difference'])} "
                             f"(t over seeds [{e['t_check']['low']:+.3f}, {e['t_check']['high']:+.3f}])"
                             if e["t_check"] else f"    at equal generated tokens, {name} of a vs b: n/a")
        if pair.endswith(f":{EQUAL_TOKENS}") and (c["token_ratio"] or 0.0) > 1.0:
            lines.append(f"    ! {EQUAL_TOKENS} generated fewer tokens than its comparator: not an equal-token comparison")
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

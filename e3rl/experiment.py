"""E3RL vs GRPO (and the Erase@k ablation) on the same model, task, seeds and sample budget.

    python -m e3rl.experiment [CONFIG.yaml] [--seeds 3 | --seeds 5-11] [--variants grpo,erase1,erase3,erase5,grpo_eqtok]
                              [--out runs/experiment] [--target 0.3] [--parallel 1]
                              [--ray-address http://HEAD:8265]
                              [section.key=value ...]

Each (variant, seed) is one ordinary `python -m e3rl.run` into <out>/<variant>/seed<k>, run one after
another (or submitted together as Ray jobs with --ray-address: the jobs write to the absolute --out, so it must
be visible here too — run the command on the head node or use shared storage). Finished runs are skipped and
interrupted ones resume, so re-running the command completes an experiment. Variants differ only in
their overrides below; seeds set both `run.seed` (init, sampling) and `data.seed` (prompt order).
A variant may take its token budget from another's run of the same seed (`run.token_budget=@erase5`:
the tokens Erase@5 generated, so `grpo_eqtok` is GRPO at E3RL's generated tokens); that run is read
under --out, or from its record (--records) once its run dir is gone.
Every run evaluates with self-healing off (`run.eval_heal=plain`), so accuracy measures the trained
policy alone. Outputs: results.md / results.json (the table), curves.png, experiment.html.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from e3rl.config import ConfigError, load_config
from e3rl.metrics import read_metrics

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "grpo": ("GRPO (no healing)", ["algo.e3rl=false"]),
    "erase1": ("E³RL Erase@1", ["algo.e3rl=true", "heal.max_erases_per_traj=1"]),
    "erase3": ("E³RL Erase@3", ["algo.e3rl=true", "heal.max_erases_per_traj=3"]),
    "erase5": ("E³RL Erase@5 (paper)", ["algo.e3rl=true", "heal.max_erases_per_traj=5"]),
    # ablations of E3RL (Erase@5): erased segments get no credit; credit allocated uniformly
    "erase5_zero": ("E³RL Erase@5, erased credit zero", ["algo.e3rl=true", "heal.max_erases_per_traj=5",
                                                          "algo.erased_credit=zero"]),
    "erase5_uniform": ("E³RL Erase@5, uniform allocation", ["algo.e3rl=true", "heal.max_erases_per_traj=5",
                                                             "algo.allocation=uniform"]),
    # the generator-learner mismatch (protocol part 4, item 5): the learner computes in fp32 (it sees
    # its fp32 masters) or in bf16 (it lags its fp32 generators: most small updates round away), or
    # the generators run bf16 too (they see what a bf16 learner computes with)
    "grpo_fp32": ("GRPO, fp32 learner", ["algo.e3rl=false", "learner.dtype=float32"]),
    "erase5_fp32": ("E³RL Erase@5, fp32 learner", ["algo.e3rl=true", "heal.max_erases_per_traj=5",
                                                   "learner.dtype=float32"]),
    "grpo_bf16": ("GRPO, bf16 learner", ["algo.e3rl=false", "learner.dtype=bfloat16"]),
    "erase5_bf16": ("E³RL Erase@5, bf16 learner", ["algo.e3rl=true", "heal.max_erases_per_traj=5",
                                                   "learner.dtype=bfloat16"]),
    "grpo_bf16gen": ("GRPO, bf16 learner and generators", ["algo.e3rl=false", "learner.dtype=bfloat16",
                                                           "model.dtype=bfloat16"]),
    "erase5_bf16gen": ("E³RL Erase@5, bf16 learner and generators", ["algo.e3rl=true", "heal.max_erases_per_traj=5",
                                                                     "learner.dtype=bfloat16", "model.dtype=bfloat16"]),
    # GRPO given the tokens E3RL (Erase@5) generated on the same seed, erased ones included (it stops
    # after the step that reaches them; three times the steps at most): the equal-token comparison
    "grpo_eqtok": ("GRPO, E³RL's generated tokens", ["algo.e3rl=false", "run.steps=+16",
                                                     "run.token_budget=@erase5"]),
}
BUDGET_FROM = "run.token_budget=@"  # the budget is another variant's tokens on the same seed
# E3RL at equal samples generates more tokens than GRPO (erased attempts count): the study found its
# equal-sample gain was those tokens, so the default comparison includes GRPO at E3RL's tokens
DEFAULT_VARIANTS = "grpo,erase1,erase3,erase5,grpo_eqtok"
COMMON = ["run.eval_heal=plain", "run.progress=false"]


@dataclass
class RunSpec:
    variant: str
    seed: int
    out: Path
    overrides: list[str]

    def command(self, config: Optional[str]) -> list[str]:
        return ["python", "-m", "e3rl.run", *([config] if config else []), *self.overrides]


def parse_seeds(text: str) -> list[int]:
    """`--seeds`: "N" is seeds 0..N-1; "A-B" is seeds A..B. The range form lets a later session add
    seeds to a study whose earlier seeds survive only as records (their run dirs are gone)."""
    first, sep, last = text.partition("-")
    try:
        lo, hi = (int(first), int(last)) if sep else (0, int(first) - 1)
    except ValueError:
        lo, hi = 0, -1
    if lo < 0 or hi < lo:
        raise ConfigError(f"--seeds: {text!r} is not a seed count N >= 1 or a range A-B with 0 <= A <= B "
                          "— e.g. --seeds 12 or --seeds 5-11")
    return list(range(lo, hi + 1))


def plan(out: Path, variants: list[str], seeds: Sequence[int], extra: list[str], eval_every: int,
         base_steps: int = 0) -> list[RunSpec]:
    """Seed by seed (every variant of seed 0, then of seed 1, ...): an interrupted experiment has
    whole paired seeds, which is what the comparisons use. `run.steps=+N` in a variant means
    `base_steps` + N."""
    specs = []
    for s in seeds:
        for v in variants:
            d = out / v / f"seed{s}"
            own = [f"run.steps={base_steps + int(o.split('+')[1])}" if o.startswith("run.steps=+") else o
                   for o in VARIANTS[v][1]]
            ov = [*COMMON, f"run.eval_every={eval_every}", *extra, *own,
                  f"run.seed={s}", f"data.seed={s}", f"run.output_dir={d}"]
            specs.append(RunSpec(v, s, d, ov))
    return specs


def tokens_of(out: Path, variant: str, seed: int, records: Optional[Path]) -> int:
    """Tokens the (variant, seed) run generated, erased ones included: from its metrics under
    `out`, else from its record (`e3rl.study train --records`)."""
    from e3rl.train_study import run_trends

    run = out / variant / f"seed{seed}"
    if (run / "summary.json").is_file():
        return int(run_trends(read_metrics(run)[0])["tokens_generated"])
    record = records / variant / f"seed{seed}.json" if records else None
    if record is not None and record.is_file():
        return int(json.loads(record.read_text())["trends"]["tokens_generated"])
    raise ConfigError(f"{BUDGET_FROM}{variant}: {variant} seed {seed} has no finished run under {out}"
                      f"{' and no record in ' + str(records) if records else ''} — list {variant} before the "
                      "variant that takes its tokens, or pass --records")


def with_budget(spec: RunSpec, records: Optional[Path]) -> RunSpec:
    """`run.token_budget=@<variant>` made the tokens of that variant's run of the same seed."""
    ov = [f"run.token_budget={tokens_of(spec.out.parent.parent, o[len(BUDGET_FROM):], spec.seed, records)}"
          if o.startswith(BUDGET_FROM) else o for o in spec.overrides]
    return RunSpec(spec.variant, spec.seed, spec.out, ov)


def budget_sources(spec: RunSpec) -> list[str]:
    """The variants whose tokens this run's budget is."""
    return [o[len(BUDGET_FROM):] for o in spec.overrides if o.startswith(BUDGET_FROM)]


def placeholder_budget(spec: RunSpec) -> list[str]:
    """The overrides with any budget still to come from another run set to 1 (to validate them)."""
    return [f"{BUDGET_FROM[:-1]}1" if o.startswith(BUDGET_FROM) else o for o in spec.overrides]


def check_plan(specs: list[RunSpec], variants: list[str], config: Optional[str], records: Optional[Path]) -> None:
    """Before any run starts: every run's config is valid, and a variant that takes another's tokens
    comes after it (or its records are given). Raises ConfigError naming the flag."""
    for s in specs:
        load_config(config, placeholder_budget(s))
        for src in budget_sources(s):
            if src not in variants[:variants.index(s.variant)] and records is None:
                raise ConfigError(f"--variants: {s.variant} takes the tokens of {src}'s run of the same seed "
                                  f"— list {src} before it, or pass --records with {src}'s records")


def is_done(spec: RunSpec, config: Optional[str]) -> bool:
    summary = spec.out / "summary.json"
    if not summary.is_file() or not (spec.out / "policy").is_dir():
        return False
    s = json.loads(summary.read_text())
    if "complete" in s:  # all its steps, or its token budget spent
        return bool(s["complete"])
    return s.get("steps") == load_config(config, placeholder_budget(spec)).run.steps


def drop_checkpoints(spec: RunSpec) -> None:
    """A finished run's resumable checkpoints (~4x the policy: optimizer state) are not needed for
    the comparison, which reads its metrics, summary and exported policy."""
    shutil.rmtree(spec.out / "checkpoints", ignore_errors=True)


def run_local(spec: RunSpec, config: Optional[str], keep_checkpoints: bool = True,
              records: Optional[Path] = None) -> float:
    spec = with_budget(spec, records)
    spec.out.parent.mkdir(parents=True, exist_ok=True)
    log = spec.out.parent / f"{spec.out.name}.log"
    t = time.time()
    with open(log, "ab") as f:
        rc = subprocess.call([sys.executable, *spec.command(config)[1:]], stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"{spec.variant} seed {spec.seed} failed (exit {rc}): see {log}")
    if not keep_checkpoints:
        drop_checkpoints(spec)
    return time.time() - t


def run_as_jobs(specs: list[RunSpec], config: Optional[str], address: str, poll_s: float = 10.0) -> None:
    """Submit every run as a Ray job (the cluster schedules them) and wait for all."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    jobs = {client.submit_job(entrypoint=shlex.join(s.command(config)), runtime_env={"working_dir": "."}): s
            for s in specs}
    while jobs:
        time.sleep(poll_s)
        for job_id, s in list(jobs.items()):
            status = client.get_job_status(job_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                jobs.pop(job_id)
                if status != JobStatus.SUCCEEDED:
                    raise RuntimeError(f"{s.variant} seed {s.seed}: Ray job {job_id} {status}; `ray job logs {job_id}`")


# ------------------------------------------------------------------ reading results (pure)
def run_curves(run_dir: Path) -> dict:
    """Per-run series keyed by cumulative training samples (the equal-budget axis)."""
    steps, evals = read_metrics(run_dir)
    per_step = steps[0]["gen/samples"] if steps else 0.0
    samples_at = {0: 0.0}
    total = 0.0
    for r in steps:
        total += r["gen/samples"]
        samples_at[r["step"]] = total
    return {
        "samples_per_step": per_step,
        "reward": [(samples_at[r["step"]], r["gen/reward_mean"]) for r in steps],
        "rewinds": [(samples_at[r["step"]], r.get("e3rl/rewinds_per_sample", 0.0)) for r in steps],
        "accuracy": [(samples_at.get(r["step"], r["step"] * per_step), r["eval/accuracy"]) for r in evals],
        "summary": json.loads((run_dir / "summary.json").read_text()),
    }


def samples_to_target(accuracy: list[tuple[float, float]], target: float) -> Optional[float]:
    """Training samples at the first evaluation reaching `target` (None if none did)."""
    return next((s for s, a in sorted(accuracy) if a >= target), None)


def mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table_rows(curves: dict[str, list[dict]], target: float) -> list[dict]:
    rows = []
    for v, runs in curves.items():
        s = [c["summary"] for c in runs]
        wall = [sum(x["phase_seconds"].values()) / max(x["samples"], 1) for x in s]
        reached = [samples_to_target(c["accuracy"], target) for c in runs]
        rows.append({
            "variant": v, "label": VARIANTS.get(v, (v,))[0], "seeds": len(runs),
            "samples": s[0]["samples"],
            "accuracy_before": mean_std([x["accuracy_before"] for x in s]),
            "accuracy_after": mean_std([x["accuracy_after"] for x in s]),
            "reward_last": mean_std([x["reward_last5_mean"] for x in s]),
            "samples_to_target": mean_std([r for r in reached if r is not None]),
            "reached": sum(r is not None for r in reached),
            "tokens_per_sample": mean_std([x["tokens_per_sample"] for x in s]),
            "wall_s_per_sample": mean_std(wall),
            "rewinds_per_sample": mean_std([x["rewinds_per_sample"] for x in s]),
            "peak_kv_mb": mean_std([x["peak_kv_bytes"] / 1e6 for x in s]),
        })
    return rows


def _fmt(ms: tuple[float, float], digits: int = 3) -> str:
    m, s = ms
    return "—" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(rows: list[dict], target: float) -> str:
    head = ("| method | seeds | samples | held-out acc. before | acc. after | train reward (last 5) "
            f"| samples to acc. ≥ {target:g} | gen. tokens / sample | wall s / sample | rewinds / sample "
            "| peak KV MB |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        reach = f"{_fmt(r['samples_to_target'], 0)} ({r['reached']}/{r['seeds']})"
        lines.append(f"| {r['label']} | {r['seeds']} | {r['samples']} | {_fmt(r['accuracy_before'])} | "
                     f"{_fmt(r['accuracy_after'])} | {_fmt(r['reward_last'])} | {reach} | "
                     f"{_fmt(r['tokens_per_sample'], 1)} | {_fmt(r['wall_s_per_sample'], 2)} | "
                     f"{_fmt(r['rewinds_per_sample'], 2)} | {_fmt(r['peak_kv_mb'], 2)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ pictures
def _band(ax, runs: list[dict], key: str, label: str, style: str) -> None:
    """Mean over seeds at each shared x, shaded min..max."""
    xs = sorted({x for c in runs for x, _ in c[key]})
    if not xs:
        return
    pts = [[dict(c[key]).get(x) for c in runs] for x in xs]
    keep = [(x, [y for y in p if y is not None]) for x, p in zip(xs, pts)]
    keep = [(x, ys) for x, ys in keep if ys]
    mx = [x for x, _ in keep]
    line = ax.plot(mx, [statistics.fmean(ys) for _, ys in keep], style, label=label)[0]
    ax.fill_between(mx, [min(ys) for _, ys in keep], [max(ys) for _, ys in keep], color=line.get_color(), alpha=0.15)


def plot_curves(curves: dict[str, list[dict]], path: Path) -> Path:
    from e3rl.report import plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for v, runs in curves.items():
        label = VARIANTS.get(v, (v,))[0]
        _band(axes[0], runs, "accuracy", label, "o-")
        _band(axes[1], runs, "reward", label, ".-")
        _band(axes[2], runs, "rewinds", label, ".-")
    for ax, title, ylabel in ((axes[0], "Held-out accuracy (Avg@k, plain sampling)", "accuracy"),
                              (axes[1], "Training reward", "mean reward"),
                              (axes[2], "Rewinds per sample", "rewinds")):
        ax.set(title=title, xlabel="training samples", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("mean over seeds; shaded band = min..max over seeds", y=1.03)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_outputs(out: Path, curves: dict[str, list[dict]], target: float, wall_s: float) -> dict:
    import base64
    import html

    from e3rl.rundir import write_json_atomic

    rows = table_rows(curves, target)
    md = markdown_table(rows, target)
    (out / "results.md").write_text(md + "\n")
    write_json_atomic(out / "results.json", {"target": target, "wall_s": wall_s, "rows": rows})
    png = plot_curves(curves, out / "curves.png")
    img = base64.b64encode(png.read_bytes()).decode()
    links = "".join(f"<li>{html.escape(v)}: " + ", ".join(
        f"<a href='{v}/seed{i}/report.html'>seed {i}</a>" for i in range(len(runs))) + "</li>"
        for v, runs in curves.items())
    body = "".join(f"<tr>{''.join(f'<td>{html.escape(c.strip())}</td>' for c in line.strip('|').split('|'))}</tr>"
                   for line in md.splitlines() if not line.startswith("|---"))
    (out / "experiment.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>e3rl experiment</title><style>"
        "body{font-family:system-ui;max-width:1200px;margin:2em auto}td{border:1px solid #ccc;padding:3px 6px}"
        f"table{{border-collapse:collapse}}</style><h1>E³RL vs GRPO</h1><table>{body}</table>"
        f"<img style='max-width:100%' src='data:image/png;base64,{img}'><h2>Run reports</h2><ul>{links}</ul>",
        encoding="utf-8")
    return {"rows": rows, "markdown": md}


def run_all(todo: list[RunSpec], config: Optional[str], parallel: int, ray_address: str, keep_checkpoints: bool,
            records: Optional[Path]) -> None:
    """Locally (`parallel` at once) or as Ray jobs. In sequence, runs keep their seed-by-seed order;
    at once, a run whose token budget is another run's tokens waits for the wave that makes them."""
    from concurrent.futures import ThreadPoolExecutor

    waves = [todo] if not ray_address and parallel <= 1 else \
        [[s for s in todo if not budget_sources(s)], [s for s in todo if budget_sources(s)]]
    for wave in filter(None, waves):
        if ray_address:
            run_as_jobs([with_budget(s, records) for s in wave], config, ray_address)
            for s in wave if not keep_checkpoints else []:
                drop_checkpoints(s)
            continue
        run = functools.partial(run_local, config=config, keep_checkpoints=keep_checkpoints, records=records)
        with ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:  # each run is its own process
            for s, secs in zip(wave, pool.map(run, wave)):
                print(f"  {s.variant} seed {s.seed}: {secs:.0f} s", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m e3rl.experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", help="base YAML (default: the embedded default run)")
    p.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    p.add_argument("--seeds", default="3", help="N (seeds 0..N-1) or A-B (seeds A..B)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--out", default="runs/experiment")
    p.add_argument("--target", type=float, default=0.3, help="accuracy for the samples-to-target column")
    p.add_argument("--eval-every", type=int, default=4, help="held-out evaluation every N steps (the curve points)")
    p.add_argument("--parallel", type=int, default=1, help="local runs at once (1 = in sequence: honest timings)")
    p.add_argument("--ray-address", default="", help="submit the runs as Ray jobs to this dashboard address")
    p.add_argument("--records", default="", help="run records (e3rl.study train --records): where a token budget "
                                                 "taken from another variant is read when its run dir is gone")
    p.add_argument("--drop-checkpoints", action="store_true",
                   help="delete each finished run's checkpoints/ (keeps metrics, report and policy/): ~1.6 GB "
                        "per run of the default model")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if a.config and "=" in a.config:
        a.overrides, a.config = [a.config, *a.overrides], None
    try:
        variants = [v.strip() for v in a.variants.split(",") if v.strip()]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"--variants: unknown {unknown} — use variants from {list(VARIANTS)}")
        seeds = parse_seeds(a.seeds)
        out = Path(a.out).resolve()  # absolute: a Ray job's working dir is a temporary copy of this one
        base_steps = load_config(a.config, a.overrides).run.steps
        specs = plan(out, variants, seeds, a.overrides, a.eval_every, base_steps)
        records = Path(a.records) if a.records else None
        check_plan(specs, variants, a.config, records)
    except ConfigError as e:
        print(f"e3rl.experiment: error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    todo = [s for s in specs if not is_done(s, a.config)]
    print(f"{len(specs)} runs, {len(specs) - len(todo)} already done", flush=True)
    run_all(todo, a.config, a.parallel, a.ray_address, not a.drop_checkpoints, records)
    curves = {v: [run_curves(s.out) for s in specs if s.variant == v] for v in variants}
    res = write_outputs(out, curves, a.target, time.time() - t0)
    print(res["markdown"])
    print(f"experiment: {out}/results.md, curves.png, experiment.html ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

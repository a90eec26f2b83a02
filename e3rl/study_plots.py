"""The training study's figure, drawn from run records alone (`e3rl.train_study`), so the README's
plot can be redrawn from the records committed with it.

Three panels: each seed's held-out Avg@k per variant (a line joins a seed's variants: the pairing
the intervals use), and per-step policy entropy and generator-learner log-prob mismatch (mean over
seeds, shaded min..max): does healing collapse entropy faster than GRPO, and does the learner see
the policy that sampled?
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

from e3rl.train_study import HEALED, load_records, terms_of


def _band(ax: Any, series: Sequence[Sequence[float]], label: str) -> None:
    """Mean and min..max over the seeds that reached each step: runs of one variant may differ in
    length (`grpo_eqtok` trains until a token budget), and its later steps are what it adds."""
    n = max(len(s) for s in series)
    if n == 0:
        return
    xs = list(range(1, n + 1))
    cols = [[s[i] for s in series if len(s) > i] for i in range(n)]
    lo = min(len(s) for s in series)
    steps = f", {lo}–{n} steps: fewer seeds past {lo}" if lo < n else ""
    line = ax.plot(xs, [statistics.fmean(c) for c in cols], ".-", label=f"{label} ({len(series)} seeds{steps})")[0]
    ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols], color=line.get_color(), alpha=0.15)


def plotted_variants(res: dict[str, Any]) -> list[str]:
    """The variants the study's pairs compare (a record also holds other evaluations, e.g. at
    another temperature), GRPO's first: one figure per question."""
    compared = {x for pair in res["comparisons"] for side in pair.split(":") for x in terms_of(side)}
    return sorted((v for v in res["variants"] if v in compared or not compared),
                  key=lambda v: (not v.startswith("grpo"), v))


def plot_study(res: dict[str, Any], path: Path) -> Path:
    """`res`: a `run_train_study` result (its per-run Avg@k; its records dir has the curves)."""
    from matplotlib.ticker import MaxNLocator

    from e3rl.report import plt

    records = load_records(Path(res["records"]))
    variants = plotted_variants(res)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ax = axes[0]
    seeds = sorted({int(s) for v in variants for s in res["per_run"][v]})
    for s in seeds:
        pts = [(i, statistics.fmean(res["per_run"][v][str(s)]["avg"])) for i, v in enumerate(variants)
               if str(s) in res["per_run"][v]]
        ax.plot([i for i, _ in pts], [y for _, y in pts], "-", color="0.75", lw=0.8, zorder=1)
    for i, v in enumerate(variants):
        ys = [statistics.fmean(r["avg"]) for r in res["per_run"][v].values()]
        ax.scatter([i] * len(ys), ys, s=14, zorder=2)
        ax.plot([i - 0.25, i + 0.25], [statistics.fmean(ys)] * 2, "k-", lw=2, zorder=3)
    ax.set_xticks(range(len(variants)), variants, rotation=20, fontsize=8)
    ax.set(title=f"Held-out Avg@{res['k']} per seed ({res['size']} problems)", ylabel="accuracy")
    for ax, curve, title, ylabel in ((axes[1], "entropy", "Policy entropy (training batches)", "nats / token"),
                                     (axes[2], "logp_diff", "Generator–learner log-prob mismatch",
                                      "mean |Δ log p| / token")):
        for v in variants:
            if v.endswith(HEALED) or v not in records:
                continue
            studied = res["per_run"][v]  # the seeds the study compared (`--seeds`), not every record
            series = [r["curves"][curve] for s, r in records[v].items() if str(s) in studied and r["curves"].get(curve)]
            if series:
                _band(ax, series, v)
        ax.set(title=title, xlabel="training step", ylabel=ylabel)
        ys = [y for line in ax.lines for y in line.get_ydata()]
        if curve == "logp_diff" and ys and min(ys) > 0 and max(ys) / min(ys) > 100:  # fp32 (1e-5) beside bf16 (0.1)
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("bars: mean over seeds; grey lines join one seed's runs; bands: min..max over seeds", y=1.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

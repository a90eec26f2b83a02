"""report.html: one self-contained page per run (opens offline: plots are embedded PNGs, no scripts).

`python -m e3rl.report RUN_DIR` (re)writes it from what the run left behind: metrics.jsonl,
summary.json, config.yaml and traces/. Sections: summary numbers; reward and held-out accuracy;
rewind rate; phase times; uncertainty of kept vs erased segments; the adaptive threshold over
training; sample trajectories token by token, coloured by surprisal, erased segments struck through
beside what replaced them.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from actors.rollout_stats import MEAN_COUNTS  # noqa: E402
from e3rl.core.trajectory import Trajectory  # noqa: E402
from e3rl.metrics import read_metrics  # noqa: E402
from e3rl.traces import read_traces  # noqa: E402

PHASES = ("data", "generate", "buffer", "train", "sync")
SURPRISAL_CAP = 8.0  # nats at which a token's colour saturates


def png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    count = MEAN_COUNTS.get(key)  # a mean is plotted only where its count is > 0 (older runs wrote 0)
    pts = [(r["step"], r[key]) for r in rows
           if key in r and math.isfinite(r[key]) and (count is None or r.get(count, 1) > 0)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _figure(title: str, ylabel: str, lines: list[tuple[str, list, list, str]], xlabel: str = "step") -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for label, xs, ys, style in lines:
        if xs:
            ax.plot(xs, ys, style, label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if any(xs for _, xs, _, _ in lines):
        ax.legend(fontsize=8)
    return png(fig)


def reward_figure(steps: list[dict], evals: list[dict]) -> str:
    return _figure("Reward and held-out accuracy", "mean reward / accuracy", [
        ("training reward", *_series(steps, "gen/reward_mean"), "o-"),
        ("held-out accuracy (Avg@k)", *_series(evals, "eval/accuracy"), "s--"),
        ("held-out accuracy, healed at test time", *_series(evals, "eval/accuracy_healed"), "d:"),
    ])


def rewind_figure(steps: list[dict]) -> str:
    return _figure("Self-healing activity", "per sample / fraction", [
        ("rewinds per sample", *_series(steps, "e3rl/rewinds_per_sample"), "o-"),
        ("erased token fraction", *_series(steps, "e3rl/erased_token_frac"), "s--"),
    ])


def threshold_figure(steps: list[dict]) -> str:
    return _figure("Adaptive threshold vs segment uncertainty", "composite uncertainty U", [
        ("mean threshold τ (judged segments)", *_series(steps, "e3rl/threshold_mean"), "k-"),
        ("mean U of kept segments", *_series(steps, "e3rl/u_kept_mean"), "o-"),
        ("mean U of erased segments", *_series(steps, "e3rl/u_erased_mean"), "x-"),
    ])


def entropy_figure(steps: list[dict]) -> str:
    """Healing keeps low-probability segments out of the kept stream the learner trains on, so it
    may collapse entropy faster than GRPO: the curve to compare between runs. The log-prob
    mismatch (right axis) shows whether the generator still samples the learner's policy."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    xs, ys = _series(steps, "learner/entropy")
    ax.plot(xs, ys, "o-", label="policy entropy (nats/token, training batch)")
    ax.set(title="Policy entropy and generator–learner mismatch", xlabel="step", ylabel="entropy (nats)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    right = ax.twinx()
    dx, dy = _series(steps, "learner/logp_diff_mean")
    right.plot(dx, dy, "x--", color="tab:red", label="mean |logp generator − learner|")
    right.set_ylabel("log-prob mismatch")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    if xs or dx:
        ax.legend(handles=handles, fontsize=8)
    return png(fig)


def phase_figure(steps: list[dict]) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    xs = [r["step"] for r in steps]
    bottom = [0.0] * len(xs)
    for phase in PHASES:
        ys = [r.get(f"time/{phase}_s", 0.0) for r in steps]
        ax.bar(xs, ys, bottom=bottom, label=phase)
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set(title="Where each step's time went", xlabel="step", ylabel="seconds")
    ax.legend(fontsize=8)
    return png(fig)


def uncertainty_figure(traces: dict[int, list[Trajectory]]) -> str:
    """Histograms over all traced trajectories: segment U kept vs erased, token surprisal kept vs erased."""
    seg = {False: [], True: []}
    tok = {False: [], True: []}
    for trajs in traces.values():
        for t in trajs:
            s = t.segments
            for u, e in zip(s.uncertainty.tolist(), s.erased.tolist()):
                if math.isfinite(u):
                    seg[bool(e)].append(u)
            kept = t.kept_mask.tolist()
            for x, k in zip(t.surprisal.tolist(), kept):
                if math.isfinite(x):
                    tok[not k].append(min(x, 2 * SURPRISAL_CAP))
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.4))
    for ax, data, title in ((axes[0], seg, "segment uncertainty U"), (axes[1], tok, "token surprisal (nats)")):
        for erased, label in ((False, "kept"), (True, "erased")):
            if data[erased]:
                ax.hist(data[erased], bins=30, alpha=0.6, density=True, label=f"{label} (n={len(data[erased])})")
        ax.set(title=f"{title}: kept vs erased", xlabel=title, ylabel="density")
        ax.legend(fontsize=8)
    return png(fig)


# ------------------------------------------------------------------ trajectories as coloured text
def _colour(surprisal: float) -> str:
    a = max(0.0, min(1.0, surprisal / SURPRISAL_CAP)) if math.isfinite(surprisal) else 1.0
    return f"rgba(220,40,30,{0.08 + 0.82 * a:.2f})"


def render_trajectory(t: Trajectory, piece: Callable[[int], str]) -> str:
    """Tokens in generation order; each erased attempt is struck through and followed by its replacement."""
    ids, sur, erased_at = t.stream_ids.tolist(), t.surprisal.tolist(), t.erased_at.tolist()
    out, open_del = [], None  # open_del: the rewind (erased_at value) of the attempt being struck through
    for tok, s, e in zip(ids, sur, erased_at):
        if e >= 0 and open_del != e:
            out.append("</del>" if open_del is not None else "")
            out.append(f'<del title="erased by the rewind at stream index {e}">')
            open_del = e
        elif e < 0 and open_del is not None:
            out.append("</del>")
            open_del = None
        text = html.escape(piece(tok)).replace("\n", "↵<br>")
        out.append(f'<span style="background:{_colour(s)}" title="surprisal {s:.2f}">{text}</span>')
    if open_del is not None:
        out.append("</del>")
    return "".join(out)


def pick_samples(traces: dict[int, list[Trajectory]], n: int = 4) -> list[tuple[int, Trajectory]]:
    """A few from the first and the last traced step, preferring ones that rewound."""
    if not traces:
        return []
    picked: list[tuple[int, Trajectory]] = []
    for step in dict.fromkeys([min(traces), max(traces)]):
        ranked = sorted(traces[step], key=lambda t: (-min(t.rewinds, 1), -t.reward, t.sample_index))
        picked += [(step, t) for t in ranked[: max(n // 2, 1)]]
    return picked[:n]


def _token_piece(tokenizer: Any) -> Callable[[int], str]:
    if tokenizer is None:
        return lambda tok: f"⟨{tok}⟩"
    return lambda tok: tokenizer.decode([tok], skip_special_tokens=False)


def _load_tokenizer(run_dir: Path) -> Optional[Any]:
    try:
        from e3rl.config import load_config
        from e3rl.models import load_tokenizer

        return load_tokenizer(load_config(Path(run_dir) / "config.yaml").model)
    except Exception:  # the report still renders (token ids instead of text)
        return None


# ------------------------------------------------------------------ page
CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.traj{font-family:ui-monospace,monospace;font-size:.85em;line-height:1.7;border:1px solid #ddd;padding:.6em;
white-space:normal;word-wrap:break-word}.traj del{text-decoration:line-through 2px #333;opacity:.55;
background:#eee}.meta{color:#666;font-size:.85em}.legend span{padding:0 6px}"""


def _summary_table(summary: dict) -> str:
    keys = [("steps", "steps"), ("samples", "samples"), ("reward_first", "reward (first step)"),
            ("reward_last", "reward (last step)"), ("accuracy_before", "held-out accuracy before"),
            ("accuracy_after", "held-out accuracy after"),
            ("accuracy_healed_before", "held-out accuracy before, healed at test time"),
            ("accuracy_healed_after", "held-out accuracy after, healed at test time"),
            ("rewinds_per_sample", "rewinds / sample"),
            ("tokens_per_sample", "generated tokens / sample"), ("samples_per_s", "samples / s"),
            ("peak_kv_bytes", "peak KV cache (MB)"), ("wall_s", "wall time (s)")]
    rows = []
    for k, label in keys:
        v = summary.get(k)
        if v is None:
            continue
        v = v / 1e6 if k == "peak_kv_bytes" else v
        rows.append(f"<tr><td>{label}</td><td>{v:.3f}</td></tr>" if isinstance(v, float) else
                    f"<tr><td>{label}</td><td>{v}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def build_report(run_dir: Path, tokenizer: Any = None) -> str:
    run_dir = Path(run_dir)
    steps, evals = read_metrics(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    traces = read_traces(run_dir)
    title = f"e3rl run report — {run_dir.name}"
    algo = "E³RL (self-healing on)" if summary.get("e3rl", True) else "GRPO (self-healing off)"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class=meta>{html.escape(algo)} · allocation {html.escape(str(summary.get('allocation', '?')))}"
             f" · run dir <code>{html.escape(str(run_dir))}</code></p>",
             "<h2 id=summary>Summary</h2>", _summary_table(summary)]
    figures = [("Reward and accuracy", "reward", reward_figure(steps, evals)),
               ("Rewind rate", "rewinds", rewind_figure(steps)),
               ("Phase times", "phases", phase_figure(steps)),
               ("Uncertainty of kept vs erased segments", "uncertainty", uncertainty_figure(traces)),
               ("Threshold over training", "threshold", threshold_figure(steps)),
               ("Policy entropy", "entropy", entropy_figure(steps))]
    for name, anchor, data in figures:
        parts.append(f"<h2 id={anchor}>{name}</h2><img alt='{name}' src='data:image/png;base64,{data}'>")
    parts.append("<h2 id=samples>Sample trajectories</h2><p class=legend>colour = surprisal "
                 f"(−log p under the policy; white 0 → red ≥ {SURPRISAL_CAP:g} nats); "
                 "<del>struck through</del> = erased segment, regenerated right after it. Hover a token for its value.</p>")
    piece = _token_piece(tokenizer if tokenizer is not None else _load_tokenizer(run_dir))
    samples = pick_samples(traces)
    if not samples:
        parts.append("<p>No traces were recorded (run.trace_every=0).</p>")
    for step, t in samples:
        prompt = "".join(piece(x) for x in t.prompt_ids.tolist()[-48:])
        parts.append(f"<p class=meta>step {step} · group {t.group_id} sample {t.sample_index} · reward "
                     f"{t.reward:.2f} · {t.rewinds} rewinds · finish {html.escape(t.finish_reason)}<br>"
                     f"prompt (end): …{html.escape(prompt)}</p><div class=traj>{render_trajectory(t, piece)}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: Path, tokenizer: Any = None) -> Path:
    """Write run_dir/report.html atomically; returns its path."""
    import os

    path = Path(run_dir) / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(build_report(run_dir, tokenizer), encoding="utf-8")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / "metrics.jsonl").is_file():
        print("usage: python -m e3rl.report RUN_DIR  (a run dir holding metrics.jsonl)", file=sys.stderr)
        return 2
    print(write_report(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

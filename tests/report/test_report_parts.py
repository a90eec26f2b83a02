"""The report's and the experiment's parts on hand-built data: no Ray, no model (milliseconds)."""
from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch

from actors.rollout_stats import merge_stats, rollout_stats, segment_stats
from e3rl.config import ConfigError, load_config
from e3rl.experiment import (DEFAULT_VARIANTS, VARIANTS, budget_sources, check_plan, markdown_table, mean_std,
                             parse_seeds, placeholder_budget, plan, samples_to_target, table_rows, with_budget)
from e3rl.report import build_report, pick_samples, render_trajectory
from e3rl.traces import read_traces, write_trace
from tests.core.test_trajectory import _traj


def piece(tok: int) -> str:
    return f"t{tok} "


def test_render_strikes_through_each_erased_attempt_then_shows_its_replacement():
    t = _traj()  # stream 10..19; tokens 12,13,14 erased by rewind 5; token 17 erased by rewind 8
    out = render_trajectory(t, piece)
    text = re.sub(r"<span[^>]*>", "", out).replace("</span>", "")
    text = re.sub(r'<del title="[^"]*">', "<del>", text)
    assert text == "t10 t11 <del>t12 t13 t14 </del>t15 t16 <del>t17 </del>t18 t19 "
    # colour grows with surprisal (0.1 .. 2.0 nats here)
    alphas = [float(a) for a in re.findall(r"rgba\(220,40,30,([0-9.]+)\)", out)]
    assert len(alphas) == 10 and alphas == sorted(alphas) and alphas[0] < alphas[-1]
    assert 'title="surprisal 2.00"' in out


def test_render_escapes_html_in_tokens():
    out = render_trajectory(_traj(), lambda tok: "<b>&" if tok == 10 else "x")
    assert "&lt;b&gt;&amp;" in out and "<b>" not in out


def test_pick_samples_prefers_rewound_and_spans_first_and_last_step():
    a, b = _traj(reward=0.0), _traj(reward=1.0)
    b.rewinds = 0
    picked = pick_samples({1: [b, a], 5: [a, b]}, n=4)
    assert [s for s, _ in picked] == [1, 1, 5, 5]
    assert picked[0][1] is a  # rewound first, despite lower reward


def test_segment_stats_by_hand_and_weighted_merge():
    t = _traj()  # kept U: 1, 2 (nan skipped); erased U: 9, 8; finite thresholds 3, 3, 4, 3
    s = segment_stats([t])
    assert (s["e3rl/segments_kept"], s["e3rl/segments_erased"], s["e3rl/segments_judged"]) == (2.0, 2.0, 4.0)
    assert s["e3rl/u_kept_mean"] == pytest.approx(1.5) and s["e3rl/u_erased_mean"] == pytest.approx(8.5)
    assert s["e3rl/threshold_mean"] == pytest.approx(3.25)
    one = rollout_stats([t], seconds=2.0, peak_kv_bytes=100)
    two = rollout_stats([t, t, t], seconds=1.0, peak_kv_bytes=300)
    two["e3rl/u_kept_mean"] = 3.5  # pretend another shard's kept segments were more uncertain
    m = merge_stats([one, two])
    assert m["gen/samples"] == 4 and m["gen/peak_kv_bytes"] == 300 and m["gen/seconds"] == 2.0
    assert m["e3rl/segments_kept"] == 8  # 2 + 6
    assert m["e3rl/u_kept_mean"] == pytest.approx((1.5 * 2 + 3.5 * 6) / 8)  # weighted by kept segments
    assert m["gen/tokens_per_s"] == pytest.approx(40 / 2.0)


def test_means_over_no_segments_are_left_out_not_zero():
    t = _traj()
    t.segments.erased[:] = False
    t.segments.threshold[:] = float("inf")
    s = segment_stats([t])
    assert s["e3rl/segments_erased"] == 0 and "e3rl/u_erased_mean" not in s and "e3rl/threshold_mean" not in s
    m = merge_stats([rollout_stats([t], 1.0), rollout_stats([_traj()], 1.0)])
    assert m["e3rl/u_erased_mean"] == pytest.approx(8.5) and m["e3rl/threshold_mean"] == pytest.approx(3.25)


def test_trace_files_round_trip(tmp_path):
    trajs = [_traj(0.5), _traj(1.0)]
    write_trace(tmp_path, 3, trajs)
    write_trace(tmp_path, 1, trajs[:1])
    back = read_traces(tmp_path)
    assert list(back) == [1, 3] and len(back[3]) == 2
    assert torch.equal(back[3][1].stream_ids, trajs[1].stream_ids) and back[3][1].reward == 1.0
    assert torch.equal(back[3][0].erased_at, trajs[0].erased_at)
    assert not list((tmp_path / "traces").glob("*.tmp"))


def _curve(acc, reward=0.5, samples=32, rewinds=0.0, kv=1e6):
    pts = [(i * 16.0, a) for i, a in enumerate(acc)]
    return {"samples_per_step": 16.0, "accuracy": pts, "reward": pts[1:], "rewinds": [(16.0, rewinds)],
            "summary": {"samples": samples, "accuracy_before": acc[0], "accuracy_after": acc[-1],
                        "reward_last5_mean": reward, "tokens_per_sample": 20.0, "rewinds_per_sample": rewinds,
                        "peak_kv_bytes": kv, "phase_seconds": {"generate": 8.0, "train": 24.0}}}


def test_samples_to_target_and_table_numbers():
    assert samples_to_target([(0, 0.1), (16, 0.35), (32, 0.5)], 0.3) == 16
    assert samples_to_target([(0, 0.1), (16, 0.2)], 0.3) is None
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([2.0]) == (2.0, 0.0) and math.isnan(mean_std([])[0])
    curves = {"grpo": [_curve([0.1, 0.2, 0.4]), _curve([0.1, 0.3, 0.3])],
              "erase1": [_curve([0.1, 0.1, 0.2], rewinds=0.8)]}
    rows = {r["variant"]: r for r in table_rows(curves, target=0.3)}
    g = rows["grpo"]
    assert g["accuracy_after"] == (pytest.approx(0.35), pytest.approx(math.sqrt(0.005)))
    assert g["samples_to_target"] == (24.0, pytest.approx(math.sqrt(128))) and g["reached"] == 2  # 32 and 16
    assert g["wall_s_per_sample"] == (1.0, 0.0)  # (8 + 24) s / 32 samples
    assert rows["erase1"]["reached"] == 0 and math.isnan(rows["erase1"]["samples_to_target"][0])
    md = markdown_table(list(rows.values()), 0.3)
    assert "| GRPO (no healing) | 2 | 32 | 0.100 ± 0.000 | 0.350 ± 0.071 |" in md
    assert "| E³RL Erase@1 | 1 | 32 |" in md and "— (0/1)" in md


def test_plan_gives_every_variant_the_same_seeds_and_budget(tmp_path):
    specs = plan(tmp_path, ["grpo", "erase3", "grpo_eqtok"], seeds=range(2), extra=["run.steps=4"], eval_every=2,
                 base_steps=4)
    # seed by seed: a stopped experiment leaves whole paired seeds
    assert [(s.variant, s.seed) for s in specs] == [("grpo", 0), ("erase3", 0), ("grpo_eqtok", 0),
                                                    ("grpo", 1), ("erase3", 1), ("grpo_eqtok", 1)]
    for s in specs:
        assert f"run.seed={s.seed}" in s.overrides and f"data.seed={s.seed}" in s.overrides
        assert "run.steps=4" in s.overrides and "run.eval_heal=plain" in s.overrides
        assert s.overrides[-1] == f"run.output_dir={tmp_path / s.variant / f'seed{s.seed}'}"
        if s.variant == "grpo_eqtok":  # three times the steps as its cap; the later override wins
            assert load_config(None, placeholder_budget(s)).run.steps == 20
            assert budget_sources(s) == ["erase5"]
        else:
            assert all(o in s.overrides for o in VARIANTS[s.variant][1])
            assert load_config(None, s.overrides).run.steps == 4


def test_the_default_experiment_compares_at_equal_tokens_too(tmp_path):
    """E3RL generates more tokens per sample than GRPO; the default variants include GRPO at E3RL's
    tokens, after the Erase@5 run it takes them from, and the plan of the defaults checks out."""
    variants = DEFAULT_VARIANTS.split(",")
    specs = plan(tmp_path, variants, [0], [], 0, base_steps=8)
    check_plan(specs, variants, None, None)
    assert [s.variant for s in specs if budget_sources(s)] == ["grpo_eqtok"]
    wrong = ["grpo_eqtok", "erase5"]
    with pytest.raises(ConfigError, match="--variants: grpo_eqtok takes the tokens of erase5's run"):
        check_plan(plan(tmp_path, wrong, [0], [], 0, base_steps=8), wrong, None, None)
    check_plan(plan(tmp_path, wrong, [0], [], 0, base_steps=8), wrong, None, tmp_path)  # records may hold them


def test_seeds_are_a_count_or_a_range_so_a_later_session_can_add_seeds(tmp_path):
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("5-7") == [5, 6, 7] and parse_seeds("4-4") == [4]
    assert [(s.variant, s.seed) for s in plan(tmp_path, ["grpo", "erase5"], parse_seeds("5-6"), [], 0)] == \
        [("grpo", 5), ("erase5", 5), ("grpo", 6), ("erase5", 6)]
    for bad in ["0", "7-5", "x", "-3", "2-"]:
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


def test_report_page_from_a_hand_written_run(tmp_path):
    rows = [{"step": 0, "eval/accuracy": 0.1},
            {"step": 1, "gen/reward_mean": 0.2, "e3rl/rewinds_per_sample": 1.0, "time/generate_s": 1.0,
             "time/train_s": 2.0, "e3rl/threshold_mean": 3.0, "e3rl/u_kept_mean": 2.0, "e3rl/u_erased_mean": 5.0},
            {"step": 1, "eval/accuracy": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 1, "samples": 8, "e3rl": True, "peak_kv_bytes": 2e6}))
    write_trace(tmp_path, 1, [_traj()])
    page = build_report(tmp_path, tokenizer=None)
    for anchor in ("summary", "reward", "rewinds", "phases", "uncertainty", "threshold", "entropy", "samples"):
        assert f"<h2 id={anchor}>" in page
    assert page.count("data:image/png;base64,") == 6
    assert page.count("<del ") == 2 and "<td>peak KV cache (MB)</td><td>2.000</td>" in page
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")  # offline, self-contained


def test_entropy_figure_plots_the_runs_entropy_and_mismatch(monkeypatch):
    import e3rl.report as report

    drawn = {}
    monkeypatch.setattr(report, "png", lambda fig: drawn.setdefault(
        "lines", [(tuple(l.get_xdata()), tuple(l.get_ydata())) for a in fig.axes for l in a.get_lines()]) and "x")
    steps = [{"step": 1, "learner/entropy": 2.0, "learner/logp_diff_mean": 1e-4},
             {"step": 2, "learner/entropy": 1.6},
             {"step": 3, "learner/entropy": 1.1, "learner/logp_diff_mean": 3e-4}]
    report.entropy_figure(steps)
    assert drawn["lines"] == [((1, 2, 3), (2.0, 1.6, 1.1)), ((1, 3), (1e-4, 3e-4))]


def test_a_token_budget_taken_from_another_variant_is_its_run_of_the_same_seed(tmp_path):
    """`run.token_budget=@erase5` becomes the tokens Erase@5 generated on that seed (erased ones
    count): from its run's metrics, else from its record once the run dir is gone."""
    spec = plan(tmp_path / "exp", ["erase5", "grpo_eqtok"], seeds=range(2), extra=[], eval_every=0, base_steps=8)[3]
    assert (spec.variant, spec.seed) == ("grpo_eqtok", 1)
    run = tmp_path / "exp" / "erase5" / "seed1"
    run.mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 0, "eval/accuracy": 0.1},
        {"step": 1, "gen/reward_mean": 0.1, "gen/tokens_produced": 300.0},
        {"step": 2, "gen/reward_mean": 0.2, "gen/tokens_produced": 250.0}]))
    resolved = with_budget(spec, records=None)
    assert "run.token_budget=550" in resolved.overrides and not budget_sources(resolved)
    assert load_config(None, resolved.overrides).run.token_budget == 550
    records = tmp_path / "records"
    (records / "erase5").mkdir(parents=True)
    (records / "erase5" / "seed1.json").write_text(json.dumps({"trends": {"tokens_generated": 777.0}}))
    shutil.rmtree(run)
    assert "run.token_budget=777" in with_budget(spec, records).overrides
    with pytest.raises(ConfigError, match="erase5 seed 1 has no finished run under .* and no record"):
        with_budget(spec, tmp_path / "elsewhere")


def test_study_band_averages_the_seeds_that_reached_each_step():
    """grpo_eqtok's runs end at different steps: each step's mean and band use the seeds that got there,
    so the steps past the shortest run are drawn rather than cut off."""
    from e3rl.report import plt
    from e3rl.study_plots import _band

    fig, ax = plt.subplots()
    _band(ax, [[1.0, 2.0], [3.0, 4.0, 5.0]], "grpo_eqtok")
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [2.0, 3.0, 5.0]
    assert line.get_label() == "grpo_eqtok (2 seeds, 2–3 steps: fewer seeds past 2)"
    plt.close(fig)

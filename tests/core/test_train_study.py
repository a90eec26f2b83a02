"""The training study's pure parts: pairing by seed and problem, the comparison's numbers against
direct computation, trends from a run's metrics, and which comparisons are made."""
from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from e3rl.config import ConfigError
from e3rl.core.stats import bootstrap_mean_ci, crossed_bootstrap_mean_ci, min_detectable_effect, t_mean_ci
from e3rl.train_study import (compare_pair, compare_scalar, decode_correct, default_pairs, encode_correct, eval_key,
                               healed_samples_to_compare, mode_name, mode_suffix, mode_temperature, paired_table,
                               parse_pairs, pass_gap_at_equal_tokens, policy_of, problems_digest, record_evals,
                               run_record, run_train_study, run_trends, slope)


def test_paired_table_keeps_the_seeds_both_variants_finished_and_subtracts_per_problem():
    a = {0: [1.0, 0.5], 1: [0.0, 0.25], 3: [1.0, 1.0]}
    b = {1: [0.5, 0.25], 0: [0.75, 0.0], 2: [0.0, 0.0]}
    seeds, table = paired_table(a, b)
    assert seeds == [0, 1] and table == [[0.25, 0.5], [-0.5, 0.0]]
    with pytest.raises(ValueError, match="seed 0 has 2 vs 3 problems"):
        paired_table({0: [1.0, 0.0]}, {0: [1.0, 0.0, 0.0]})


def test_compare_pair_is_the_crossed_bootstrap_of_the_paired_table_with_its_mde():
    rng = np.random.default_rng(1)
    a = {s: list(rng.random(30)) for s in range(5)}
    b = {s: list(rng.random(30)) for s in range(5)}
    c = compare_pair(a, b, seed=3)
    seeds, table = paired_table(a, b)
    assert c["seeds"] == [0, 1, 2, 3, 4]
    assert c["difference"] == crossed_bootstrap_mean_ci(table, seed=3)
    per_seed = [float(np.mean(np.subtract(a[s], b[s]))) for s in seeds]
    assert c["per_seed"] == pytest.approx(per_seed)
    assert c["seed_sd"] == pytest.approx(statistics.stdev(per_seed))
    assert c["mde"] == pytest.approx(min_detectable_effect(statistics.stdev(per_seed), 5))
    assert c["mean_a"] - c["mean_b"] == pytest.approx(c["difference"].mean)
    assert c["t_check"] == t_mean_ci(per_seed)


def test_compare_pair_with_one_common_seed_gives_means_but_no_interval():
    c = compare_pair({0: [1.0, 0.0], 1: [1.0, 1.0]}, {0: [0.0, 0.0]})
    assert c["seeds"] == [0] and c["per_seed"] == [0.5]
    assert c["difference"] is None and c["mde"] is None and c["mean_a"] == 0.5 and c["mean_b"] == 0.0


def test_slope_is_the_least_squares_fit():
    ys = [2.0, 1.7, 1.9, 1.2, 1.0]
    assert slope(ys) == pytest.approx(np.polyfit(np.arange(5), ys, 1)[0])
    assert slope([3.0]) == 0.0


def test_run_trends_count_erased_tokens_and_follow_entropy_over_steps():
    steps = [{"step": 1, "gen/tokens_produced": 100.0, "gen/samples": 16.0, "learner/entropy": 2.0,
              "learner/logp_diff_mean": 1e-4},
             {"step": 2, "gen/tokens_produced": 120.0, "gen/samples": 16.0, "learner/entropy": 1.5,
              "learner/logp_diff_mean": 3e-4}]
    t = run_trends(steps)
    assert t["tokens_generated"] == 220.0 and t["samples"] == 32.0
    assert (t["entropy_first"], t["entropy_last"], t["entropy_slope"]) == (2.0, 1.5, pytest.approx(-0.5))
    assert t["logp_diff_mean"] == pytest.approx(2e-4)


def test_default_pairs_compare_with_grpo_and_at_equal_tokens_with_grpo_given_e3rls_tokens():
    assert default_pairs(["grpo", "erase1", "erase5", "grpo_eqtok"]) == [
        ("erase1", "grpo"), ("erase5", "grpo"), ("erase5", "grpo_eqtok")]
    assert default_pairs(["erase1", "erase5"]) == []
    # test-time healing evaluated too: test time only, training given test time, everywhere vs nowhere
    assert default_pairs(["grpo", "erase5"], test_time_heal=True) == [
        ("erase5", "grpo"), ("grpo+heal", "grpo"), ("erase5+heal", "grpo+heal"), ("erase5+heal", "grpo")]
    assert parse_pairs("erase5:grpo, erase1:grpo", ["grpo", "erase1", "erase5"]) == [("erase5", "grpo"),
                                                                                      ("erase1", "grpo")]
    with pytest.raises(ConfigError, match="--pairs: 'erase3:grpo' is not variant:variant"):
        parse_pairs("erase3:grpo", ["grpo", "erase5"])


def test_compare_scalar_pairs_one_number_per_run_by_seed():
    c = compare_scalar({0: -0.10, 1: -0.05, 2: -0.20, 5: 1.0}, {0: -0.02, 1: -0.04, 2: -0.08})
    assert c["seeds"] == [0, 1, 2] and c["per_seed"] == pytest.approx([-0.08, -0.01, -0.12])
    assert c["difference"] == bootstrap_mean_ci(c["per_seed"])
    assert compare_scalar({0: 1.0}, {0: 0.5})["difference"] is None


# ------------------------------------------------------------------ records
def _record(variant: str, seed: int, correct: list[list[bool]], digest: str = "d0", k: int = 2,
            size: int = 3) -> dict:
    steps = [{"step": 1, "gen/reward_mean": 0.2, "gen/tokens_produced": 50.0, "gen/samples": 8.0,
              "learner/entropy": 1.0 + seed, "learner/logp_diff_mean": 0.01},
             {"step": 2, "gen/reward_mean": 0.4, "gen/tokens_produced": 40.0, "gen/samples": 8.0,
              "learner/entropy": 0.5 + seed, "learner/logp_diff_mean": 0.03}]
    ev = {"key": eval_key("gym:chain_sum", size, k), "problems": digest, "correct": encode_correct(correct),
          "tokens_per_sample": 9.0}
    return run_record(variant, seed, {"plain": ev}, steps)


def _write(records, rec) -> None:
    (records / rec["variant"]).mkdir(parents=True, exist_ok=True)
    (records / rec["variant"] / f"seed{rec['seed']}.json").write_text(json.dumps(rec))


def test_a_record_keeps_correctness_compactly_and_the_per_step_curves():
    rows = [[True, False], [False, False], [True, True]]
    assert encode_correct(rows) == ["10", "00", "11"] and decode_correct(encode_correct(rows)) == rows
    rec = _record("grpo", 1, rows)
    assert rec["curves"] == {"entropy": [2.0, 1.5], "logp_diff": [0.01, 0.03], "reward": [0.2, 0.4],
                             "tokens": [50.0, 40.0]}
    assert rec["trends"]["tokens_generated"] == 90.0 and rec["trends"]["entropy_slope"] == pytest.approx(-0.5)
    assert problems_digest(["a", "b"]) != problems_digest(["b", "a"])
    kept = run_record("grpo", 1, {}, [], summary={"steps": 2, "wall_s": 5.0, "final_policy": "/tmp/x"})["run"]
    assert kept == {"steps": 2, "wall_s": 5.0}  # the run's size and time, not its paths
    assert record_evals(rec, eval_key("gym:chain_sum", 3, 2)) == rec["evals"]
    assert record_evals(rec, eval_key("gym:chain_sum", 3, 4)) == {}  # another k: not this evaluation


def test_the_analysis_runs_from_records_alone_and_pairs_them_by_seed_and_problem(tmp_path):
    a = {0: [[True, True], [False, True], [False, False]], 1: [[True, False], [True, True], [False, False]]}
    b = {0: [[True, False], [False, False], [False, False]], 1: [[False, False], [True, True], [True, False]]}
    for s in (0, 1):
        _write(tmp_path, _record("erase5", s, a[s]))
        _write(tmp_path, _record("grpo", s, b[s]))
    res = run_train_study(None, "gym:chain_sum", 3, 2, "", records=tmp_path)
    c = res["comparisons"]["erase5:grpo"]["avg@k"]
    table = [[sum(x) / 2 - sum(y) / 2 for x, y in zip(a[s], b[s])] for s in (0, 1)]
    assert c["seeds"] == [0, 1] and c["difference"] == crossed_bootstrap_mean_ci(table)
    assert res["variants"]["erase5"]["avg"] == pytest.approx(np.mean([[sum(x) / 2 for x in a[s]] for s in (0, 1)]))
    assert res["comparisons"]["erase5:grpo"]["token_ratio"] == 1.0
    # a record without the evaluation asked for, whose run is gone, is an error naming it
    with pytest.raises(ConfigError, match="erase5 seed 0 has no healed evaluation"):
        run_train_study(None, "gym:chain_sum", 3, 2, "", test_time_heal=True, records=tmp_path)
    # records of two different held-out sets are never paired
    _write(tmp_path, _record("grpo", 1, b[1], digest="other"))
    with pytest.raises(ConfigError, match="2 different held-out sets"):
        run_train_study(None, "gym:chain_sum", 3, 2, "", records=tmp_path)
    with pytest.raises(ConfigError, match="no finished run .* and no record"):
        run_train_study(None, "gym:chain_sum", 3, 2, "", records=tmp_path / "empty")


def test_healing_at_equal_tokens_gives_plain_sampling_the_healed_samples_token_cost():
    """k = 4 per mode. Healed Pass@1 of 2/4 right is 0.5; plain with 1/4 right at 1.5 samples'
    tokens is halfway between Pass@1 = 0.25 and Pass@2 = 1 - C(3,2)/C(4,2) = 0.5, so 0.375."""
    assert pass_gap_at_equal_tokens([2], [1], k=4, m=1, ratio=1.5) == pytest.approx([0.125])
    # Pass@3 healed (3/4 right: 1.0) vs plain 3.3 samples of 1/4 right: 0.7 * 0.75 + 0.3 * 1.0
    assert pass_gap_at_equal_tokens([3], [1], k=4, m=3, ratio=1.1) == pytest.approx([1.0 - 0.825])
    # a healed answer shorter than a plain one: plain gets 0.8 of a sample (0.8 x Pass@1)
    assert pass_gap_at_equal_tokens([1], [2], k=4, m=1, ratio=0.8) == pytest.approx([0.25 - 0.8 * 0.5])
    with pytest.raises(ValueError, match="must lie in"):
        pass_gap_at_equal_tokens([3], [1], k=4, m=3, ratio=1.5)  # 4.5 plain samples: not in k = 4
    assert healed_samples_to_compare([1.12, 1.05], 4) == [1, 3]
    assert healed_samples_to_compare([0.9], 4) == [1, 4]  # healing cheaper: plain gets fewer than 4
    assert healed_samples_to_compare([1.3], 4) == [1, 3] and healed_samples_to_compare([2.5], 4) == [1]


def test_test_time_healing_pairs_are_also_compared_at_equal_generated_tokens(tmp_path):
    plain = {0: [[True, False], [False, False], [False, False]], 1: [[False, False], [True, False], [False, False]]}
    healed = {0: [[True, True], [True, False], [False, False]], 1: [[True, False], [True, False], [False, True]]}
    for s in (0, 1):
        rec = _record("grpo", s, plain[s])
        rec["evals"]["healed"] = {**rec["evals"]["plain"], "correct": encode_correct(healed[s]),
                                  "tokens_per_sample": 9.0 * (1.5 if s == 0 else 1.0)}
        _write(tmp_path, rec)
    res = run_train_study(None, "gym:chain_sum", 3, 2, "grpo+heal:grpo", test_time_heal=True, records=tmp_path)
    eq = res["comparisons"]["grpo+heal:grpo"]["equal_tokens"]
    assert eq["token_ratio"] == {"0": 1.5, "1": 1.0}
    assert set(eq) == {"token_ratio", "pass@1"}  # 2 // 1.5 = 1: only one healed sample fits
    # seed 0: healed Pass@1 (1, .5, 0) vs plain at 1.5 samples of k = 2 (.5 -> .75, 0, 0); seed 1: at 1 sample
    gaps = {0: [1.0 - 0.75, 0.5 - 0.0, 0.0], 1: [0.5 - 0.0, 0.5 - 0.5, 0.5 - 0.0]}
    assert eq["pass@1"]["per_seed"] == pytest.approx([np.mean(gaps[0]), np.mean(gaps[1])])
    assert eq["pass@1"]["difference"] == crossed_bootstrap_mean_ci([gaps[0], gaps[1]])


def test_a_policy_sampled_at_another_temperature_is_its_own_analysis_variant(tmp_path):
    assert [mode_name(h, t) for t in (None, 0.7) for h in (False, True)] == [
        "plain", "healed", "plain@T0.7", "healed@T0.7"]
    assert [mode_suffix(m) for m in ("plain", "healed", "plain@T0.7", "healed@T0.7")] == [
        "", "+heal", "@T0.7", "@T0.7+heal"]
    assert mode_temperature("healed@T0.5") == 0.5 and mode_temperature("plain") is None
    assert policy_of("grpo@T0.7+heal") == policy_of("grpo+heal") == policy_of("grpo") == "grpo"
    plain = {0: [[True, False], [False, False], [False, False]], 1: [[False, False], [True, False], [False, False]]}
    cold = {0: [[True, True], [False, False], [True, False]], 1: [[True, True], [True, False], [False, False]]}
    for s in (0, 1, 2):
        rec = _record("grpo", s, plain[s % 2])
        if s < 2:  # seed 2 has no evaluation at T = 0.7 (its run is gone): --seeds leaves it out
            rec["evals"]["plain@T0.7"] = {**rec["evals"]["plain"], "correct": encode_correct(cold[s]),
                                          "tokens_per_sample": 4.5}
        _write(tmp_path, rec)
    with pytest.raises(ConfigError, match="grpo seed 2 has no plain@T0.7 evaluation"):
        run_train_study(None, "gym:chain_sum", 3, 2, "grpo@T0.7:grpo", records=tmp_path, temperature=0.7)
    res = run_train_study(None, "gym:chain_sum", 3, 2, "grpo@T0.7:grpo", records=tmp_path, temperature=0.7,
                          seeds=[0, 1])
    c = res["comparisons"]["grpo@T0.7:grpo"]
    assert c["avg@k"]["seeds"] == [0, 1] and res["variants"]["grpo@T0.7"]["label"].endswith("sampled at T = 0.7")
    assert c["avg@k"]["per_seed"] == pytest.approx([(1.0 + 0.5 - 0.5) / 3, (1.0 - 0.0 + 0.0) / 3])
    # the colder samples are half as long: a's 1 sample costs b's half sample (0.5 x Pass@1)
    assert c["equal_tokens"]["token_ratio"] == {"0": 0.5, "1": 0.5}
    assert set(c["equal_tokens"]) == {"token_ratio", "pass@1", "pass@2"}  # k = 2 fits 2 x 0.5 plain samples
    assert c["equal_tokens"]["pass@1"]["per_seed"][0] == pytest.approx(
        np.mean([1.0 - 0.5 * 0.5, 0.0 - 0.0, 0.5 - 0.0]))


def test_a_pair_of_gaps_compares_what_a_method_gains_under_two_conditions(tmp_path):
    """`a-b:c-d` is the per-(seed, problem) difference of differences, paired like any pair, on
    the seeds all four variants finished; its entropy slope is the difference of the two gaps'."""
    rng = np.random.default_rng(3)
    cells = {v: {s: (rng.random((3, 2)) < 0.5).tolist() for s in range(3)}
             for v in ("grpo", "erase5", "grpo_bf16", "erase5_bf16")}
    slopes = {"grpo": -0.1, "erase5": -0.3, "grpo_bf16": -0.05, "erase5_bf16": -0.1}
    for v, by_seed in cells.items():
        for s, rows in by_seed.items():
            if v == "erase5_bf16" and s == 2:
                continue  # its run did not finish: the seed drops out of the gap
            rec = _record(v, s, rows)
            rec["trends"]["entropy_slope"] = slopes[v] * (1 + s)
            _write(tmp_path, rec)
    res = run_train_study(None, "gym:chain_sum", 3, 2, "erase5_bf16-grpo_bf16:erase5-grpo", records=tmp_path)
    c = res["comparisons"]["erase5_bf16-grpo_bf16:erase5-grpo"]
    avg = {v: {s: [sum(r) / 2 for r in rows] for s, rows in by_seed.items()} for v, by_seed in cells.items()}
    table = [[(w - x) - (y - z) for w, x, y, z in zip(avg["erase5_bf16"][s], avg["grpo_bf16"][s],
                                                      avg["erase5"][s], avg["grpo"][s])] for s in (0, 1)]
    assert c["avg@k"]["seeds"] == [0, 1] and c["avg@k"]["difference"] == crossed_bootstrap_mean_ci(table)
    assert c["avg@k"]["per_seed"] == pytest.approx([np.mean(row) for row in table])
    assert c["entropy_slope"]["per_seed"] == pytest.approx([(-0.1 + 0.05) - (-0.3 + 0.1) * 1,
                                                            ((-0.1 + 0.05) - (-0.3 + 0.1)) * 2])
    assert c["token_ratio"] is None and "equal_tokens" not in c
    with pytest.raises(ConfigError, match="is not variant:variant \\(or a-b:c-d\\)"):
        parse_pairs("erase5-grpo:erase5", ["grpo", "erase5"])  # a gap against one variant


def test_the_figure_draws_the_variants_the_pairs_compare(tmp_path):
    from e3rl.study_plots import plot_study, plotted_variants

    rows = [[True, False], [False, False], [True, True]]
    for v in ("grpo", "erase5", "erase5_bf16", "grpo_bf16"):
        for s in (0, 1, 2):
            rec = _record(v, s, rows)
            rec["evals"]["healed"] = rec["evals"]["plain"]  # another evaluation the pairs do not ask for
            _write(tmp_path, rec)
    res = run_train_study(None, "gym:chain_sum", 3, 2, "erase5_bf16-grpo_bf16:erase5-grpo", test_time_heal=True,
                          records=tmp_path, seeds=[0, 1])
    assert "grpo+heal" in res["variants"]
    assert plotted_variants(res) == ["grpo", "grpo_bf16", "erase5", "erase5_bf16"]
    assert plot_study(res, tmp_path / "f.png").stat().st_size > 0

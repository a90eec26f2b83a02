"""Scoring in the generator actor: the configured reward through the Scorer's worker processes,
`correct` (full credit) kept apart from the shaped training reward, and the reward stats.

Tests of new API import it inside the test, so on older code they fail by their assertions."""
import pytest
import torch

from actors.rollout_stats import merge_stats
from e3rl.config import load_config
from e3rl.core.passk import benchmark_metrics
from e3rl.core.trajectory import (SegmentTable, Trajectory, from_ipc_bytes, from_record_batch, to_ipc_bytes,
                                  to_record_batch)
from e3rl.tasks.base import Problem
from e3rl.tasks.gym import load_gym


def _traj(text: str) -> Trajectory:
    z = torch.zeros(0, dtype=torch.long)
    return Trajectory(z, z, torch.zeros(0), torch.zeros(0), z, z, SegmentTable.empty(), response_text=text)


def test_auto_reward_uses_gym_scorer_and_math_verify_and_fills_correct():
    from actors.generator_actor import score
    from e3rl.rewards import Scorer

    gym, _ = load_gym("chain_sum", 1, seed=0)
    math = Problem("m", "half?", "\\frac{1}{2}", "test")
    trajs = [_traj(f"so \\boxed{{{gym[0].answer}}}"), _traj("\\boxed{7}"), _traj("\\boxed{0.5}"), _traj("no")]
    with Scorer(load_config(None, ["reward.thinking=none"]).reward) as scorer:
        stats = score(trajs, [gym[0], math], 2, scorer, max_len=32)
    assert [t.reward for t in trajs] == [1.0, 0.0, 1.0, 0.0]
    assert [t.correct for t in trajs] == [True, False, True, False]
    assert stats == {"reward/accuracy": 0.5, "reward/timeouts": 0.0, "reward/errors": 0.0}


@pytest.mark.parametrize("w", [0.5, 1.0])
def test_format_bonus_never_makes_a_wrong_answer_correct(w):
    if w < 1:  # a wrong boxed answer's training reward is w: eval metrics must not count it
        assert benchmark_metrics([[w, 0.0]], ks=[1, 2])["pass@2"] == 0.0

    from e3rl.rewards import Score, score_response

    cfg = load_config(None, ["reward.fn=math_verify", f"reward.format_weight={w}", "reward.thinking=none"]).reward
    p = Problem("m", "q", "3", "test")
    wrong, right = score_response(cfg, "\\boxed{4}", p), score_response(cfg, "\\boxed{3}", p)
    assert wrong == Score(w, False) and right == Score(1.0 + w, True)
    # what evaluation counts (`float(t.correct)`), at k = 1 and 2 samples
    m = benchmark_metrics([[float(wrong.correct), float(wrong.correct)]], ks=[1, 2])
    assert m["pass@1"] == m["pass@2"] == m["avg@2"] == 0.0
    assert benchmark_metrics([[float(right.correct), float(wrong.correct)]], ks=[1])["avg@2"] == 0.5


def test_partial_credit_is_shaping_only():
    from e3rl.rewards import Score, score_response

    problems, _ = load_gym("chain_sum", 40, seed=0)
    p = next(q for q in problems if q.answer.isdigit() and q.answer != "0")  # chain_sum gives `-gold` 0.5
    off = load_config(None, ["reward.thinking=none"]).reward
    on = load_config(None, ["reward.partial_weight=0.5", "reward.thinking=none"]).reward
    assert score_response(off, f"\\boxed{{-{p.answer}}}", p) == Score(0.0, False)
    assert score_response(on, f"\\boxed{{-{p.answer}}}", p) == Score(0.25, False)
    assert score_response(on, f"\\boxed{{{p.answer}}}", p) == Score(1.0, True)  # full credit: no partial on top


def test_overlong_punishment_counts_kept_tokens_and_never_changes_correct():
    from actors.generator_actor import score
    from e3rl.rewards import Scorer

    def long(text: str, kept: int, erased: int) -> Trajectory:
        t = _traj(text)
        t.stream_ids = torch.arange(kept + erased)
        t.erased_at = torch.tensor([erased] * erased + [-1] * kept)  # an erased first attempt, then kept tokens
        return t

    p = Problem("m", "q", "3", "test")
    trajs = [long("\\boxed{3}", kept=13, erased=5), long("\\boxed{4}", kept=16, erased=0),
             long("\\boxed{3}", kept=12, erased=9)]
    cfg = load_config(None, ["reward.fn=math_verify", "reward.overlong_buffer=4", "gen.max_new_tokens=16",
                             "reward.thinking=none"]).reward
    with Scorer(cfg) as scorer:
        stats = score(trajs, [p], 3, scorer, max_len=16)
    # max_len 16, buffer 4: 13 kept tokens -> -1/4, 16 -> -1, 12 -> 0 (erased tokens do not count)
    assert [t.reward for t in trajs] == pytest.approx([0.75, -1.0, 1.0])
    assert [t.correct for t in trajs] == [True, False, True]
    assert stats["reward/accuracy"] == pytest.approx(2 / 3)
    assert stats["reward/overlong_penalty"] == pytest.approx(-1.25 / 3)


def test_merge_stats_sums_reward_counts_and_weights_accuracy_by_samples():
    part = {"gen/tokens_produced": 10.0, "gen/seconds": 1.0}
    merged = merge_stats([
        part | {"gen/samples": 2.0, "reward/accuracy": 1.0, "reward/timeouts": 1.0, "reward/errors": 0.0},
        part | {"gen/samples": 6.0, "reward/accuracy": 0.5, "reward/timeouts": 2.0, "reward/errors": 1.0}])
    assert merged["reward/timeouts"] == 3.0 and merged["reward/errors"] == 1.0
    assert merged["reward/accuracy"] == pytest.approx((2 * 1.0 + 6 * 0.5) / 8)


def test_merge_rounds_adds_the_seconds_of_consecutive_rounds():
    from actors.rollout_stats import merge_rounds

    a = {"gen/samples": 8.0, "gen/tokens_produced": 100.0, "gen/seconds": 2.0, "gen/peak_kv_bytes": 5.0,
         "reward/accuracy": 0.25, "gen/recovered_shards": 0.0, "gen/tokens_per_s": 50.0}
    b = a | {"gen/seconds": 3.0, "gen/peak_kv_bytes": 7.0, "reward/accuracy": 0.75, "gen/recovered_shards": 1.0}
    m = merge_rounds([a, b])
    assert (m["gen/samples"], m["gen/seconds"], m["gen/peak_kv_bytes"], m["gen/recovered_shards"]) == (16, 5, 7, 1)
    assert m["gen/tokens_per_s"] == pytest.approx(200 / 5) and m["reward/accuracy"] == pytest.approx(0.5)
    assert merge_rounds([a]) == a


def test_correct_survives_the_arrow_codec_and_old_traces_read_as_not_correct():
    t = _traj("\\boxed{3}")
    t.reward, t.correct = 0.5, True
    back = from_ipc_bytes(to_ipc_bytes([t]))[0]
    assert (back.reward, getattr(back, "correct", None)) == (0.5, True)
    old = to_record_batch([t]).drop_columns(["correct"])  # a trace written before the field existed
    assert from_record_batch(old)[0].correct is False


@pytest.mark.parametrize("override, message", [
    ("reward.partial_weight=1.0", "reward.partial_weight: must be in [0, 1)"),
    ("reward.timeout_s=0", "reward.timeout_s: must be > 0"),
    ("reward.workers=0", "reward.workers: must be >= 1"),
])
def test_reward_config_checks(override, message):
    from e3rl.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("[", "\\[").replace(")", "\\)")):
        load_config(None, [override])

"""Rewards: math-verify on boxed answers, format reward, plug-in loading, batched scoring."""
from __future__ import annotations

import threading
import time

import pytest
from math_verify import parse, verify

from e3rl.rewards import (MAX_ANSWER_CHARS, extract_answer, format_reward, load_reward_fn,
                          math_reward, problem_reward, score_batch)
from e3rl.tasks import Problem, load_gym

CASES = [  # (response, gold, expected)
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("so the answer is \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("\\boxed{5 \\text{ cm}}", "5", 1.0),
    ("\\boxed{5}", "5 \\text{ cm}", 1.0),
    ("first \\boxed{3}, on reflection \\boxed{-4}", "-4", 1.0),
    ("first \\boxed{-4}, on reflection \\boxed{3}", "-4", 0.0),
    ("\\boxed{-4}", "-4", 1.0),
    ("\\boxed{4}", "-4", 0.0),
    ("\\boxed{25}", "025", 1.0),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
    ("\\boxed{x = 3}", "3", 1.0),
    ("\\boxed{\\{1, 2\\}}", "\\{1,2\\}", 1.0),
    ("\\boxed{7} and then \\boxed{\\frac{1}{", "7", 1.0),  # truncated last box is ignored
]


@pytest.mark.parametrize("response, gold, expected", CASES)
def test_math_reward_cases(response, gold, expected):
    assert math_reward(response, gold) == expected


def test_no_box_falls_back_to_last_number_unless_box_required():
    assert extract_answer("5 apples and 1,250 pears") == "1250"
    assert extract_answer("half: 1/2") == "1/2"
    assert math_reward("We get 3 then finally -4.", "-4") == 1.0
    assert math_reward("We get -4 then finally 3.", "-4") == 0.0
    assert math_reward("half of it: 1/2", "\\frac{1}{2}") == 1.0
    assert math_reward("We get -4.", "-4", require_box=True) == 0.0
    assert math_reward("no numbers here", "-4") == 0.0
    assert math_reward("\\boxed{}", "-4") == 0.0


def test_oversized_answers_are_bounded():
    start = time.perf_counter()
    assert math_reward("\\boxed{10^{10^{10}}}", "5") == 0.0  # sympy would evaluate this forever
    assert math_reward("\\boxed{9999999!}", "5") == 0.0
    assert math_reward("\\boxed{(x+1)^{10^{10}}}", "x") == 0.0
    assert math_reward("\\boxed{\\binom{100000}{50000}}", "5") == 0.0
    assert math_reward("\\boxed{10^{10^{10}}}", "10^{10^{10}}") == 1.0  # still string-equal
    assert math_reward("\\boxed{" + "1" * (MAX_ANSWER_CHARS + 1) + "}", "1" * 513) == 0.0
    assert time.perf_counter() - start < 5.0


def _in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as e:  # noqa: BLE001 - reported to the test
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    return out


def test_math_reward_works_outside_the_main_thread():
    # The bug this guards against: math-verify's default signal.alarm timeouts fail off-main-thread.
    default = _in_thread(lambda: verify(parse("$\\frac{1}{2}$"), parse("$0.5$")))
    assert "error" in default or default.get("value") is False
    ours = _in_thread(lambda: [math_reward(r, g) for r, g, _ in CASES])
    assert ours.get("value") == [e for _, _, e in CASES], ours


def test_format_reward():
    assert format_reward("reasoning... \\boxed{\\frac{1}{2}}") == 1.0
    assert format_reward("\\boxed{1} or \\boxed{2}") == 0.0
    assert format_reward("the answer is 2") == 0.0
    assert format_reward("\\boxed{ }") == 0.0
    assert format_reward("\\boxed{\\frac{1}{2}") == 0.0


def test_load_reward_fn_and_its_errors():
    assert load_reward_fn("e3rl.rewards:problem_reward") is problem_reward
    with pytest.raises(ValueError) as e:
        load_reward_fn("no_such_pkg_e3rl.mod:fn")
    assert str(e.value) == ("reward function 'no_such_pkg_e3rl.mod:fn': no module named "
                            "'no_such_pkg_e3rl.mod'")
    with pytest.raises(ValueError, match="module 'e3rl.rewards' has no function 'nope'"):
        load_reward_fn("e3rl.rewards:nope")
    with pytest.raises(ValueError, match="expected 'module:function'"):
        load_reward_fn("e3rl.rewards.problem_reward")


def _math(uid: str, answer: str) -> Problem:
    return Problem(uid=uid, prompt="q", answer=answer, source="t")


def test_problem_reward_dispatches_gym_and_math():
    gym, _ = load_gym("basic_arithmetic", size=2, seed=0)
    assert problem_reward(f"\\boxed{{{gym[0].answer}}}", gym[0]) == 1.0
    assert problem_reward("\\boxed{0.5}", _math("m", "\\frac{1}{2}")) == 1.0


def test_score_batch_serial_counts_errors():
    problems = [_math("a", "2"), _math("b", "3"), _math("c", "4")]
    out = score_batch(["\\boxed{2}", "\\boxed{5}", "4"], problems)
    assert out.scores == [1.0, 0.0, 1.0] and out.errors == 0 and out.timed_out == 0

    def flaky(response, problem):
        if problem.uid == "b":
            raise RuntimeError("boom")
        return 1.0

    out = score_batch(["x", "y", "z"], problems, flaky)
    assert out.scores == [1.0, 0.0, 1.0] and out.errors == 1
    with pytest.raises(ValueError, match="2 responses for 3 problems"):
        score_batch(["x", "y"], problems)
    with pytest.raises(ValueError, match="module-level function"):
        score_batch(["x", "y", "z"], problems, flaky, workers=1)


SLOW_MODULE = '''
import time
from e3rl.rewards import problem_reward

def reward(response, problem):
    if response == "hang":
        time.sleep(60)
    return problem_reward(response, problem)
'''


def test_score_batch_in_worker_processes_kills_hung_items(tmp_path, monkeypatch):
    (tmp_path / "e3rl_test_slow_reward.py").write_text(SLOW_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward_fn("e3rl_test_slow_reward:reward")
    problems = [_math("a", "\\frac{1}{2}"), _math("b", "1"), _math("c", "-4"), _math("d", "7")]
    responses = ["\\boxed{0.5}", "hang", "\\boxed{-4}", "\\boxed{8}"]
    start = time.perf_counter()
    out = score_batch(responses, problems, fn, workers=1, timeout_s=1.5)
    assert out.scores == [1.0, 0.0, 1.0, 0.0]
    assert out.timed_out == 1 and out.errors == 0
    assert time.perf_counter() - start < 30

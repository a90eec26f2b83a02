"""Rewards: math-verify on boxed answers, full credit only for gym tasks, format reward, plug-in
loading, and the Scorer's worker processes with a hard per-response time limit.

Tests of new API import it inside the test, so on older code they fail by their assertions."""
from __future__ import annotations

import threading
import time
from decimal import Decimal

import psutil
import pytest
from math_verify import parse, verify

from e3rl.config import RewardConfig
from e3rl.rewards import (MAX_ANSWER_CHARS, extract_answer, format_reward, load_reward_fn,
                          math_reward, problem_reward)
from e3rl.tasks import GYM_INSTRUCTION, Problem, last_boxed, load_gym
from tests.workloads.processes import reward_workers

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


def test_last_number_fallback_is_an_opt_in():
    assert extract_answer("5 apples and 1,250 pears", require_box=False) == "1250"
    assert extract_answer("half: 1/2", require_box=False) == "1/2"
    assert math_reward("We get 3 then finally -4.", "-4", require_box=False) == 1.0
    assert math_reward("We get -4 then finally 3.", "-4", require_box=False) == 0.0
    assert math_reward("half of it: 1/2", "\\frac{1}{2}", require_box=False) == 1.0
    assert math_reward("We get -4.", "-4") == 0.0  # the default: a committed (boxed) answer only
    assert math_reward("no numbers here", "-4", require_box=False) == 0.0
    assert math_reward("\\boxed{}", "-4", require_box=False) == 0.0


CUT_MID_THOUGHT = "Solving, we have x = 2 and next we should check whether the"
OFF = RewardConfig(thinking="none")
THINKS = RewardConfig(thinking="required")


def test_a_response_cut_mid_thought_commits_to_nothing():
    """It once scored 1.0 against gold 2 by its last number, in training rewards and in evaluation."""
    from e3rl.rewards import score_response

    assert score_response(OFF, CUT_MID_THOUGHT, _math("x", "2")).correct is False
    assert score_response(OFF, CUT_MID_THOUGHT + " \\boxed{2}", _math("x", "2")).correct is True
    gym = load_gym("chain_sum", size=1, seed=0)[0][0]
    assert score_response(OFF, f"so it is {gym.answer}", gym).correct is False  # gym tasks too
    assert score_response(OFF, f"<answer>{gym.answer}</answer>", gym).correct is True  # gym's own commitment
    opt_in = RewardConfig(thinking="none", require_box=False)
    assert score_response(opt_in, CUT_MID_THOUGHT, _math("x", "2")).correct is True
    assert score_response(opt_in, f"so it is {gym.answer}", gym).correct is True


def test_a_thinking_model_is_scored_only_after_it_stops_thinking():
    from e3rl.rewards import score_response

    gold = _math("t", "2")
    drafted = "<think>\nmaybe \\boxed{2}, let me check"
    assert score_response(THINKS, drafted + "\n</think>\n\nThe answer is 2.", gold).correct is False
    assert score_response(THINKS, drafted, gold).correct is False  # cut by the length limit while thinking
    assert score_response(THINKS, drafted + "</think>\nSo \\boxed{2}.", gold).correct is True
    # cut after thinking: only a box it completed there counts
    assert score_response(THINKS, drafted + "</think>\n\\boxed{2} or rather \\boxed{3", gold).correct is True
    assert score_response(THINKS, "<think>\\boxed{2}</think>\n\\boxed{3", gold).correct is False
    shaped = RewardConfig(thinking="required", format_weight=0.5)
    assert score_response(shaped, drafted, gold).reward == 0.0  # a draft box earns no format reward either
    with pytest.raises(ValueError, match="reward.thinking"):
        score_response(RewardConfig(), "\\boxed{2}", gold)  # unresolved: refused, never guessed


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


# ------------------------------------------------------------------ gym: full credit only
GYM_TASKS = ["chain_sum", "basic_arithmetic", "products", "gsm_symbolic"]
EXAMPLE = last_boxed(GYM_INSTRUCTION)  # the answer the gym instruction shows: -4


def _near_misses(gold: str) -> list[str]:
    """Wrong answers holding the gold string, which gym scorers give partial (or, for
    gsm_symbolic's first-number match, full) credit: sign-flipped, digit-prefixed (`1-4` for -4),
    digit-suffixed, spaced, and the instruction's example."""
    out = [f"1{gold}", f"{gold}1", f"{gold} 1"]
    if Decimal(gold) != 0:
        out.append(gold[1:] if gold.startswith("-") else f"-{gold}")
    if Decimal(gold) != Decimal(EXAMPLE):
        out.append(EXAMPLE)
    return out


@pytest.mark.parametrize("task", GYM_TASKS)
def test_gym_near_misses_score_zero_and_equal_numbers_are_correct(task):
    problems, _ = load_gym(task, size=12, seed=1)
    assert len(problems) == 12 and all(Decimal(p.answer) == int(p.answer) for p in problems)
    for p in problems:
        for wrong in _near_misses(p.answer):
            assert problem_reward(f"so \\boxed{{{wrong}}}", p) == 0.0, (task, p.answer, wrong)
        for right in (p.answer, f" {p.answer} ", f"{p.answer}.0", f"\\boxed{{{p.answer}}}"):
            assert problem_reward(right, p, require_box=False) == 1.0, (task, p.answer, right)
        assert problem_reward(f" {p.answer} ", p) == 0.0  # the default: only a committed answer

    from e3rl.rewards import Score, score_response

    for p in problems:
        for wrong in _near_misses(p.answer):
            assert score_response(OFF, f"\\boxed{{{wrong}}}", p) == Score(0.0, False), (task, wrong)
        assert score_response(OFF, f"\\boxed{{{p.answer}.0}}", p) == Score(1.0, True)


def test_constant_instruction_example_scores_exactly_its_base_rate():
    problems, _ = load_gym("chain_sum", size=300, seed=0, min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    base_rate = sum(Decimal(p.answer) == Decimal(EXAMPLE) for p in problems) / len(problems)
    assert 0 < base_rate < 0.1  # the example is a real gold answer here, and a rare one
    rewards = [problem_reward(f"The answer is \\boxed{{{EXAMPLE}}}", p) for p in problems]
    assert sum(rewards) / len(rewards) == base_rate

    from e3rl.rewards import score_response

    scores = [score_response(OFF, f"\\boxed{{{EXAMPLE}}}", p) for p in problems]
    assert sum(s.reward for s in scores) / len(scores) == base_rate
    assert sum(s.correct for s in scores) / len(scores) == base_rate


# ------------------------------------------------------------------ Scorer: bounded time, killed workers
SLOW = "\\boxed{(x+1)^{9999}}"  # just under MAX_SYMBOLIC_EXP, so sympy expands it (> 20 s)


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    return sum(p.cpu_times().user + p.cpu_times().system for p in procs)


def test_scorer_kills_slow_answers_within_the_time_limit_and_scores_the_rest():
    from e3rl.rewards import Scorer

    cfg = RewardConfig(fn="auto", timeout_s=1.5, workers=2, thinking="none")
    problems = [_math("slow1", "5"), _math("half", "\\frac{1}{2}"), _math("slow2", "5"), _math("wrong", "7"),
                _math("neg", "-4")]
    responses = [SLOW, "\\boxed{0.5}", SLOW.replace("9999", "9998"), "\\boxed{8}", "\\boxed{-4}"]
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(w.pid for w in reward_workers())
            time.sleep(0.05)

    with Scorer(cfg) as scorer:
        assert scorer.score(["\\boxed{2}"], [_math("warm", "2")])[0].correct  # workers up
        watcher = threading.Thread(target=watch)
        watcher.start()
        start = time.perf_counter()
        scores = scorer.score(responses, problems)
        elapsed = time.perf_counter() - start
        done.set()
        watcher.join()

        assert [s.timed_out for s in scores] == [True, False, True, False, False]
        assert [(s.reward, s.correct) for s in scores] == [(0.0, False), (1.0, True), (0.0, False), (0.0, False),
                                                           (1.0, True)]
        assert not any(s.error for s in scores)
        assert elapsed < cfg.timeout_s + 5.0, elapsed  # both slow ones ran side by side and were cut
        deadline = time.monotonic() + 5.0
        while len(alive := reward_workers()) != cfg.workers and time.monotonic() < deadline:
            # the pool starts the last replacement just after the batch returns, and a killed worker
            # may take a moment to exit (seen in CI: 3 alive, a killed one still listed)
            time.sleep(0.05)
        seen.update(w.pid for w in alive)
        # each timeout killed its worker and started a fresh one: 2 originals + 2 replacements
        assert len(alive) == cfg.workers and len(seen) == cfg.workers + 2
        gone = seen - {w.pid for w in alive}
        assert len(gone) == 2 and not any(psutil.pid_exists(pid) and psutil.Process(pid).status() !=
                                          psutil.STATUS_ZOMBIE for pid in gone)
        before = _cpu_seconds(alive)
        time.sleep(0.5)
        assert _cpu_seconds(alive) - before < 0.1  # nothing is still computing a timed-out answer
        assert scorer.score(["\\boxed{5}"], [_math("again", "5")])[0].correct  # reused after timeouts
    assert reward_workers() == []  # close() leaves no scoring process


HANG_MODULE = """
import os, time
from e3rl.rewards import problem_reward

def reward(response, problem):
    if response == "hang":
        with open(problem.prompt, "w") as f:  # the test reads which process ran it
            f.write(str(os.getpid()))
        time.sleep(60)
    if response == "boom":
        raise RuntimeError("boom")
    if response == "nan":
        return float("nan")
    return problem_reward(response, problem)
"""


def test_scorer_user_reward_hang_kills_that_process_and_errors_are_counted(tmp_path, monkeypatch):
    from e3rl.rewards import Scorer

    (tmp_path / "e3rl_test_hang_reward.py").write_text(HANG_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))  # workers take this process's sys.path when they start
    pid_file = tmp_path / "hung.pid"
    problems = [_math("a", "\\frac{1}{2}"), Problem("b", str(pid_file), "1", "t"), _math("c", "-4"), _math("d", "7"),
                _math("e", "7"), _math("f", "7")]
    responses = ["\\boxed{0.5}", "hang", "\\boxed{-4}", "\\boxed{8}", "boom", "nan"]
    with Scorer(RewardConfig(fn="e3rl_test_hang_reward:reward", timeout_s=1.5, thinking="none")) as scorer:
        start = time.perf_counter()
        scores = scorer.score(responses, problems)
        assert time.perf_counter() - start < 30
        assert [(s.reward, s.correct) for s in scores] == [(1.0, True), (0.0, False), (1.0, True)] + [(0.0, False)] * 3
        assert [s.timed_out for s in scores] == [False, True, False, False, False, False]
        assert [s.error for s in scores] == [False] * 4 + [True, True]
        hung = int(pid_file.read_text())
        assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == psutil.STATUS_ZOMBIE
        with pytest.raises(ValueError, match="2 responses for 6 problems"):
            scorer.score(responses[:2], problems)


# ------------------------------------------------------------------ reward.thinking: auto
QWEN3_LIKE = ("{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
              "{%- if add_generation_prompt %}<|im_start|>assistant\n"
              "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
              "{%- endif %}")  # Qwen3's thinking switch, reduced to what decides where an answer starts


@pytest.mark.parametrize("template, kwargs, want", [
    (QWEN3_LIKE, "{}", "required"),  # thinking on: the model opens and closes its own block
    (QWEN3_LIKE, "{enable_thinking: true}", "required"),
    (QWEN3_LIKE, "{enable_thinking: false}", "none"),  # the prompt closes an empty thinking block
    (None, "{enable_thinking: true}", "none"),  # a template without thinking (SmolLM2's own)
])
def test_reward_thinking_auto_follows_the_rendered_chat_template(tokenizer, template, kwargs, want):
    import copy

    from e3rl.config import load_config
    from e3rl.data import resolve_reward_thinking

    tok = copy.deepcopy(tokenizer)
    if template is not None:
        tok.chat_template = template
    cfg = load_config(None, [f"data.chat_template_kwargs={kwargs}"])
    assert cfg.reward.thinking == "auto"
    resolved = resolve_reward_thinking(cfg, tok)
    assert resolved.reward.thinking == want
    assert resolve_reward_thinking(resolved, None) is resolved  # concrete values are kept as they are

"""Rewards: math-verify on the last boxed answer (default), the task's own verifier for
reasoning-gym, a format reward, user plug-ins, and `Scorer`, which scores in worker processes
with a hard per-response time limit.

Only a committed answer counts: the last complete `\\boxed{}` (`reward.require_box`, on by
default; the last-number fallback is an opt-in for small models that ignore the format), and,
for a model that thinks (`reward.thinking`), only in the text after its closing `</think>`: a box
written while thinking is a draft, and a response cut off before it stopped thinking scores 0.
This is what published, box-based accuracies count.

A response is *correct* only with full credit from its verifier; the training reward is 1/0 for
that, plus optional shaping (`reward.format_weight`, `reward.partial_weight`) that is never
counted as correct, so evaluation (`Trajectory.correct`) cannot be inflated by shaping.

math-verify's own timeouts use `signal.alarm`, which only works in a process's main thread; inside
Ray workers or threads they raise or make every answer score 0. We switch them off
(`parsing_timeout=None`, `timeout_seconds=None`) and bound time ourselves:
  1. only the last box is parsed, and a box longer than `MAX_ANSWER_CHARS` scores 0;
  2. numbers too large to evaluate (e.g. `10^{10^{10}}`, which sympy would try to expand forever,
     or `\\binom{100000}{50000}`, which parsing evaluates) are compared as strings instead of
     symbolically (`MAX_LOG2`, `MAX_SYMBOLIC_EXP`, `_BIG_BINOM`);
  3. `Scorer` runs scoring in worker processes and kills the process of any response that runs
     past `reward.timeout_s` (a hard bound: the step goes on, the response scores 0, counted).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import importlib
import logging
import math
import multiprocessing as mp
import re
import signal
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Sequence

import sympy
from math_verify import parse, verify
from pebble import ProcessPool

from e3rl.tasks.base import Problem, count_boxed, extract_answer, last_boxed
from e3rl.tasks.gym import gym_verdict, is_gym, score_gym

if TYPE_CHECKING:
    from e3rl.config import RewardConfig

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, Problem], float]
"""A reward function: (response text, problem) -> score (usually 0 or 1)."""

MAX_ANSWER_CHARS = 512
MAX_LOG2 = float(1 << 22)  # numbers above ~1.26M digits are compared as strings
MAX_SYMBOLIC_EXP = 10_000  # x^{n} with larger n is compared as a string (expansion blows up)

_BIG_BINOM = re.compile(r"binom\s*\{?\s*\d{5,}")  # parse() evaluates binomials eagerly


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its timeout is off; that is deliberate here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def _log2_abs(node: Any) -> float:
    """Rough upper estimate of log2|value| for numeric sympy trees; 0 for symbols."""
    if node.is_Integer:
        return math.log2(abs(int(node))) if node != 0 else 0.0
    if node.is_Rational:
        return max(_log2_abs(sympy.Integer(node.p)), _log2_abs(sympy.Integer(node.q)))
    if node.is_Float:
        return math.log2(abs(float(node))) if node != 0 else 0.0
    if isinstance(node, sympy.Pow):
        base, exp = _log2_abs(node.base), _log2_abs(node.exp)
        return base * 2.0 ** min(exp, 1024.0) if base > 0 else 0.0
    if isinstance(node, sympy.factorial):
        n = 2.0 ** min(_log2_abs(node.args[0]), 1024.0)
        return n * math.log2(n) if n > 1 else 0.0
    return sum(_log2_abs(a) for a in node.args) if node.args else 0.0


def _too_big(expr: Any) -> bool:
    """True when sympy could spend unbounded time evaluating or expanding `expr`."""
    if not isinstance(expr, sympy.Basic):
        return False
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Pow) and node.exp.is_Number and not node.base.is_Number:
            if abs(float(node.exp)) > MAX_SYMBOLIC_EXP:
                return True
    return _log2_abs(expr) > MAX_LOG2


@lru_cache(maxsize=8192)
def _parse_boxed(content: str) -> tuple[Any, ...]:
    """math-verify's parse of one answer string, cached: the G samples of a prompt share a gold."""
    return tuple(parse(f"\\boxed{{{content}}}", parsing_timeout=None))


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def math_reward(response: str, gold: str, *, require_box: bool = True) -> float:
    """1.0 if the response's final answer equals the gold answer mathematically, else 0.0.

    Gold goes first to `verify` (it is not symmetric). Answers that do not parse, or are too big
    to evaluate safely, are compared as whitespace-free strings.
    """
    answer = extract_answer(response, require_box)
    if not answer or len(answer) > MAX_ANSWER_CHARS or not gold.strip():
        return 0.0
    if _BIG_BINOM.search(answer) or _BIG_BINOM.search(gold):
        return float(_squash(answer) == _squash(gold))
    gold_parsed, answer_parsed = _parse_boxed(gold.strip()), _parse_boxed(answer)
    symbolic = [x for x in (*gold_parsed, *answer_parsed) if isinstance(x, sympy.Basic)]
    if not gold_parsed or not answer_parsed or any(_too_big(x) for x in symbolic):
        return float(_squash(answer) == _squash(gold))
    return float(verify(list(gold_parsed), list(answer_parsed), timeout_seconds=None))


def format_reward(response: str) -> float:
    """1.0 if the response states exactly one final answer: one complete, non-empty box."""
    return float(count_boxed(response) == 1 and bool(last_boxed(response)))


THINK_END = "</think>"


def committed_text(response: str, thinking: bool) -> str | None:
    """The part of a response a verdict reads: all of it, or for a model that thinks, the text after
    its last `</think>` (None when it never closed its thinking: it committed to nothing)."""
    if not thinking:
        return response
    _, end, after = response.rpartition(THINK_END)
    return after if end else None


def problem_reward(response: str, problem: Problem, require_box: bool = True) -> float:
    """The default correctness, 1.0 or 0.0: full credit from the task's own scorer for
    reasoning-gym problems (`gym_verdict`), math-verify otherwise."""
    if is_gym(problem):
        return score_gym(problem, response, require_box)
    return math_reward(response, problem.answer, require_box=require_box)


def load_reward_fn(spec: str) -> RewardFn:
    """Import a user reward `(response, problem) -> float` named as "package.module:function"."""
    module_name, sep, fn_name = spec.partition(":")
    if not sep or not module_name or not fn_name:
        raise ValueError(f"reward function {spec!r}: expected 'module:function', "
                         "e.g. 'e3rl.rewards:problem_reward'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ValueError(f"reward function {spec!r}: no module named {module_name!r}") from None
        raise ValueError(f"reward function {spec!r}: importing {module_name!r} failed: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: module {module_name!r} has no function "
                         f"{fn_name!r}")
    return fn


def check_reward_fn(spec: str) -> None:
    """Import a user reward in the driver, so a bad `reward.fn` is one line before any actor starts."""
    from e3rl.config import ConfigError

    if spec in ("auto", "math_verify"):
        return
    try:
        load_reward_fn(spec)
    except ValueError as e:
        raise ConfigError(f"reward.fn: {e} — use auto, math_verify, or an importable 'package.module:function'") from None



@dataclass(frozen=True)
class Score:
    """One response's verdict. `correct` is full credit from its verifier and never depends on
    shaping; `reward` (what the learner trains on) is correctness plus the configured shaping.
    A response that timed out or whose reward raised scores 0 and is flagged, never hidden."""

    reward: float
    correct: bool
    timed_out: bool = False
    error: bool = False
    verdict: bool | None = None
    """A rehearsal's real verdict, when `correct` is its stand-in coin (`reward.rehearsal`)."""


def score_response(cfg: RewardConfig, response: str, problem: Problem) -> Score:
    """Score one response under `cfg` (a `RewardConfig`); module-level so worker processes run it.

    Correct: full credit from the gym task's scorer, a math-verify match, or a user reward >= 1.0.
    The base reward is 1/0 for the built-ins and the user reward's own value (it may be graded).
    The built-ins and the format reward read only the committed text (`committed_text`; a user
    reward gets the whole response). Shaping adds `format_weight * format_reward` and, for gym
    tasks, `partial_weight *` the scorer's credit of a wrong answer (below 1).
    """
    if cfg.thinking == "auto":
        raise ValueError("reward.thinking is 'auto': the driver resolves it from the chat template "
                         "(e3rl.data.resolve_reward_thinking) before scoring")
    partial = 0.0
    text = committed_text(response, cfg.thinking == "required")
    if cfg.fn not in ("auto", "math_verify"):
        base = float(_user_reward_fn(cfg.fn)(response, problem))
        correct = base >= 1.0
    elif text is None:
        base, correct = 0.0, False
    elif cfg.fn == "auto" and is_gym(problem):
        correct, credit = gym_verdict(problem, text, cfg.require_box)
        base, partial = float(correct), (0.0 if correct or credit >= 1.0 else credit)
    else:
        base = math_reward(text, problem.answer, require_box=cfg.require_box)
        correct = base == 1.0
    shaped = format_reward(text) if text is not None else 0.0
    shaping = cfg.format_weight * shaped + cfg.partial_weight * partial
    if cfg.rehearsal:  # the coin stands in for the verifier everywhere; the real verdict is kept for the log
        coin = rehearsal_coin(response, problem)
        return Score(coin + shaping, coin >= 1.0, verdict=correct)
    reward = base + shaping
    if not math.isfinite(reward):
        raise ValueError(f"reward {reward} for problem {problem.uid} is not finite")
    return Score(reward, correct)


def rehearsal_coin(response: str, problem: Problem) -> float:
    """A rehearsal's stand-in verdict: 1 or 0 from a hash of the problem and the response, so it is
    reproducible and varies within a group (`reward.rehearsal`)."""
    digest = hashlib.blake2b(f"e3rl-rehearsal:{problem.uid}:{response}".encode(), digest_size=1).digest()
    return float(digest[0] & 1)


@lru_cache(maxsize=None)
def _user_reward_fn(spec: str) -> RewardFn:
    return load_reward_fn(spec)


def score_stats(scores: Sequence[Score]) -> dict[str, float]:
    """`reward/accuracy` (fraction correct), the `reward/timeouts` / `reward/errors` counts, and in a
    rehearsal `reward/verified_accuracy` (the real verifier's)."""
    n = max(len(scores), 1)
    out = {"reward/accuracy": sum(s.correct for s in scores) / n,
           "reward/timeouts": float(sum(s.timed_out for s in scores)),
           "reward/errors": float(sum(s.error for s in scores))}
    if any(s.verdict is not None for s in scores):  # a rehearsal: its accuracy is the coin's, this the verifier's
        out["reward/verified_accuracy"] = sum(bool(s.verdict) for s in scores) / n
    return out


def _worker_init() -> None:
    """Let SIGTERM end a reward worker at once. pebble's own handler is Python code, which cannot
    run while sympy sits in one long C call: the kill would wait for pebble's SIGKILL fallback."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _mp_context() -> Any:
    """forkserver: workers fork from a clean process with sympy/math-verify already imported,
    not from a Ray actor holding threads and GPU state."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["e3rl.rewards"])
    return ctx


class Scorer:
    """Scores responses in `cfg.workers` worker processes, each response under a hard
    `cfg.timeout_s` limit: past it, the process running it is killed (and replaced) and the
    response scores 0, flagged `timed_out`. Build one per generator actor and reuse it, so the
    workers keep their caches (parsed golds, gym datasets) across steps; `close()` ends them."""

    def __init__(self, cfg: RewardConfig):
        if cfg.thinking == "auto":  # refused here, once, rather than as every response's scoring error
            raise ValueError("Scorer: reward.thinking is 'auto' — resolve it from the chat template first "
                             "(e3rl.data.resolve_reward_thinking)")
        self.cfg = cfg
        self._pool: Any = None

    def score(self, responses: Sequence[str], problems: Sequence[Problem]) -> list[Score]:
        """Scores in input order: `responses[i]` against `problems[i]`."""
        if len(responses) != len(problems):
            raise ValueError(f"Scorer.score: {len(responses)} responses for {len(problems)} problems")
        if self._pool is not None and not self._pool.active:
            self.close()  # broken (e.g. its workers died): start afresh
        if self._pool is None:
            self._pool = ProcessPool(self.cfg.workers, initializer=_worker_init, context=_mp_context())
        futures = [self._pool.schedule(score_response, (self.cfg, r, p), timeout=self.cfg.timeout_s)
                   for r, p in zip(responses, problems)]
        # pebble enforces the limit; this backstop only guards against a wedged pool
        rounds = -(-len(futures) // self.cfg.workers)
        concurrent.futures.wait(futures, timeout=rounds * (self.cfg.timeout_s + 5.0) + 30.0)
        scores = [self._result(f, p) for f, p in zip(futures, problems)]
        if not all(f.done() for f in futures):
            self.close()
        return scores

    def _result(self, future: Any, problem: Problem) -> Score:
        if not future.done():
            logger.warning("reward for %s never finished; restarting the reward workers", problem.uid)
            return Score(0.0, False, timed_out=True)
        try:
            return future.result()
        except concurrent.futures.TimeoutError:
            logger.warning("reward timed out after %.1fs on %s; its worker was killed", self.cfg.timeout_s,
                           problem.uid)
            return Score(0.0, False, timed_out=True)
        except Exception as e:  # a broken answer or reward fn scores 0 and is counted, never crashes a run
            logger.warning("reward failed on %s: %s: %s", problem.uid, type(e).__name__, e)
            return Score(0.0, False, error=True)

    def close(self) -> None:
        """Stop the worker processes (a later `score` starts new ones)."""
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

"""Rewards: math-verify on the last boxed answer (default), a format reward, user plug-ins, and a
batched scorer with a hard per-item time limit.

math-verify's own timeouts use `signal.alarm`, which only works in a process's main thread; inside
Ray workers or threads they raise or make every answer score 0. We switch them off
(`parsing_timeout=None`, `timeout_seconds=None`) and bound time ourselves:
  1. only the last box is parsed, and a box longer than `MAX_ANSWER_CHARS` scores 0;
  2. numbers too large to evaluate (e.g. `10^{10^{10}}`, which sympy would try to expand forever,
     or `\\binom{100000}{50000}`, which parsing evaluates) are compared as strings instead of
     symbolically (`MAX_LOG2`, `MAX_SYMBOLIC_EXP`, `_BIG_BINOM`);
  3. `score_batch(..., workers>0)` runs scoring in child processes and kills any item that runs
     past `timeout_s` (a hard bound; in-process scoring relies on 1-2 only).
"""
from __future__ import annotations

import importlib
import logging
import math
import multiprocessing as mp
import pickle
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Sequence

import sympy
from math_verify import parse, verify

from e3rl.tasks.base import Problem, count_boxed, last_boxed

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, Problem], float]
"""A reward function: (response text, problem) -> score (usually 0 or 1)."""

MAX_ANSWER_CHARS = 512
MAX_LOG2 = float(1 << 22)  # numbers above ~1.26M digits are compared as strings
MAX_SYMBOLIC_EXP = 10_000  # x^{n} with larger n is compared as a string (expansion blows up)

_BIG_BINOM = re.compile(r"binom\s*\{?\s*\d{5,}")  # parse() evaluates binomials eagerly
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?")


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its timeout is off; that is deliberate here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def extract_answer(response: str, require_box: bool = False) -> str | None:
    """The answer a response commits to: the last complete `\\boxed{}`.

    Without a box, the last number in the text (commas as thousands separators, `a/b` kept),
    unless `require_box`. The fallback gives small models that ignore the box instruction a
    learning signal; pair it with `format_reward`, or set `require_box`, to demand the format.
    """
    boxed = last_boxed(response)
    if boxed is not None or require_box:
        return boxed
    numbers = _NUMBER.findall(response)
    return numbers[-1].replace(",", "") if numbers else None


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


def math_reward(response: str, gold: str, *, require_box: bool = False) -> float:
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


def problem_reward(response: str, problem: Problem) -> float:
    """The default reward: the task's own scorer for reasoning-gym problems, math-verify otherwise."""
    from e3rl.tasks.gym import is_gym, score_gym

    if is_gym(problem):
        return score_gym(problem, response)
    return math_reward(response, problem.answer)


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
class BatchScores:
    """Scores in input order; failed items score 0.0 and are counted, never hidden."""

    scores: list[float]  # [N]
    timed_out: int
    errors: int


def _score_one(fn: RewardFn, response: str, problem: Problem) -> float:
    score = float(fn(response, problem))
    if not math.isfinite(score):
        raise ValueError(f"reward {score} for problem {problem.uid} is not finite")
    return score


def score_batch(responses: Sequence[str], problems: Sequence[Problem],
                reward_fn: RewardFn = problem_reward, workers: int = 0,
                timeout_s: float = 10.0) -> BatchScores:
    """Score `responses[i]` against `problems[i]`.

    `workers=0` scores in this thread (no hard time limit). `workers>0` uses that many child
    processes (forkserver, with this module preloaded) and gives each item at least `timeout_s`
    seconds; an item past it scores 0, and the pool is killed and restarted for the rest. Meant
    for the generator actor, off the decode path; `reward_fn` must be a module-level function.
    """
    if len(responses) != len(problems):
        raise ValueError(f"score_batch: {len(responses)} responses for {len(problems)} problems")
    items = list(zip(responses, problems))
    if workers <= 0:
        return _score_serial(items, reward_fn)
    try:
        pickle.dumps(reward_fn)
    except Exception as e:
        raise ValueError(f"score_batch: reward_fn {reward_fn!r} cannot be sent to worker "
                         f"processes ({e}); use a module-level function") from None
    return _score_in_pool(items, reward_fn, workers, timeout_s)


def _score_serial(items: list[tuple[str, Problem]], fn: RewardFn) -> BatchScores:
    scores, errors = [], 0
    for response, problem in items:
        try:
            scores.append(_score_one(fn, response, problem))
        except Exception as e:
            errors += 1
            scores.append(0.0)
            logger.warning("reward failed on %s: %s: %s", problem.uid, type(e).__name__, e)
    return BatchScores(scores, timed_out=0, errors=errors)


def _mp_context() -> Any:
    """forkserver: workers fork from a clean process with sympy/math-verify already imported,
    not from a Ray actor holding threads and GPU state."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["e3rl.rewards"])
    return ctx


def _score_in_pool(items: list[tuple[str, Problem]], fn: RewardFn, workers: int,
                   timeout_s: float) -> BatchScores:
    ctx = _mp_context()
    scores: list[float | None] = [None] * len(items)
    timed_out = errors = 0
    pending = list(range(len(items)))
    while pending:
        with ctx.Pool(min(workers, len(pending))) as pool:  # exit terminates stuck workers
            jobs = {i: pool.apply_async(_score_one, (fn, *items[i])) for i in pending}
            for i in pending:
                if scores[i] is not None:
                    continue
                try:
                    scores[i] = jobs[i].get(timeout=timeout_s)
                except mp.TimeoutError:
                    scores[i], timed_out = 0.0, timed_out + 1
                    logger.warning("reward timed out after %.1fs on %s", timeout_s, items[i][1].uid)
                    break
                except Exception as e:
                    scores[i], errors = 0.0, errors + 1
                    logger.warning("reward failed on %s: %s: %s", items[i][1].uid,
                                   type(e).__name__, e)
            for i in pending:  # keep what finished before a timeout
                if scores[i] is None and jobs[i].ready() and jobs[i].successful():
                    scores[i] = jobs[i].get()
        pending = [i for i in pending if scores[i] is None]
    return BatchScores([float(s) for s in scores], timed_out=timed_out, errors=errors)

"""reasoning-gym tasks as `Problem`s, judged by the task's own `score_answer`.

Gym answers are plain strings (`-4`, `True`, a word) and `score_answer` is close to exact match
(`" -4 "` scores 0.5, `"\\boxed{-4}"` 0.2), so the model is told to box its answer and the box
content is handed to the scorer. Only full credit is correct: many scorers give partial credit
when the gold string appears inside the answer (gold `3`: `-3`, `13`, `3 1` score 0.3-0.5), which
a policy can farm. Problems carry enough in `meta` to rebuild the exact dataset entry anywhere
(a Ray worker, a reward subprocess): generation is seeded and deterministic.
"""
from __future__ import annotations

import json
import logging
import re
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from e3rl.tasks.base import LoadStats, Problem, answer_text, extract_answer, last_boxed

logger = logging.getLogger(__name__)

GYM_INSTRUCTION = "Give the final answer in \\boxed{}, e.g. \\boxed{-4}."
"""Short on purpose: gym tasks are what small models train on, and every prompt token is paid for
G times in the learner. The scorers need the bare answer, hence the example."""

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][+-]?\d+)?")


@lru_cache(maxsize=32)
def _dataset(name: str, size: int, seed: int, config_json: str) -> Any:
    import reasoning_gym

    return reasoning_gym.create_dataset(name, size=size, seed=seed, **json.loads(config_json))


def _json_safe(entry: dict[str, Any]) -> dict[str, Any]:
    """Entry with tuples as lists and anything exotic as str, so it survives JSON/Arrow records."""
    return json.loads(json.dumps(entry, default=str))


def load_gym(name: str, size: int, seed: int = 0, source: str | None = None,
             **config: Any) -> tuple[list[Problem], LoadStats]:
    """`size` problems of the reasoning-gym task `name` (extra kwargs go to its config)."""
    config_json = json.dumps(config, sort_keys=True)
    ds = _dataset(name, size, seed, config_json)
    src = source or f"rg/{name}"
    problems: list[Problem] = []
    for i in range(size):
        entry = ds[i]
        gold, text = answer_text(entry.get("answer")), answer_text(entry.get("question"))
        if gold is None or text is None:
            continue
        meta = {"rg_task": name, "rg_index": i, "rg_size": size, "rg_seed": seed,
                "rg_config": json.loads(config_json), "rg_entry": _json_safe(entry)}
        problems.append(Problem(uid=f"{src}/{seed}/{i}", prompt=text, answer=gold, source=src,
                                meta=meta))
    stats = LoadStats(total=size, kept=len(problems), skipped_no_answer=size - len(problems),
                      skipped_filtered=0)
    return problems, stats


def is_gym(problem: Problem) -> bool:
    return "rg_task" in problem.meta


def extract_gym_answer(response: str, require_box: bool = True) -> str | None:
    """The last `\\boxed{}` content, else the last `<answer>...</answer>` (gym's own convention: a
    committed answer too), else, only with `require_box` off, the last number in the text (the
    same opt-in fallback as `extract_answer`)."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG.findall(response)
    if tags:
        return tags[-1].strip()
    return extract_answer(response, require_box)


def plain_number(text: str) -> Decimal | None:
    """The value of a text that is one number and nothing else (`-4`, ` 7.0 `, `1,250`), else None."""
    text = text.strip()
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def gym_verdict(problem: Problem, response: str, require_box: bool = True) -> tuple[bool, float]:
    """(correct, the scorer's credit in [0, 1]) for a response.

    Correct iff the task's scorer gives full credit. When the gold is a plain number the answer
    must also be one number: one equal to the gold (`7.0` for `7`) is correct even where the scorer
    compares strings, and a different one only with full credit (tolerant scorers, e.g.
    decimal_arithmetic's) on the gold's side of zero (gsm_symbolic's reads the first number, sign
    dropped: it gives `-288` and `288 1` full credit for 288).
    """
    answer = extract_gym_answer(response, require_box)
    if answer is None:
        return False, 0.0
    credit = min(max(_scorer_credit(problem, answer), 0.0), 1.0)
    gold = plain_number(problem.answer)
    if gold is None:
        return credit == 1.0, credit
    value = plain_number(answer)
    if value is None:
        return False, credit
    return value == gold or (credit == 1.0 and _sign(value) == _sign(gold)), credit


def _sign(x: Decimal) -> int:
    return (x > 0) - (x < 0)


def score_gym(problem: Problem, response: str, require_box: bool = True) -> float:
    """1.0 if the task's scorer gives the response full credit (see `gym_verdict`), else 0.0."""
    return float(gym_verdict(problem, response, require_box)[0])


def _scorer_credit(problem: Problem, answer: str) -> float:
    """The task's own scorer on the original (not JSON-mangled) entry.

    The dataset is re-created from (task, size, seed, config) and cached per process. If this
    reasoning-gym version generates a different question at that index, the stored entry is used.
    """
    m = problem.meta
    ds = _dataset(m["rg_task"], m["rg_size"], m["rg_seed"], json.dumps(m["rg_config"], sort_keys=True))
    entry = ds[m["rg_index"]]
    if entry["question"] != problem.prompt:
        logger.warning("reasoning-gym %s[%d] differs from the stored problem; scoring the stored "
                       "entry", m["rg_task"], m["rg_index"])
        entry = m["rg_entry"]
    return float(ds.score_answer(answer, entry))

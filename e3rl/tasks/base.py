"""The task record every loader returns, load accounting, prompt building and answer extraction.

Loaders are config-free: they take explicit arguments and return `(problems, LoadStats)`, so the
caller can log how much of a dataset was dropped and why instead of training on a silent subset.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""The standard DeepSeek-R1 / Qwen2.5-Math prompt suffix; `e3rl.rewards` reads the last box."""


@dataclass(frozen=True)
class Problem:
    """One question with its gold answer.

    `prompt` is the raw question text, before any chat template or instruction, so the same
    problem can be rendered for different models. `meta` holds source-specific extras (difficulty,
    topic, reasoning-gym scoring handles); it is excluded from hashing.
    """

    uid: str
    prompt: str
    answer: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class LoadStats:
    """Row accounting of one load: `kept + skipped_no_answer + skipped_filtered == total`.

    `skipped_filtered` counts rows dropped by any filter (difficulty, prompt length, subsetting).
    """

    total: int
    kept: int
    skipped_no_answer: int
    skipped_filtered: int


def answer_text(value: Any) -> str | None:
    """The gold answer as a stripped string, or None when it is unusable (None, NaN, blank)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def build_prompt(problem: Problem, tokenizer: Any, instruction: str = DEFAULT_INSTRUCTION,
                 system: str | None = None, template_kwargs: dict | None = None) -> str:
    """The text fed to the generator: question + instruction, in the model's chat format.

    Uses the tokenizer's chat template when it has one (what the model was tuned on), rendered with
    `template_kwargs` (e.g. Qwen3's `enable_thinking`); otherwise a plain "Question: ...\\nAnswer:"
    completion prompt, which base models continue sensibly.
    """
    user = f"{problem.prompt}\n{instruction}" if instruction else problem.prompt
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else [])
        messages.append({"role": "user", "content": user})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             **(template_kwargs or {}))
    head = f"{system}\n\n" if system else ""
    return f"{head}Question: {user}\nAnswer:"


_BOX_OPENERS = ("\\boxed{", "\\fbox{")


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (nested and escaped braces handled), or None.

    A box cut off by the length limit is ignored, so a truncated answer falls back to the previous
    complete one. Shared by the math reward and the reasoning-gym scorer.
    """
    end = len(text)
    while True:
        start = max(text.rfind(opener, 0, end) for opener in _BOX_OPENERS)
        if start < 0:
            return None
        body = text.index("{", start) + 1
        close = _matching_brace(text, body)
        if close is not None:
            return text[body:close].strip()
        end = start


_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?")


def extract_answer(response: str, require_box: bool = True) -> str | None:
    """The answer a response commits to: the last complete `\\boxed{}`.

    With `require_box` off, a response without a box answers with its last number (commas as
    thousands separators, `a/b` kept). That fallback is an opt-in for small models that ignore the
    box instruction: it also scores a response cut off mid-thought ("... we have x = 2 and next we
    should check whether the" answers 2), so accuracies under it are not comparable with box-based ones.
    """
    boxed = last_boxed(response)
    if boxed is not None or require_box:
        return boxed
    numbers = _NUMBER.findall(response)
    return numbers[-1].replace(",", "") if numbers else None


def count_boxed(text: str) -> int:
    """Number of `\\boxed{`/`\\fbox{` openers in the text (complete or not)."""
    return sum(text.count(opener) for opener in _BOX_OPENERS)


def _matching_brace(text: str, i: int) -> int | None:
    """Index of the `}` closing the group that starts at i, skipping `\\{` and `\\}`."""
    depth = 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None

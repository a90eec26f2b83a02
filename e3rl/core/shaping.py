"""Reward shaping that depends on the response itself, not on its answer.

DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13): with L_max = `max_len` and
L_cache = `buffer`, a response of |y| tokens gets

    R_length(y) = 0                                    if |y| <= L_max - L_cache
                  ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                  -1                                   if |y| > L_max

times `factor`, added to its reward. Long answers lose reward gradually before they are cut off,
instead of a truncated one looking like any other wrong answer.
"""
from __future__ import annotations


def overlong_penalty(length: int, max_len: int, buffer: int, factor: float = 1.0) -> float:
    """R_length above (<= 0) for a response of `length` tokens; `buffer` = 0 switches it off."""
    if buffer <= 0:
        return 0.0
    expected = max_len - buffer
    if length <= expected:
        return 0.0
    if length <= max_len:
        return (expected - length) / buffer * factor
    return -factor

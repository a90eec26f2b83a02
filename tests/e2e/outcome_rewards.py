"""A deterministic test reward with controlled group outcomes, for dynamic sampling tests (imported
by the generator actors' reward workers, so it stays light). The tiny random model never solves a
task; this reward sorts problems into three kinds by a hash of their uid:

- `mixed`: correct iff a hash of the response text is even (a group of G samples is all-correct or
  all-wrong with probability 2 / 2^G);
- `right`: always correct (an all-correct group);
- `wrong`: never correct, with a shaped reward of 0.5 for even response hashes (rewards vary inside
  the group, correctness does not: dynamic sampling must still drop it).
"""
from __future__ import annotations

import zlib

KINDS = ("mixed", "right", "wrong")


def kind(problem) -> str:
    return KINDS[zlib.crc32(problem.uid.encode()) % 3]


def outcome_reward(response: str, problem) -> float:
    even = zlib.crc32(response.encode()) % 2 == 0
    k = kind(problem)
    if k == "mixed":
        return 1.0 if even else 0.0
    return 1.0 if k == "right" else 0.5 * even

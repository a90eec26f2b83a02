"""Workloads: math sets and reasoning-gym tasks as `Problem`s, plus prompt building.

Loaders take explicit arguments (no config objects) and return `(problems, LoadStats)`.
Heavy imports (`datasets`, `reasoning_gym`) happen inside the loaders.
"""
from e3rl.tasks.base import (DEFAULT_INSTRUCTION, LoadStats, Problem, build_prompt, count_boxed,
                             last_boxed)
from e3rl.tasks.gym import GYM_INSTRUCTION, extract_gym_answer, is_gym, load_gym, score_gym
from e3rl.tasks.math_data import FORMATS, detect_format, load_math

__all__ = [
    "DEFAULT_INSTRUCTION", "GYM_INSTRUCTION", "FORMATS", "LoadStats", "Problem", "build_prompt",
    "count_boxed", "detect_format", "extract_gym_answer", "is_gym", "last_boxed", "load_gym",
    "load_math", "score_gym",
]

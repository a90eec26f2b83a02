"""Scoring in the generator actor: the configured reward, the format bonus, errors counted not raised."""
import torch

from actors.generator_actor import make_reward_fn, score
from e3rl.config import load_config
from e3rl.core.trajectory import SegmentTable, Trajectory
from e3rl.tasks.base import Problem
from e3rl.tasks.gym import load_gym


def _traj(text: str) -> Trajectory:
    z = torch.zeros(0, dtype=torch.long)
    return Trajectory(z, z, torch.zeros(0), torch.zeros(0), z, z, SegmentTable.empty(), response_text=text)


def test_auto_reward_uses_gym_scorer_and_math_verify():
    gym, _ = load_gym("chain_sum", 1, seed=0)
    math = Problem("m", "half?", "\\frac{1}{2}", "test")
    trajs = [_traj(f"so \\boxed{{{gym[0].answer}}}"), _traj("\\boxed{7}"), _traj("\\boxed{0.5}"), _traj("no")]
    errors = score(trajs, [gym[0], math], 2, make_reward_fn(load_config()))
    assert [t.reward for t in trajs] == [1.0, 0.0, 1.0, 0.0] and errors == 0


def test_format_weight_adds_bonus_and_broken_reward_is_counted(tmp_path):
    cfg = load_config(None, ["reward.fn=math_verify", "reward.format_weight=0.5"])
    p = Problem("m", "q", "3", "test")
    trajs = [_traj("\\boxed{3}"), _traj("\\boxed{4}")]
    score(trajs, [p], 2, make_reward_fn(cfg))
    assert [t.reward for t in trajs] == [1.5, 0.5]
    errors = score(trajs, [p], 2, lambda r, prob: 1 / 0)
    assert errors == 2 and [t.reward for t in trajs] == [0.0, 0.0]

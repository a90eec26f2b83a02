"""Per-token advantages: whole groups for the outcome, kept positions for the allocation, erased
attempts credited by the core's rule, answer attention driving the `attention` allocator."""
import pytest
import torch

from e3rl.bench.learner import build_trajectory
from e3rl.core.advantages import ESTIMATORS
from learner.advantages import (AdvantageSpec, attention_mass, batch_token_advantages, column_positions,
                                outcome_advantages, trajectory_token_advantages)


def _tok(n: int, start: int = 1) -> torch.Tensor:
    return torch.arange(start, start + n)


def _traj(reward: float = 1.0, group: int = 0, erase_first: bool = True):
    """Positions 0 (erased once, then kept), 1 (kept), 2 (kept: the answer segment)."""
    attempts = ([(0, _tok(3), True)] if erase_first else []) + [(0, _tok(3, 10), False), (1, _tok(4, 20), False),
                                                                   (2, _tok(2, 30), False)]
    return build_trajectory(_tok(4, 100), attempts, [0.5] * len(attempts), group_id=group, reward=reward)


def test_outcome_uses_whole_groups_even_interleaved_and_unequal():
    rewards = {0: [1.0, 0.0, 1.0], 1: [0.0, 1.0]}
    trajs = [_traj(r, g) for g, rs in rewards.items() for r in rs]
    trajs = [trajs[i] for i in (0, 3, 1, 4, 2)]  # interleave the groups
    out = outcome_advantages(trajs, "grpo")
    for g, rs in rewards.items():
        got = torch.stack([a for a, t in zip(out, trajs) if t.group_id == g])
        assert torch.allclose(got, ESTIMATORS["grpo"](torch.tensor([rs]))[0])


def test_uniform_same_credit_is_plain_grpo():
    t = _traj()
    adv = trajectory_token_advantages(t, 0.8, AdvantageSpec(allocation="uniform", erased_credit="same"))
    assert torch.allclose(adv, torch.full((t.stream_ids.numel(),), 0.8))


@pytest.mark.parametrize("a", [0.8, -0.8])
def test_contrast_credit_puts_erased_below_replacement(a):
    t = _traj()
    adv = trajectory_token_advantages(t, a, AdvantageSpec(allocation="uniform", erased_credit="contrast", margin=0.5))
    erased = t.erased_at >= 0
    assert torch.allclose(adv[~erased], torch.full((int((~erased).sum()),), a))
    assert torch.allclose(adv[erased], torch.full((int(erased.sum()),), min(a, 0.0) - 0.5 * abs(a)))


def test_attention_allocation_follows_answer_attention_on_kept_columns():
    t = _traj()
    cols = column_positions(t)
    assert cols.tolist() == [-1, -1, -1, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    attn = torch.zeros(2, t.stream_ids.numel())  # 2 answer queries over the stream
    attn[:, 3:6] = 0.3  # kept position 0
    attn[:, 6:10] = 0.025  # kept position 1
    attn[:, 0:3] = 5.0  # erased columns: must be ignored
    mass = attention_mass(t, attn)
    assert torch.allclose(mass, torch.tensor([0.9, 0.1, 0.0]))
    spec = AdvantageSpec(allocation="attention", mix=1.0, erased_credit="zero")
    adv = trajectory_token_advantages(t, 1.0, spec, attn)
    w = adv[cols >= 0]
    assert torch.allclose(w.unique(sorted=False).sort().values, torch.tensor([0.2, 1.0, 1.8]), atol=1e-5)
    assert adv[3] > adv[6] and torch.allclose(adv[10], torch.tensor(1.0))  # answer keeps 1/K -> weight 1
    assert (adv[:3] == 0).all()
    batch = batch_token_advantages([t, t], torch.tensor([1.0, 1.0]), spec, [attn, None])
    assert torch.allclose(batch[0], adv) and not torch.allclose(batch[1], adv)  # None -> uniform


def test_stream_cut_after_a_rewind_and_bad_positions():
    # kept position 0 (3 tokens), then position 1 erased with no replacement: the stream ended there
    cut = build_trajectory(_tok(2), [(0, _tok(3), False), (1, _tok(2), True)], [0.1, 0.2])
    spec = AdvantageSpec(allocation="uncertainty", erased_credit="contrast", margin=0.5)
    for a in (1.0, -1.0):
        adv = trajectory_token_advantages(cut, a, spec)
        # the lone kept segment takes the whole advantage (weight 1 = K / K); the unreplaced position
        # weighs 1, so its erased attempt gets contrast credit min(a, 0) - 0.5 |a|
        want = [a] * 3 + [min(a, 0.0) - 0.5 * abs(a)] * 2
        assert adv.tolist() == pytest.approx(want), a
    bad = build_trajectory(_tok(2), [(0, _tok(3), False), (2, _tok(2), False)], [0.1, 0.2])
    with pytest.raises(ValueError, match="not 0..K-1"):
        trajectory_token_advantages(bad, 1.0, AdvantageSpec())


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo"])
@pytest.mark.parametrize("allocation", ["uniform", "attention", "uncertainty"])
@pytest.mark.parametrize("credit", ["contrast", "zero", "same"])
def test_constant_group_keeps_exact_zero_through_allocation(estimator, allocation, credit):
    trajs = [_traj(2 / 3, group=0) for _ in range(8)] + [_traj(float(i % 2), group=1) for i in range(4)]
    out = outcome_advantages(trajs, estimator)
    assert (out[:8] == 0).all() and (out[8:] != 0).all()
    attn = torch.full((2, trajs[0].stream_ids.numel()), 0.1)
    spec = AdvantageSpec(estimator=estimator, allocation=allocation, erased_credit=credit)
    for adv in batch_token_advantages(trajs[:8], out[:8], spec, [attn] * 8):
        assert (adv == 0).all()

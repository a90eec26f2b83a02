"""Erasure branches (e3rl.core.branches): a hand-built trajectory, then real healed ones."""
import torch

from e3rl.core.branches import erasure_branches, visible_before
from e3rl.core.trajectory import SegmentTable, Trajectory, stream_position_ids

NEVER = -1


def _traj() -> Trajectory:
    """Position 0 kept [10, 11]; position 1 erased twice ([20, 21], [22, 23]) then kept [24, 25];
    position 2 erased once ([30]) and never replaced (the stream ended)."""
    stream = torch.tensor([10, 11, 20, 21, 22, 23, 24, 25, 30])
    erased_at = torch.tensor([NEVER, NEVER, 4, 4, 6, 6, NEVER, NEVER, 9])
    segs = SegmentTable(position=torch.tensor([0, 1, 1, 1, 2]), start=torch.tensor([0, 2, 4, 6, 8]),
                        end=torch.tensor([2, 4, 6, 8, 9]), uncertainty=torch.tensor([0.1, 0.9, 0.8, 0.2, 0.7]),
                        threshold=torch.tensor([0.5, 0.5, 0.6, 0.7, 0.5]), score=torch.tensor([-1.0, 1.5, 0.9, 0.2, 1.1]),
                        erase_count=torch.tensor([0, 0, 1, 2, 0]), erased=torch.tensor([False, True, True, False, True]))
    return Trajectory(prompt_ids=torch.tensor([1, 2, 3]), stream_ids=stream, behavior_logp=torch.zeros(9),
                      surprisal=torch.zeros(9), erased_at=erased_at, position_ids=stream_position_ids(3, erased_at),
                      segments=segs)


def test_each_erased_attempt_with_a_kept_replacement_is_one_branch():
    b = erasure_branches(_traj())
    assert [(x.position, x.attempt, x.prefix, x.erased, x.replacement) for x in b] == [
        (1, 0, [10, 11], [20, 21], [24, 25]),
        (1, 1, [10, 11], [22, 23], [24, 25]),  # the first erased attempt is not in the prefix
    ]
    assert (b[0].uncertainty, b[0].threshold) == (torch.tensor(0.9).item(), 0.5)  # float32 values
    assert (b[1].uncertainty, b[1].threshold) == (torch.tensor(0.8).item(), torch.tensor(0.6).item())


def test_visible_before_drops_what_was_erased_by_then():
    t = _traj()
    assert visible_before(t, 3).tolist() == [10, 11, 20]  # token 20 is not erased until index 4
    assert visible_before(t, 6).tolist() == [10, 11]
    assert visible_before(t, 9).tolist() == [10, 11, 24, 25]


def test_branches_of_real_healed_trajectories_sit_on_the_kept_stream(tiny_model, tokenizer):
    """Every branch's prefix + replacement is a prefix of the kept stream, and the replacement's
    own prefix is the same tokens: both branches continue from one context."""
    from actors.generator import RewindableGenerator
    from e3rl.config import GenConfig, HealConfig

    gen = GenConfig(group_size=2, max_new_tokens=16, temperature=1.0)
    heal = HealConfig(segment_tokens=4, max_erases_per_segment=2, max_erases_per_traj=3)
    g = RewindableGenerator(tiny_model, tokenizer, gen, heal, heal_active=True, seed=3)
    g.force_erase = lambda row, position: position in (1, 2)
    trajs = g.generate([tokenizer.encode("1+1="), tokenizer.encode("Hello")], [0, 1])
    seen = 0
    for t in trajs:
        kept = t.kept_ids.tolist()
        for x in erasure_branches(t):
            seen += 1
            assert kept[: len(x.prefix) + len(x.replacement)] == x.prefix + x.replacement
            start = next(int(t.segments.start[r]) for r in range(len(t.segments))
                         if int(t.segments.position[r]) == x.position and not bool(t.segments.erased[r]))
            assert visible_before(t, start).tolist() == x.prefix
        assert len(erasure_branches(t)) <= t.rewinds
    assert seen >= 4

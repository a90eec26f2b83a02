"""DAPO dynamic sampling's selection on hand-built group outcomes: informative groups first, the
surplus discarded, zero-variance groups only as a counted fallback; unique seeds and group ids."""
import pytest

from e3rl.core.dynamic_sampling import (GroupOutcome, Selection, informative_groups, round_group_ids, round_seed,
                                        select_groups)


def _groups(*correct: int, size: int = 4, first: int = 0) -> list[GroupOutcome]:
    return [GroupOutcome(first + i, c, size) for i, c in enumerate(correct)]


def test_informative_means_mixed_outcomes():
    assert [o.informative for o in _groups(0, 1, 3, 4)] == [False, True, True, False]
    assert informative_groups(_groups(0, 1, 3, 4)) == 2


def test_enough_in_one_round_trains_the_mixed_groups():
    assert select_groups(_groups(2, 0, 1, 4), need=2) == Selection(train=(0, 2), samples=8, kept=2, fallback=0,
                                                                   dropped=2, discarded=0)


def test_refill_rounds_pooled_in_order_and_surplus_discarded():
    # round 0: one mixed group of two; round 1: three mixed groups, only one more is needed
    outcomes = _groups(0, 3) + _groups(1, 2, 1, 4, first=10)
    sel = select_groups(outcomes, need=2)
    assert sel == Selection(train=(1, 10), samples=8, kept=2, fallback=0, dropped=2, discarded=2)
    assert sel.kept + sel.fallback + sel.dropped + sel.discarded == len(outcomes)


def test_short_of_informative_groups_falls_back_to_zero_variance_ones():
    sel = select_groups(_groups(0, 4, 2) + _groups(4, 0, 0, first=10), need=3)
    assert sel == Selection(train=(2, 0, 1), samples=12, kept=1, fallback=2, dropped=3, discarded=0)
    all_uniform = select_groups(_groups(0, 0, size=8), need=2)
    assert all_uniform.train == (0, 1) and all_uniform.samples == 16 and all_uniform.fallback == 2


def test_bad_inputs_are_refused_by_name():
    with pytest.raises(ValueError, match="unique across"):
        select_groups(_groups(1, 2) + _groups(1, first=1), need=2)
    with pytest.raises(ValueError, match="need must be >= 1"):
        select_groups(_groups(1), need=0)


def test_round_seeds_and_group_ids_are_unique_and_round_zero_unchanged():
    assert round_seed(7 * 100_003 + 5, 0) == 7 * 100_003 + 5
    seeds = {round_seed(7 * 100_003 + step, r) for step in range(50) for r in range(5)}
    assert len(seeds) == 250
    assert round_group_ids(3, 0, 1, 4) == [12, 13, 14, 15]  # one round per step: step * N + i
    ids = [g for step in range(6) for r in range(3) for g in round_group_ids(step, r, 3, 4)]
    assert len(ids) == len(set(ids)) == 6 * 3 * 4

"""The healing study's arithmetic (e3rl.study): the equal-token budget and the paired comparisons."""
import pytest

from e3rl.study import branch_effect, compare_modes, equal_token_samples


def test_equal_token_samples_gives_plain_sampling_what_healing_spent():
    assert equal_token_samples(48.0, 32.0, 4) == 6  # 4 x 48 / 32
    assert equal_token_samples(33.0, 32.0, 4) == 5  # rounded up: never less than healing spent
    assert equal_token_samples(32.0, 32.0, 4) == 4
    assert equal_token_samples(20.0, 32.0, 4) == 4  # never fewer than k


def test_compare_modes_pairs_by_problem_and_counts_the_extra_samples_only_for_pass():
    on = [[True, False], [False, False], [True, True]]
    off = [[False, False, True], [False, False, False], [True, False, False]]  # k = 2, 3 at equal tokens
    d = compare_modes(on, off, k=2)
    assert d["avg@k"].mean == pytest.approx(((0.5 - 0) + 0 + (1 - 0.5)) / 3)
    assert d["pass@k"].mean == pytest.approx((1 - 0 + 0 + 0) / 3)  # off's third sample is not in pass@k
    assert d["pass@equal_tokens"].mean == pytest.approx(0.0)  # ... but is at equal tokens
    with pytest.raises(ValueError):
        compare_modes(on, [[True]] * 3, k=2)


def test_branch_effect_weighs_problems_not_erasures():
    """Problem 0 has nine erasures where the replacement wins; problems 1-2 one each where it
    loses: per problem the mean is (1 - 1 - 1) / 3, not (9 - 2) / 11."""
    events = [(0, 1.0, 0.0)] * 9 + [(1, 0.0, 1.0), (2, 0.0, 1.0)]
    assert branch_effect(events).mean == pytest.approx(-1 / 3)
    assert branch_effect([(0, 1.0, 0.0)]) is None  # one problem: no interval

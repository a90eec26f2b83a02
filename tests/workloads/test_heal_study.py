"""The healing study's arithmetic (e3rl.study): the equal-token budget and the paired comparisons."""
import itertools

import pytest

from e3rl.core.passk import pass_at_budget, pass_at_k
from e3rl.study import branch_effect, compare_modes, equal_token_budget


def test_equal_token_budget_gives_plain_sampling_what_healing_spent():
    assert equal_token_budget(48.0, 32.0, 4) == 6.0  # 4 x 48 / 32
    assert equal_token_budget(33.0, 32.0, 4) == 4.125  # fractional, not rounded up to 5
    assert equal_token_budget(20.0, 32.0, 4) == 4.0  # never fewer than k


def test_pass_at_a_fractional_budget_is_the_randomised_budgets_pass():
    """Drawing 5 samples with probability 0.25, else 4, spends 4.25 samples in expectation; its
    Pass@ (enumerated over which samples of the 5 are drawn) is what `pass_at_budget` gives."""
    outcomes = [True, False, False, True, False]
    n, c = len(outcomes), sum(outcomes)
    p4 = sum(any(outcomes[i] for i in s) for s in itertools.combinations(range(n), 4)) / 5
    assert pass_at_budget(n, c, 4.25) == pytest.approx(0.75 * p4 + 0.25 * 1.0)
    assert pass_at_budget(n, c, 4.0) == pytest.approx(pass_at_k(n, c, 4)) == pytest.approx(p4)
    with pytest.raises(ValueError):
        pass_at_budget(4, 1, 4.5)  # more than the samples drawn
    # under one sample's tokens (a healed answer shorter than a plain one): one sample with
    # probability m, else none, and no sample answers nothing
    assert pass_at_budget(n, c, 0.75) == pytest.approx(0.75 * c / n)
    assert pass_at_budget(n, c, 0.0) == 0.0


def test_compare_modes_pairs_by_problem_and_counts_the_extra_samples_only_for_pass():
    on = [[True, False], [False, False], [True, True]]
    off = [[False, False, True], [False, False, False], [True, False, False]]  # k = 2, 3 at equal tokens
    d = compare_modes(on, off, k=2, budget=3.0)
    assert d["avg@k"].mean == pytest.approx(((0.5 - 0) + 0 + (1 - 0.5)) / 3)
    assert d["pass@k"].mean == pytest.approx((1 - 0 + 0 + 0) / 3)  # off's third sample is not in pass@k
    assert d["pass@equal_tokens"].mean == pytest.approx(0.0)  # ... but is at equal tokens
    half = compare_modes(on, off, k=2, budget=2.5)  # problems 0 and 2: plain Pass@2.5 = 0.5 x 2/3 + 0.5 x 1
    assert half["pass@equal_tokens"].mean == pytest.approx(2 * (1 - (0.5 * 2 / 3 + 0.5)) / 3)
    with pytest.raises(ValueError):
        compare_modes(on, [[True]] * 3, k=2)


def test_branch_effect_weighs_problems_not_erasures():
    """Problem 0 has nine erasures where the replacement wins; problems 1-2 one each where it
    loses: per problem the mean is (1 - 1 - 1) / 3, not (9 - 2) / 11."""
    events = [(0, 1.0, 0.0)] * 9 + [(1, 0.0, 1.0), (2, 0.0, 1.0)]
    assert branch_effect(events).mean == pytest.approx(-1 / 3)
    assert branch_effect([(0, 1.0, 0.0)]) is None  # one problem: no interval

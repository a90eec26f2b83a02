"""Composite uncertainty, the adaptive threshold and the run history (docs/method.md §3-4).

Hand-computed constants come from closed forms or mpmath (Student-t quantiles via the regularised
incomplete beta), never from e3rl code.
"""
import math
import random
from statistics import NormalDist

import pytest
import torch

from e3rl.core.stats import normal_score_of_t, t_quantile_at_normal, t_upper_tail
from e3rl.core.threshold import (Reference, ThresholdParams, UncertaintyHistory, first_attempt_mask, gap_score,
                                 segment_reference, segment_threshold, should_erase, simulate_erase_loop,
                                 threshold_from)
from e3rl.core.uncertainty import UncertaintyWeights, moving_average, segment_uncertainty, uncertainty_components

NOMINAL_K1 = 0.5 * math.erfc(1 / math.sqrt(2))  # 1 - Phi(1) = 0.1587: the erase rate k = 1 promises


def test_components_hand_computed():
    s = torch.tensor([1.0, 1.0, 4.0, 4.0, 1.0])
    mean, peak, delta = uncertainty_components(s, prev_mean=1.0, window=2)
    assert mean == pytest.approx(2.2) and peak == pytest.approx(4.0) and delta == pytest.approx(1.2 / 3.2)
    assert uncertainty_components(s, prev_mean=5.0, window=2)[2] == 0.0  # a drop is not a defect
    u = segment_uncertainty(s, 1.0, UncertaintyWeights(mean=1.0, peak=0.5, delta=0.25, window=2))
    assert u == pytest.approx(2.2 + 2.0 + 0.25 * 0.375)


def test_rise_term_is_bounded_whatever_the_previous_mean():
    """The same segment after a calm previous segment must not explode: the rise term lies in [0, 1]."""
    s = torch.tensor([0.9, 0.5, 0.4, 0.6])
    w = UncertaintyWeights()
    after_06, after_002 = segment_uncertainty(s, 0.6, w), segment_uncertainty(s, 0.02, w)
    assert after_002 - after_06 <= w.delta  # was 15.4 vs 0.90
    for prev in (0.6, 0.02, 1e-9, 0.0):
        assert 0.0 <= uncertainty_components(s, prev, w.window)[2] <= 1.0
    assert uncertainty_components(torch.zeros(3), 0.0, 2)[2] == 0.0


def test_moving_average_short_segment():
    assert torch.allclose(moving_average(torch.tensor([1.0, 3.0]), 4), torch.tensor([2.0]))
    assert torch.allclose(moving_average(torch.tensor([1.0, 3.0, 5.0]), 2), torch.tensor([2.0, 4.0]))


def test_t_quantile_matches_closed_forms_and_mpmath():
    p = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    assert t_quantile_at_normal(1.0, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), abs=1e-7)  # Cauchy
    assert t_quantile_at_normal(1.0, 2) == pytest.approx(1.3212773729262555, abs=1e-7)
    assert t_quantile_at_normal(1.0, 8) == pytest.approx(1.0665284220683794, abs=1e-7)
    assert t_quantile_at_normal(-1.0, 8) == pytest.approx(-1.0665284220683794, abs=1e-7)
    assert t_quantile_at_normal(1.0, 1e6) == pytest.approx(1.0, abs=1e-5)


def test_group_threshold_leave_one_out_and_exponential_penalty():
    p = ThresholdParams(k=1.0, penalty_scale=0.5, penalty_base=2.0, history_weight=0.5, min_peers=2)
    others = torch.tensor([1.0, 2.0, 3.0])  # mean 2, sample var 1, df 2; sd = sqrt(1 + 1/3)
    tau0 = segment_threshold(others, 0, UncertaintyHistory(), p)
    assert tau0 == pytest.approx(3.5256796938662703, abs=1e-6)
    taus = [segment_threshold(others, e, UncertaintyHistory(), p) for e in range(4)]
    gaps = [taus[i + 1] - taus[i] for i in range(3)]
    assert gaps[0] == pytest.approx(0.5 * 1.1547005383792515, abs=1e-6)  # c * sd * (2 - 1)
    assert gaps[1] == pytest.approx(2 * gaps[0]) and gaps[2] == pytest.approx(4 * gaps[0])


def test_history_is_the_spread_floor_of_a_two_sample_group():
    p = ThresholdParams(k=1.0, history_weight=0.5, min_peers=2, spread_prior=8.0)
    hist = UncertaintyHistory(mean=4.0, var=1.0, count=10)
    # one other sample (x = 1): center 0.5 * 1 + 0.5 * 4; spread from the history alone, df 8
    assert segment_threshold(torch.tensor([1.0]), 0, hist, p) == pytest.approx(3.6924150258402416, abs=1e-6)
    assert segment_threshold(torch.tensor([1.0]), 0, UncertaintyHistory(), p) == math.inf  # no spread at all
    assert segment_threshold(torch.empty(0), 0, hist, p) == pytest.approx(5.0)  # alone: history only
    assert segment_threshold(torch.empty(0), 0, UncertaintyHistory(), p) == math.inf  # no reference
    few = ThresholdParams(min_peers=4)
    assert segment_threshold(torch.tensor([9.0, 7.0]), 0, hist, few) == pytest.approx(5.0)  # too few peers


def _erase_rate(group: int, history: UncertaintyHistory, p: ThresholdParams, trials: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(trials, group, generator=g, dtype=torch.float64)
    hits = sum(float(u[i, 0]) > segment_threshold(u[i, 1:], 0, history, p) for i in range(trials))
    return hits / trials


@pytest.mark.parametrize("history_weight", [0.0, 0.5])
def test_iid_erase_rate_is_nominal_at_every_peer_count(history_weight):
    """For i.i.d. N(0, 1) segment uncertainties and a history of the same distribution, the first-attempt
    erase rate is 1 - Phi(k) whatever the number of peers (the population z-score could not pass
    k = 1 with two peers: 0 erasures)."""
    p = ThresholdParams(k=1.0, history_weight=history_weight)
    hist = UncertaintyHistory(mean=0.0, var=1.0, count=10_000)
    trials = 3000  # standard error 0.0067
    for group in range(2, 9):
        rate = _erase_rate(group, hist, p, trials, seed=group)
        assert abs(rate - NOMINAL_K1) < 0.025, (group, rate)


def test_iid_erase_rate_is_nominal_without_history():
    p = ThresholdParams(k=1.0)
    for group in range(3, 9):  # two samples and no history: no spread reference, nothing erased
        rate = _erase_rate(group, UncertaintyHistory(), p, 3000, seed=100 + group)
        assert abs(rate - NOMINAL_K1) < 0.025, (group, rate)
    assert _erase_rate(2, UncertaintyHistory(), p, 200, seed=0) == 0.0


def test_history_update_is_one_ema_step_per_training_step():
    h = UncertaintyHistory(decay=0.5).update([2.0, 4.0])
    assert (h.mean, h.var, h.count) == (3.0, 1.0, 2)  # the step's own mean and variance
    h2 = h.update([7.0])  # one segment weighs as much as a whole step: decay is per step
    assert h2.mean == pytest.approx(0.5 * 3.0 + 0.5 * 7.0)
    assert h2.var == pytest.approx(0.5 * (1.0 + 2.0**2) + 0.5 * (0.0 + 2.0**2))  # mixture around 5
    assert h2.count == 3
    assert UncertaintyHistory().update([float("nan")]).count == 0
    assert UncertaintyHistory().update([]) == UncertaintyHistory()


def test_history_is_independent_of_the_order_segments_closed():
    rng = random.Random(0)
    steps = [[rng.lognormvariate(0, 1) for _ in range(rng.randint(1, 60))] for _ in range(30)]
    a = b = UncertaintyHistory()
    for values in steps:
        shuffled = values[:]
        rng.shuffle(shuffled)
        a, b = a.update(values), b.update(shuffled)
        assert a == b  # bit for bit


@pytest.mark.parametrize("generators", [2, 4])
def test_n_generators_hold_what_one_generator_would(generators):
    """Each step the segments are split across generators and pooled once: the same history as one
    generator that saw them all, with a count that grows linearly (it once grew x N per step and
    overflowed after ~510 steps with 4 generators)."""
    rng = random.Random(generators)
    one = pooled = UncertaintyHistory()
    for step in range(1, 1001):
        values = [rng.gauss(3.0, 1.0) for _ in range(16)]
        shards = [values[i::generators] for i in range(generators)]
        one = one.update(values)
        pooled = pooled.update([u for shard in shards for u in shard])
        assert pooled == one and pooled.count == 16 * step
    assert math.isfinite(pooled.mean) and pooled.mean == pytest.approx(3.0, abs=0.5)


def test_first_attempt_mask_takes_every_judged_first_attempt_kept_or_erased():
    tau = torch.tensor([2.0, 2.0, math.inf, math.nan, 2.0, 2.0])
    erase_count = torch.tensor([0, 0, 0, 0, 1, 0])
    # kept | erased (U measured before the decision) | judged without a reference | never judged
    # (stream cap) | a regeneration (judged against a raised tau) | kept over tau (budget ran out)
    assert first_attempt_mask(tau, erase_count).tolist() == [True, True, True, False, False, True]


@pytest.mark.parametrize("df", [1.0, 2.0, 7.5, 15.0])
def test_t_upper_tail_matches_mpmath_far_into_the_tail(df):
    mpmath = pytest.importorskip("mpmath")
    for t in (0.0, 0.3, 1.0, 3.0, 10.0, 100.0, -2.0):
        x = df / (df + t * t)
        half = 0.5 * mpmath.betainc(df / 2, 0.5, 0, x, regularized=True)
        want = float(half if t >= 0 else 1 - half)
        assert t_upper_tail(t, df) == pytest.approx(want, rel=1e-12)
    assert t_upper_tail(math.inf, df) == 0.0 and t_upper_tail(-math.inf, df) == 1.0


def test_normal_score_inverts_the_t_quantile_at_every_df():
    for df in (1.0, 2.0, 8.0, 30.5):
        for k in (-1.5, 0.5, 1.0, 2.5):
            assert normal_score_of_t(t_quantile_at_normal(k, df), df) == pytest.approx(k, abs=1e-6)
    assert normal_score_of_t(1.7, math.inf) == 1.7  # a known spread: the gap is already a normal score
    assert normal_score_of_t(1e6, 1.0) == pytest.approx(-NormalDist().inv_cdf(1 / (math.pi * 1e6)), rel=1e-6)


def test_a_first_attempt_crosses_tau_exactly_when_its_score_passes_the_cut():
    p = ThresholdParams()
    ref = segment_reference([1.0, 2.5, 2.0], UncertaintyHistory(mean=2.0, var=0.5, count=100), p)
    assert ref.df == pytest.approx(2 + p.spread_prior)
    for cut in (0.6, 1.0, 1.4):
        tau = threshold_from(ref, 0, cut, p)
        for u in (tau - 1e-6, tau + 1e-6):
            assert (u > tau) == (gap_score(u, ref) > cut)
    assert gap_score(5.0, None) != gap_score(5.0, None)  # no reference: nan
    assert gap_score(2.0, Reference(2.0, 0.0, 3.0)) == 0.0 and gap_score(2.5, Reference(2.0, 0.0, 3.0)) == math.inf


def test_history_calibrates_the_cut_from_steps_judged_with_a_history():
    k = 1.0
    rate = 1 - NormalDist().cdf(k)
    scores = [i / 100 for i in range(-200, 201)]  # 401 evenly spaced scores
    want = sorted(scores)[0] + (1 - rate) * (len(scores) - 1) / 100  # the (1 - rate) order statistic
    h = UncertaintyHistory(decay=0.9).update([1.0, 2.0], scores, k)
    assert (h.cut_steps, h.cut_for(k)) == (0, k)  # the first step was judged without a history
    h = h.update([1.0, 2.0], scores, k)
    assert h.cut_steps == 1 and h.cut == pytest.approx(want) and h.cut_for(k) == h.cut
    h2 = h.update([1.0], [s + 1.0 for s in scores], k)  # second calibrated step: weight max(0.1, 1/2)
    assert h2.cut == pytest.approx(want + 0.5)
    assert h2.update([1.0], [math.nan], k).cut == h2.cut  # no score (no reference): the cut stays


def test_history_weights_early_steps_as_an_average_then_as_an_ema():
    h = UncertaintyHistory(decay=0.9)
    for x in (1.0, 2.0, 3.0):
        h = h.update([x])
    assert h.mean == pytest.approx(2.0)  # steps 1-3 weigh 1/1, 1/2, 1/3: their average
    for _ in range(20):
        h = h.update([10.0])
    # steps 4..10 weigh 1/4..1/10 (the old mean keeps 3/4 * ... * 9/10 = 3/10), then 1 - decay
    assert h.steps == 23 and h.mean == pytest.approx(10.0 - 8.0 * 0.3 * 0.9 ** 13)
    saved = UncertaintyHistory(mean=2.0, var=1.0, count=500)  # a checkpoint from before steps were counted
    assert saved.update([10.0]).mean == pytest.approx(0.95 * 2.0 + 0.05 * 10.0)  # past its horizon


def test_budgets_gate_the_decision():
    u = torch.tensor([5.0, 5.0, 5.0, 0.0, float("nan")])
    tau = torch.tensor([1.0] * 5)
    out = should_erase(u, tau, torch.tensor([0, 2, 0, 0, 0]), torch.tensor([0, 0, 5, 0, 0]), 2, 5)
    assert out.tolist() == [True, False, False, False, False]


@pytest.mark.parametrize("seed", range(20))
def test_erase_loop_terminates_for_any_surprisal(seed):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(50, 50, generator=g) * 10 ** torch.randint(-3, 4, (1,), generator=g).item()
    table[torch.rand(50, 50, generator=g) < 0.1] = math.inf
    p = ThresholdParams(k=-5.0)  # adversarial: threshold far below every value
    num_segments, b_seg, b_traj = 16, 3, 5
    closes, erases = simulate_erase_loop(lambda n, a: table[n, a], num_segments, UncertaintyHistory(mean=0, count=1),
                                         p, b_seg, b_traj, others=torch.tensor([0.0, 0.0]))
    assert erases <= b_traj and closes == num_segments + erases


def test_erase_loop_with_zero_budget_never_erases():
    closes, erases = simulate_erase_loop(lambda n, a: math.inf, 8, UncertaintyHistory(count=1), ThresholdParams(), 0, 0)
    assert (closes, erases) == (8, 0)

import math

import pytest
import torch

from e3rl.core.threshold import (ThresholdParams, UncertaintyHistory, segment_threshold, should_erase,
                                 simulate_erase_loop)
from e3rl.core.uncertainty import UncertaintyWeights, moving_average, segment_uncertainty, uncertainty_components


def test_components_hand_computed():
    s = torch.tensor([1.0, 1.0, 4.0, 4.0, 1.0])
    mean, peak, delta = uncertainty_components(s, prev_mean=1.0, window=2)
    assert mean == pytest.approx(2.2) and peak == pytest.approx(4.0) and delta == pytest.approx(1.2)
    assert uncertainty_components(s, prev_mean=5.0, window=2)[2] == 0.0  # a drop is not a defect
    u = segment_uncertainty(s, 1.0, UncertaintyWeights(mean=1.0, peak=0.5, delta=0.25, window=2))
    assert u == pytest.approx(2.2 + 2.0 + 0.3)


def test_moving_average_short_segment():
    assert torch.allclose(moving_average(torch.tensor([1.0, 3.0]), 4), torch.tensor([2.0]))
    assert torch.allclose(moving_average(torch.tensor([1.0, 3.0, 5.0]), 2), torch.tensor([2.0, 4.0]))


def test_group_threshold_mean_plus_k_std_and_exponential_penalty():
    p = ThresholdParams(k=1.0, penalty_scale=0.5, penalty_base=2.0, history_weight=0.5, min_peers=2)
    peers = torch.tensor([1.0, 2.0, 3.0, 4.0])  # mean 2.5, population std sqrt(1.25)
    sd = math.sqrt(1.25)
    tau0 = segment_threshold(peers, 0, UncertaintyHistory(), p)
    assert tau0 == pytest.approx(2.5 + sd)
    taus = [segment_threshold(peers, e, UncertaintyHistory(), p) for e in range(4)]
    gaps = [taus[i + 1] - taus[i] for i in range(3)]
    assert gaps[1] == pytest.approx(2 * gaps[0]) and gaps[2] == pytest.approx(4 * gaps[0])  # 0.5*sd*2^e


def test_history_modulates_and_substitutes():
    p = ThresholdParams(k=1.0, history_weight=0.5, min_peers=2)
    hist = UncertaintyHistory(mean=4.0, var=0.0, count=10)
    peers = torch.tensor([1.0, 1.0])
    assert segment_threshold(peers, 0, hist, p) == pytest.approx(0.5 * 1.0 + 0.5 * 4.0)
    assert segment_threshold(torch.tensor([9.0]), 0, hist, p) == pytest.approx(4.0)  # too few peers
    assert segment_threshold(torch.tensor([9.0]), 0, UncertaintyHistory(), p) == math.inf  # no reference


def test_history_ema_and_merge():
    h = UncertaintyHistory(decay=0.5).update([2.0, 4.0])
    assert h.mean == pytest.approx(3.0) and h.var == pytest.approx(0.5 * (0 + 0.5 * 4)) and h.count == 2
    m = UncertaintyHistory.merge([UncertaintyHistory(mean=1.0, var=0.0, count=1), UncertaintyHistory(mean=3.0, var=0.0, count=1)])
    assert m.mean == pytest.approx(2.0) and m.var == pytest.approx(1.0) and m.count == 2
    assert UncertaintyHistory().update([float("nan")]).count == 0


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
    closes, erases = simulate_erase_loop(lambda n, a: table[n, a], num_segments, UncertaintyHistory(mean=0, count=1), p, b_seg, b_traj,
                                         peers=torch.tensor([0.0, 0.0]))
    assert erases <= b_traj and closes == num_segments + erases


def test_erase_loop_with_zero_budget_never_erases():
    closes, erases = simulate_erase_loop(lambda n, a: math.inf, 8, UncertaintyHistory(count=1), ThresholdParams(), 0, 0)
    assert (closes, erases) == (8, 0)

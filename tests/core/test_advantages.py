import pytest
import torch

from e3rl.core.advantages import (AllocationInputs, attention_mass_per_segment, attention_weights, drgrpo_advantages,
                                  grpo_advantages, segment_advantages, segment_weights, token_advantages,
                                  uncertainty_weights)


def test_grpo_textbook_worked_example():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    a = grpo_advantages(r)
    # group 0: mean 0.5, population std 0.5 -> +-1; group 1: all equal -> 0
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.allclose(a[1], torch.zeros(4))
    assert torch.allclose(drgrpo_advantages(r)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_uniform_allocation_is_plain_grpo():
    x = AllocationInputs(advantage=0.7, uncertainty=torch.tensor([1.0, 5.0, 2.0]),
                         attention_mass=torch.tensor([0.9, 0.1, 0.0]))
    w = segment_weights("uniform", x, mix=0.5)
    seg_adv = segment_advantages(0.7, w, torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.bool), "contrast", 0.5)
    assert torch.allclose(seg_adv, torch.full((3,), 0.7))
    # any allocator with mix 0 is uniform too
    assert torch.allclose(segment_weights("attention", x, mix=0.0), torch.ones(3))


def test_attention_allocation_hand_computed():
    # K=3: answer segment keeps 1/3; the other 2/3 split 3:1 by mass -> shares [0.5, 1/6, 1/3] -> x3
    x = AllocationInputs(advantage=1.0, uncertainty=torch.zeros(3), attention_mass=torch.tensor([0.3, 0.1, 0.6]))
    assert torch.allclose(attention_weights(x), torch.tensor([1.5, 0.5, 1.0]))
    assert torch.allclose(segment_weights("attention", x, mix=0.5), torch.tensor([1.25, 0.75, 1.0]))


def test_attention_mass_per_segment_ignores_prompt_and_erased_columns():
    attn = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])  # [Q=2, T=4]
    col = torch.tensor([-1, 0, -1, 1])  # col 0 prompt, col 2 erased
    assert torch.allclose(attention_mass_per_segment(attn, col, 2), torch.tensor([0.25, 0.25]))


def test_uncertainty_allocation_blames_uncertain_segments_of_failures():
    u = torch.tensor([1.0, 3.0])
    w_fail = uncertainty_weights(AllocationInputs(advantage=-1.0, uncertainty=u))
    w_succ = uncertainty_weights(AllocationInputs(advantage=1.0, uncertainty=u))
    assert w_fail[1] > w_fail[0] and w_succ[0] > w_succ[1]
    assert w_fail.mean().item() == pytest.approx(1.0)


def test_erased_credit_modes():
    w = torch.tensor([1.0, 1.0])
    pos = torch.tensor([0, 0, 1])
    erased = torch.tensor([True, False, False])
    for adv, expect in [(1.0, -0.5), (-1.0, -1.5)]:  # contrast: min(A,0) - 0.5|A|
        out = segment_advantages(adv, w, pos, erased, "contrast", 0.5)
        assert out.tolist() == pytest.approx([expect, adv, adv])
    assert segment_advantages(1.0, w, pos, erased, "zero", 0.5).tolist() == [0.0, 1.0, 1.0]
    assert segment_advantages(1.0, w, pos, erased, "same", 0.5).tolist() == [1.0, 1.0, 1.0]


def test_token_advantages_expand():
    assert token_advantages(torch.tensor([0.1, 0.2]), torch.tensor([0, 0, 1])).tolist() == pytest.approx([0.1, 0.1, 0.2])


@pytest.mark.parametrize("estimator", [grpo_advantages, drgrpo_advantages])
@pytest.mark.parametrize("value", [2 / 3, 0.1, 0.3, 0.7, 1 / 7, 0.0, 1.0, -0.45])
@pytest.mark.parametrize("size", [2, 7, 8, 16, 64])
def test_constant_group_gets_exactly_zero_advantage(estimator, value, size):
    # float32 mean of 8 x 2/3 misses 2/3 by an ulp; divided by a ~1e-8 std that gave A = 0.056
    for dtype in (torch.float32, torch.float64):
        r = torch.full((3, size), value, dtype=dtype)
        r[1] = torch.arange(size, dtype=dtype) % 2  # an ordinary group in the same batch
        a = estimator(r)
        assert a.dtype == torch.float32
        assert (a[0] == 0).all() and (a[2] == 0).all()
        assert (a[1] != 0).all()


def test_ordinary_groups_unchanged():
    torch.manual_seed(0)
    r = torch.rand(5, 8)
    r32 = r.float()
    old_grpo = (r32 - r32.mean(-1, keepdim=True)) / (r32.std(-1, unbiased=False, keepdim=True) + 1e-6)
    assert torch.allclose(grpo_advantages(r), old_grpo, atol=1e-5)
    assert torch.allclose(drgrpo_advantages(r), r32 - r32.mean(-1, keepdim=True), atol=1e-6)
    a = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))  # mean 1/4, std sqrt(3)/4
    assert a[0].tolist() == pytest.approx([3 ** 0.5, -(3 ** -0.5), -(3 ** -0.5), -(3 ** -0.5)], rel=1e-5)

import math

import pytest
import torch

from e3rl.core.loss import LOSSES, LossInputs, LossSettings, aggregate


def _inputs(logp, old, adv, mask=None, ref=None):
    logp = torch.tensor(logp, requires_grad=True)
    mask = torch.ones_like(logp) if mask is None else torch.tensor(mask)
    return LossInputs(logp, torch.tensor(old), torch.tensor(adv), mask, None if ref is None else torch.tensor(ref))


def test_clip_loss_hand_computed_with_clip_higher():
    # ratios e^0.5=1.65 (A>0 -> clipped at 1.28), e^-0.5=0.61 (A>0 -> unclipped), 1.0 (A<0)
    x = _inputs([[0.5, -0.5, 0.0]], [[0.0, 0.0, 0.0]], [[1.0, 1.0, -2.0]])
    loss, m = LOSSES["clip"](x, LossSettings(clip_low=0.2, clip_high=0.28))
    expect = -(1.28 + math.exp(-0.5) - 2.0) / 3
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    assert m["clip_frac"] == pytest.approx(1 / 3)
    loss.backward()
    assert x.logp.grad[0, 0] == 0.0  # clipped token gets no gradient


def test_aggregations_and_global_denominators():
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate(x, m, LossSettings(agg="token_mean")).item() == pytest.approx(2.0)
    assert aggregate(x, m, LossSettings(agg="seq_mean_token_mean")).item() == pytest.approx((1.5 + 3.0) / 2)
    assert aggregate(x, m, LossSettings(agg="seq_mean_token_sum_norm", norm_len=4)).item() == pytest.approx((3 / 4 + 3 / 4) / 2)
    # micro-batches with global denominators sum to the full-batch value
    s = LossSettings(agg="token_mean", total_tokens=3.0)
    assert (aggregate(x[:1], m[:1], s) + aggregate(x[1:], m[1:], s)).item() == pytest.approx(2.0)
    s = LossSettings(agg="seq_mean_token_mean", total_seqs=2.0)
    assert (aggregate(x[:1], m[:1], s) + aggregate(x[1:], m[1:], s)).item() == pytest.approx(2.25)


def test_k3_kl_to_reference():
    x = _inputs([[0.0]], [[0.0]], [[0.0]], ref=[[math.log(0.5)]])
    loss, m = LOSSES["clip"](x, LossSettings(kl_coef=0.1))
    d = math.log(0.5)
    assert loss.item() == pytest.approx(0.1 * (math.exp(d) - d - 1))


def test_gspo_uses_one_ratio_per_sequence():
    x = _inputs([[0.2, -0.2, 0.1]], [[0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0]], mask=[[1.0, 1.0, 0.0]])
    loss, _ = LOSSES["gspo"](x, LossSettings(clip_low=0.5, clip_high=0.5))
    assert loss.item() == pytest.approx(-1.0, rel=1e-6)  # mean log-ratio 0 over the 2 masked-in tokens
    loss.backward()
    assert torch.allclose(x.logp.grad, torch.tensor([[-0.5, -0.5, 0.0]]))


def test_masked_tokens_do_not_leak():
    x = _inputs([[5.0, 0.0]], [[0.0, 0.0]], [[1.0, 1.0]], mask=[[0.0, 1.0]])
    loss, m = LOSSES["clip"](x, LossSettings())
    assert loss.item() == pytest.approx(-1.0) and m["tokens"] == 1.0


def test_every_loss_reports_the_same_metrics():
    keys = {"clip_frac", "approx_kl", "ratio_mean", "ref_kl", "tokens"}
    for name, fn in LOSSES.items():
        _, m = fn(_inputs([[0.1, -0.2]], [[0.0, 0.0]], [[1.0, -1.0]]), LossSettings())
        assert set(m) == keys, name


def test_sapo_far_off_policy_is_finite_with_no_gradient():
    x = _inputs([[200.0, 0.0]], [[0.0, 0.0]], [[1.0, 1.0]])  # r = e^200 overflows float32 unclamped
    loss, m = LOSSES["sapo"](x, LossSettings())
    loss.backward()
    assert torch.isfinite(loss) and x.logp.grad[0, 0] == 0.0 and m["clip_frac"] == pytest.approx(0.5)


def test_behaviour_logprobs_recompute_makes_tis_a_no_op():
    """`recompute`: pi_gen = pi_old (detached), so TIS weights are exactly 1 on trained tokens;
    `generator`: the engine's numbers pass through untouched."""
    from e3rl.core.loss import behaviour_logprobs, truncated_is_weight

    old = torch.randn(2, 5, requires_grad=True)
    gen = old.detach() + 0.3 * torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    assert torch.equal(behaviour_logprobs("generator", old, gen), gen)
    same = behaviour_logprobs("recompute", old, gen)
    assert not same.requires_grad and torch.equal(truncated_is_weight(old, same, 2.0, mask), mask)
    assert not torch.equal(truncated_is_weight(old, gen, 2.0, mask), mask)
    with pytest.raises(ValueError, match="generator | recompute"):
        behaviour_logprobs("engine", old, gen)

"""Losses against hand-computed numbers: every expected value is a typed constant, worked out with
a calculator (the arithmetic is in the comment next to it), never by calling e3rl code."""
import math

import pytest
import torch

from e3rl.core.loss import LOSSES, LossInputs, LossSettings, truncated_is_weight

D = torch.float64


def _inputs(ratio, adv, mask=None, old=None, ref=None, is_weight=None):
    """Token ratios r given directly: old_logp = log p_old (default log 0.5), logp = old + log r."""
    r = torch.tensor(ratio, dtype=D)
    old = torch.full_like(r, math.log(0.5)) if old is None else torch.tensor(old, dtype=D)
    logp = (old + r.log()).requires_grad_(True)
    mask = torch.ones_like(r) if mask is None else torch.tensor(mask, dtype=D)
    ref = None if ref is None else torch.tensor(ref, dtype=D)
    return LossInputs(logp, old, torch.tensor(adv, dtype=D), mask, ref, is_weight)


def _check(loss, x, expect_loss, expect_grad):
    assert loss.item() == pytest.approx(expect_loss, rel=1e-6, abs=1e-12)
    loss.backward()
    for got, want in zip(x.logp.grad.flatten().tolist(), expect_grad):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12)


# ---- clip: eps_low = 0.2 (floor 0.8), eps_high = 0.28 (ceiling 1.28) ------------------------------
# seq 0: r 1.5, A +1  -> above 1.28 with A > 0: clipped, L = -1.28
#        r 0.7, A -2  -> below 0.8 with A < 0: clipped, L = -min(-1.4, -1.6) = 1.6
#        r 1.1, A +.5 -> inside,                         L = -0.55
# seq 1: r 0.6, A +1  -> below the floor but A > 0: kept, L = -0.6
#        r 1.4, A -1  -> above the ceiling but A < 0: kept, L = 1.4
#        (padding: r 1.8, A +3, masked out)
CLIP_X = dict(ratio=[[1.5, 0.7, 1.1], [0.6, 1.4, 1.8]], adv=[[1.0, -2.0, 0.5], [1.0, -1.0, 3.0]],
              mask=[[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


@pytest.mark.parametrize("agg, expect_loss, expect_grad", [
    # (-1.28 + 1.6 - 0.55 - 0.6 + 1.4) / 5 = 0.57 / 5; grad -r*A/5: -1.1*0.5/5, -0.6*1/5, -1.4*(-1)/5
    ("token_mean", 0.114, [0.0, 0.0, -0.11, -0.12, 0.28, 0.0]),
    # ((-0.23) / 3 + 0.8 / 2) / 2 = 0.1616667; grad -r*A/(len*2): -0.55/6, -0.6/4, 1.4/4
    ("seq_mean_token_mean", 0.1616667, [0.0, 0.0, -0.09166667, -0.15, 0.35, 0.0]),
    # ((-0.23) / 4 + 0.8 / 4) / 2 = 0.07125 (norm_len 4); grad -r*A/(4*2): -0.55/8, -0.6/8, 1.4/8
    ("seq_mean_token_sum_norm", 0.07125, [0.0, 0.0, -0.06875, -0.075, 0.175, 0.0]),
])
def test_clip_reference(agg, expect_loss, expect_grad):
    x = _inputs(**CLIP_X)
    loss, m = LOSSES["clip"](x, LossSettings(clip_low=0.2, clip_high=0.28, agg=agg, norm_len=4))
    _check(loss, x, expect_loss, expect_grad)
    assert x.logp.grad[0, 0] == 0.0 and x.logp.grad[0, 1] == 0.0  # exactly zero where clipped
    assert m["clip_frac"] == pytest.approx(0.4)  # 2 clipped / 5 tokens
    assert m["tokens"] == 5.0


# ---- gspo: eps_low = 3e-4 (floor 0.9997), eps_high = 4e-4 (ceiling 1.0004) -----------------------
# seq 0: log r [3e-4, -1e-4, (0.5 masked)] -> mean 1e-4, s = e^1e-4 = 1.000100005: inside, A +1
# seq 1: log r [1e-3, 2e-3, 3e-4]          -> mean 1.1e-3, s = 1.001100605 > 1.0004, A +2: clipped
# seq 2: log r [-1e-3, -5e-4, -1.5e-3]     -> mean -1e-3, s = 0.9990005 < 0.9997, A -2: clipped
GSPO_X = dict(ratio=[[math.exp(3e-4), math.exp(-1e-4), math.exp(0.5)],
                     [math.exp(1e-3), math.exp(2e-3), math.exp(3e-4)],
                     [math.exp(-1e-3), math.exp(-5e-4), math.exp(-1.5e-3)]],
              adv=[[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [-2.0, -2.0, -2.0]],
              mask=[[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])


@pytest.mark.parametrize("agg, expect_loss, seq0_grad", [
    # per seq L: -1.000100005, -1.0004*2 = -2.0008, -(0.9997*-2) = 1.9994
    # (-1.000100005 - 2.0008 + 1.9994) / 3 = -0.3338333; seq 0 grad -s*A/(2 tokens * 3 seqs) = -1.000100005/6
    ("seq_mean_token_mean", -0.3338333350, -0.1666833342),
    # (-1.000100005*2 - 2.0008*3 + 1.9994*3) / 8 = -2.00440001 / 8; grad -1.000100005/8
    ("token_mean", -0.2505500013, -0.1250125006),
])
def test_gspo_reference(agg, expect_loss, seq0_grad):
    x = _inputs(**GSPO_X)
    loss, m = LOSSES["gspo"](x, LossSettings(clip_low=3e-4, clip_high=4e-4, agg=agg))
    _check(loss, x, expect_loss, [seq0_grad, seq0_grad] + [0.0] * 7)  # clipped sequences: all zero
    assert m["clip_frac"] == pytest.approx(0.75)  # 6 of 8 tokens in clipped sequences
    assert m["ratio_mean"] == pytest.approx(1.000062916, rel=1e-8)  # (2*1.000100005 + 3*1.001100605 + 3*0.9990005) / 8


# ---- sapo: gate f(r) = sigmoid(tau (r - 1)) * 4 / tau, tau_pos 1.0, tau_neg 1.05 -----------------
# sigmoid(z) = 1 / (1 + e^-z); gradient weight w = 4 sig (1 - sig)
#   tau 1.0:  r 0.8: sig(-0.2)  = 0.4501660, f = 1.800664, w = 0.9900663
#             r 1.0: sig(0)     = 0.5,       f = 2,        w = 1
#             r 1.3: sig(0.3)   = 0.5744425, f = 2.297770, w = 0.9778332
#   tau 1.05: r 0.8: sig(-0.21) = 0.4476921, f = 1.705494, w = 0.9890555
#             r 1.0: sig(0)     = 0.5,       f = 2 / 1.05 = 1.904762, w = 1
#             r 1.3: sig(0.315) = 0.5781052, f = 2.202306, w = 0.9755983
@pytest.mark.parametrize("r, adv, gate, weight", [
    (0.8, 1.0, 1.800664011, 0.9900662908),
    (1.0, 1.0, 2.0, 1.0),
    (1.3, 1.0, 2.297770067, 0.9778332468),
    (0.8, -1.0, 1.705493678, 0.9890555304),
    (1.0, -1.0, 1.904761905, 1.0),
    (1.3, -1.0, 2.202305649, 0.9755982904),
])
def test_sapo_gate_single_token(r, adv, gate, weight):
    x = _inputs([[r]], [[adv]])
    loss, m = LOSSES["sapo"](x, LossSettings(tau_pos=1.0, tau_neg=1.05))
    _check(loss, x, -gate * adv, [-weight * r * adv])  # L = -f A, dL/dlogp = -w r A
    assert m["clip_frac"] == pytest.approx(1 - weight, abs=1e-9)


def test_sapo_batch_reference():
    # seq 0 A +0.5 (tau 1.0), seq 1 A -2 (tau 1.05), both at r = 0.8, 1.0, 1.3; token mean over 6
    x = _inputs([[0.8, 1.0, 1.3], [0.8, 1.0, 1.3]], [[0.5, 0.5, 0.5], [-2.0, -2.0, -2.0]])
    loss, m = LOSSES["sapo"](x, LossSettings())  # defaults tau_pos 1.0, tau_neg 1.05
    # L: -0.5*[1.800664, 2, 2.297770] = [-0.9003320, -1, -1.148885]
    #    +2*[1.705494, 1.904762, 2.202306] = [3.410987, 3.809524, 4.404611]; sum 8.575905 / 6
    # grad -w r A / 6: -0.5*[0.9900663*0.8, 1, 0.9778332*1.3]/6, 2*[0.9890555*0.8, 1, 0.9755983*1.3]/6
    _check(loss, x, 1.429317571, [-0.06600441939, -0.08333333333, -0.1059319351,
                                  0.2637481414, 0.3333333333, 0.4227592592])
    # at r = 1 the gradient is the plain policy gradient -A/6: -0.5/6 and 2/6 (in the list above)
    # removed share: (6 - 0.9900663 - 1 - 0.9778332 - 0.9890555 - 1 - 0.9755983) / 6
    assert m["clip_frac"] == pytest.approx(0.01124110694, rel=1e-6)


# ---- truncated importance sampling: cap 2 ----------------------------------------------------------
def test_truncated_is_weight_values():
    gen = torch.tensor([[-1.0, -2.0, -3.0, -0.5]], dtype=D)
    old = gen + torch.tensor([[0.1, -0.3, 1.0, 5.0]], dtype=D)
    w = truncated_is_weight(old, gen, 2.0, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    # e^0.1 = 1.105171, e^-0.3 = 0.7408182, min(e^1 = 2.718282, 2) = 2, masked out -> 0
    assert w.dtype == torch.float32 and not w.requires_grad
    assert w.tolist()[0] == pytest.approx([1.105170918, 0.7408182207, 2.0, 0.0], rel=1e-6)


def test_truncated_is_weight_cannot_overflow():
    old = torch.tensor([[1000.0, 0.0]])
    gen = torch.tensor([[-1000.0, float("nan")]])  # e^2000 overflows without the clamp; NaN is masked out
    w = truncated_is_weight(old, gen, 3.0, torch.tensor([[1.0, 0.0]]))
    assert w.tolist() == [[3.0, 0.0]]
    with pytest.raises(ValueError, match="cap > 0"):
        truncated_is_weight(old, gen, 0.0, torch.ones(1, 2))


def test_clip_loss_with_tis_weight_and_unweighted_kl():
    # weights [e^0.1, e^-0.3, 2] from the test above; ratios r 1.1 (A +1, inside), 1.5 (A +1, clipped
    # at 1.28), 0.9 (A -1, inside); k3 KL (coef 0.1) on token 0 only: ref = logp + log 0.5
    w = torch.tensor([[1.105170918, 0.7408182207, 2.0]], dtype=D, requires_grad=True)
    old = [[math.log(0.5), math.log(0.5), math.log(0.5)]]
    logp0 = math.log(0.5) + math.log(1.1)
    x = _inputs([[1.1, 1.5, 0.9]], [[1.0, 1.0, -1.0]], old=old,
                ref=[[logp0 + math.log(0.5), math.log(0.5) + math.log(1.5), math.log(0.5) + math.log(0.9)]],
                is_weight=w)
    loss, _ = LOSSES["clip"](x, LossSettings(kl_coef=0.1))
    # policy: -1.1*1.105171 = -1.215688, -1.28*0.7408182 = -0.9482473, 0.9*2 = 1.8; sum -0.3639353
    # k3 at d = log 0.5: 0.5 - log 0.5 - 1 = 0.1931472, times 0.1 -> 0.01931472 (not weighted)
    # (-0.3639353 + 0.01931472) / 3 = -0.1148735
    # grad token 0: -1.1*1.105171/3 + 0.1*(1 - e^d)/3 = -0.4052293 + 0.01666667; token 2: 0.9*2/3
    _check(loss, x, -0.1148735381, [-0.3885626700, 0.0, 0.6])
    assert w.grad is None  # the weight is a constant


@pytest.mark.parametrize("name, expect", [
    ("clip", -0.5),  # r = 1, A = 1: -1 * 0.5
    ("gspo", -0.5),
    ("sapo", -1.0),  # -sig(0) * 4 * 0.5 = -0.5 * 4 * 0.5
])
def test_is_weight_scales_every_loss(name, expect):
    x = _inputs([[1.0]], [[1.0]], is_weight=torch.tensor([[0.5]], dtype=D))
    loss, _ = LOSSES[name](x, LossSettings())
    assert loss.item() == pytest.approx(expect, rel=1e-9)

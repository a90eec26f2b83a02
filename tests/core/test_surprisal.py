import math

import torch

from e3rl.core.surprisal import token_entropy, token_logprobs, token_surprisal


def test_surprisal_matches_hand_computed_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    z = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    assert torch.allclose(token_surprisal(logits, torch.tensor([0])), torch.tensor([z - 1.0]))
    assert torch.allclose(token_surprisal(logits, torch.tensor([2])), torch.tensor([z - 3.0]))


def test_temperature_scales_sampling_distribution_only():
    logits = torch.tensor([[0.0, 2.0]])
    t = torch.tensor([1])
    q = math.exp(4.0) / (1 + math.exp(4.0))  # softmax(logits / 0.5)
    assert torch.allclose(token_logprobs(logits, t, 0.5), torch.tensor([math.log(q)]))
    assert torch.allclose(token_logprobs(logits, t, 0.0), token_logprobs(logits, t, 1.0))  # greedy scored at T=1


def test_stable_for_extreme_logits_and_low_precision():
    logits = torch.tensor([[1e4, -1e4, 0.0]], dtype=torch.bfloat16)
    s = token_surprisal(logits, torch.tensor([1]))
    assert torch.isfinite(s).all() and s.item() > 1e3
    assert token_surprisal(logits, torch.tensor([0])).item() == 0.0


def test_entropy_of_uniform_is_log_v():
    assert torch.allclose(token_entropy(torch.zeros(2, 8)), torch.full((2,), math.log(8)))

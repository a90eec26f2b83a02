"""Token surprisal: the model's own uncertainty signal, read off logits the decoder already has.

Temperature semantics. Two distributions exist while sampling at temperature T:
- the *policy* p(x) = softmax(z): the model itself. Surprisal under the policy, -log p(x_t), is
  the "local autoregressive cross-entropy" E3RL thresholds on; it does not change with T.
- the *sampling distribution* q(x) = softmax(z / T) (also top-k/top-p truncated). Behaviour
  log-probs for the importance ratio must match what the learner recomputes, so both sides use
  logits / T (as verl and OpenRLHF do). Greedy (T = 0) is scored under the policy.
"""
from __future__ import annotations

import torch


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T, with T = 0 (greedy) treated as T = 1 for scoring."""
    return logits if temperature in (0.0, 1.0) else logits / temperature


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log q(token) under softmax(logits / T), numerically stable (log_softmax in fp32).

    logits: [..., V]; tokens: [...] (int64) -> [...] float32.
    """
    z = scaled_logits(logits.float(), temperature)
    return z.log_softmax(-1).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def token_surprisal(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """-log p(token): the surprisal E3RL segments on. [..., V], [...] -> [...]; pass T = 1 for the policy."""
    return -token_logprobs(logits, tokens, temperature)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) per position. [..., V] -> [...]."""
    z = scaled_logits(logits.float(), temperature)
    logp = z.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)

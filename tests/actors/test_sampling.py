"""Sampling: greedy, top-k/top-p truncation, and reproducibility from a seeded generator."""
from __future__ import annotations

import torch

from actors.sampling import filter_logits, sample


def test_greedy_and_truncation():
    z = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9]])
    g = torch.Generator().manual_seed(0)
    assert sample(z, 0.0, 0, 1.0, g).tolist() == [1, 0]
    assert sample(z, 1.0, 1, 1.0, g).tolist() == [1, 0]  # top-1 is greedy
    assert sample(z, 1.0, 0, 1e-6, g).tolist() == [1, 0]  # a tiny nucleus keeps only the top token
    kept = torch.isfinite(filter_logits(z, top_k=2))
    assert kept.tolist() == [[False, True, False, True], [True, False, False, True]]
    p = z.softmax(-1)
    kept = torch.isfinite(filter_logits(z, top_p=0.8))
    for b in range(2):  # the nucleus is the smallest top set reaching the mass
        order = p[b].argsort(descending=True)
        n = int(kept[b].sum())
        assert p[b][order[: n - 1]].sum() < 0.8 <= p[b][order[:n]].sum()


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    z = torch.log(torch.tensor([[0.1, 0.2, 0.7]])).expand(4000, 3)
    draw = lambda seed: sample(z, 1.0, 0, 1.0, torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    freq = torch.bincount(draw(3), minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.7]), atol=0.03)
    top2 = sample(torch.tensor([[3.0, 0.0, 2.0, 2.5]]).expand(2000, 4), 1.0, 2, 1.0, torch.Generator().manual_seed(4))
    assert set(top2.tolist()) == {0, 3}  # filtered tokens are never drawn
    hot = torch.bincount(sample(z, 0.5, 0, 1.0, torch.Generator().manual_seed(3)), minlength=3).float() / 4000
    assert hot[2] > 0.85  # T = 0.5 sharpens: p ∝ p^2

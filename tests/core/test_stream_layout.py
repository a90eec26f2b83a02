"""The kept-first layout states exactly the dense stream visibility rule, without an [L, L] mask."""
import random

import pytest
import torch

from e3rl.core.stream_layout import kept_first_layout
from e3rl.core.trajectory import predecessor_index, stream_attention_mask
from tests.core.test_trajectory import ERASED_AT


def simulated_erased_at(n: int, seed: int, rewind_prob: float = 0.25) -> torch.Tensor:
    """Generate n stream tokens; before each, with some probability, erase a random suffix of what is
    visible (one segment or several: nested erasures, as a rewind to an earlier segment would)."""
    rng = random.Random(seed)
    erased_at, visible = [-1] * n, []
    for k in range(n):
        if visible and rng.random() < rewind_prob:
            for j in visible[-rng.randint(1, len(visible)):]:
                erased_at[j] = k
            visible = [j for j in visible if erased_at[j] < 0]
        visible.append(k)
    return torch.tensor(erased_at)


def _check(prompt_len: int, erased_at: torch.Tensor) -> None:
    lay = kept_first_layout(prompt_len, erased_at)
    n, s = prompt_len + erased_at.numel(), erased_at.numel()
    dense = stream_attention_mask(prompt_len, erased_at)[lay.order][:, lay.order]  # the rule, in the new order
    front = prompt_len + lay.kept
    assert sorted(lay.order.tolist()) == list(range(n))
    assert torch.equal(dense[:front], torch.ones(n, n, dtype=torch.bool).tril()[:front])  # kept: plain causal
    assert torch.equal(dense[front:], lay.erased_vis)
    assert torch.equal(lay.order[lay.stream_row], prompt_len + torch.arange(s))
    assert torch.equal(lay.order[lay.target_row], predecessor_index(prompt_len, erased_at))
    assert torch.equal(lay.erased_rows, torch.arange(front, n))


def test_hand_checked_example():
    lay = kept_first_layout(3, ERASED_AT)  # tokens 2,3,4 erased before 5; token 7 before 8
    assert lay.kept == 6
    assert lay.order.tolist() == [0, 1, 2, 3, 4, 8, 9, 11, 12, 5, 6, 7, 10]
    assert lay.erased_vis.int().tolist() == [
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0],  # token 2: prompt, kept 0,1, itself
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1],  # token 7: prompt, kept 0,1,5,6, itself
    ]
    _check(3, ERASED_AT)


@pytest.mark.parametrize("seed", range(40))
def test_random_streams_match_the_dense_rule(seed):
    erased_at = simulated_erased_at(n=1 + seed * 3, seed=seed, rewind_prob=0.1 + 0.02 * (seed % 20))
    _check(1 + seed % 4, erased_at)


def test_no_erasures_is_plain_causal():
    lay = kept_first_layout(4, torch.full((6,), -1))
    assert lay.order.tolist() == list(range(10)) and lay.erased_vis.shape == (0, 10)
    assert lay.target_row.tolist() == [3, 4, 5, 6, 7, 8]

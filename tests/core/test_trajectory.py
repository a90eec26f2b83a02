import pytest
import torch

from e3rl.core.trajectory import (SegmentTable, Trajectory, additive_mask, from_ipc_bytes, predecessor_index,
                                  stream_attention_mask, stream_position_ids, stream_visibility, to_ipc_bytes)

# stream of 10: tokens 2,3,4 erased by the rewind before token 5; token 7 erased before token 8
ERASED_AT = torch.tensor([-1, -1, 5, 5, 5, -1, -1, 8, -1, -1])


def _traj(reward=1.0):
    segs = SegmentTable(
        position=torch.tensor([0, 1, 1, 2, 2]), start=torch.tensor([0, 2, 5, 7, 8]), end=torch.tensor([2, 5, 7, 8, 10]),
        uncertainty=torch.tensor([1.0, 9.0, 2.0, 8.0, float("nan")]), threshold=torch.tensor([3.0, 3.0, 4.0, 3.0, float("inf")]),
        score=torch.tensor([-1.2, 2.5, 0.4, 1.9, float("nan")]),
        erase_count=torch.tensor([0, 0, 1, 0, 1]), erased=torch.tensor([False, True, False, True, False]))
    return Trajectory(prompt_ids=torch.tensor([5, 6, 7]), stream_ids=torch.arange(10, 20),
                      behavior_logp=torch.linspace(-2, -0.1, 10), surprisal=torch.linspace(0.1, 2, 10),
                      erased_at=ERASED_AT, position_ids=stream_position_ids(3, ERASED_AT), segments=segs,
                      group_id=4, sample_index=2, policy_version=7, prompt_uid="gym:chain_sum:3",
                      response_text="x y", finish_reason="eos", reward=reward, forward_tokens=13, rewinds=2)


def test_visibility_rule_hand_checked():
    vis = stream_visibility(ERASED_AT)
    assert vis[4].tolist() == [True] * 5 + [False] * 5  # before the rewind, token 4 saw 0..4
    assert vis[5].tolist() == [True, True, False, False, False, True] + [False] * 4
    assert vis[9].tolist() == [True, True, False, False, False, True, True, False, True, True]


def test_positions_and_predecessors():
    assert stream_position_ids(3, ERASED_AT).tolist() == [3, 4, 5, 6, 7, 5, 6, 7, 7, 8]
    # token 5 is predicted from token 1 (index 3+1); token 8 from token 6; token 0 from the prompt end
    assert predecessor_index(3, ERASED_AT).tolist() == [2, 3, 4, 5, 6, 4, 8, 9, 9, 11]


def test_full_mask_blocks():
    m = stream_attention_mask(3, ERASED_AT)
    assert m.shape == (13, 13)
    assert m[:3, :3].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert m[3:, :3].all() and not m[:3, 3:].any()
    a = additive_mask(m)
    assert a[0, 1] == torch.finfo(torch.float32).min and a[1, 0] == 0


def test_arrow_ipc_round_trip_is_exact():
    t = _traj()
    [back] = from_ipc_bytes(to_ipc_bytes([t]))
    for name in ["prompt_ids", "stream_ids", "behavior_logp", "surprisal", "erased_at", "position_ids"]:
        assert torch.equal(getattr(back, name), getattr(t, name)), name
    for name in ["position", "start", "end", "erase_count", "erased"]:
        assert torch.equal(getattr(back.segments, name), getattr(t.segments, name)), name
    assert torch.allclose(back.segments.uncertainty, t.segments.uncertainty, equal_nan=True)
    assert torch.equal(back.segments.threshold, t.segments.threshold)
    assert torch.allclose(back.segments.score, t.segments.score, equal_nan=True)
    assert (back.reward, back.group_id, back.policy_version, back.prompt_uid, back.rewinds) == (1.0, 4, 7, "gym:chain_sum:3", 2)
    assert back.token_segment().tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 4, 4]
    assert back.kept_ids.tolist() == [10, 11, 15, 16, 18, 19]


@pytest.mark.parametrize("family,attn", [("qwen3", "sdpa"), ("qwen3", "eager"), ("llama", "sdpa"), ("qwen2", "eager")])
def test_one_pass_stream_forward_equals_visible_context_forwards(family, attn):
    """The stream mask + logical positions make one forward reproduce what each token saw."""
    from e3rl.models import load_model
    from tests.conftest import tiny_model_config

    model = load_model(tiny_model_config(family, attn=attn), seed=1)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 1000, (6,), generator=g)
    stream = torch.randint(0, 1000, (10,), generator=g)
    p = prompt.numel()
    ids = torch.cat([prompt, stream]).unsqueeze(0)
    pos = torch.cat([torch.arange(p), stream_position_ids(p, ERASED_AT)]).unsqueeze(0)
    mask = additive_mask(stream_attention_mask(p, ERASED_AT))[None, None]
    with torch.no_grad():
        one_pass = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[0]
        vis = stream_visibility(ERASED_AT)
        for i in range(10):
            ctx = torch.cat([prompt, stream[vis[i]]]).unsqueeze(0)
            ref = model(input_ids=ctx, attention_mask=torch.ones_like(ctx)).logits[0, -1]
            assert torch.allclose(one_pass[p + i], ref, atol=1e-4), (i, (one_pass[p + i] - ref).abs().max())
    assert one_pass.abs().max() > 1.0  # logits far from uniform: the check could fail

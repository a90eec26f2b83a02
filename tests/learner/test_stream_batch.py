"""One stream forward (kept + erased tokens, stream mask, logical positions) equals separate
forwards of each token's visible context; the attention capture equals eager attention."""
import pytest
import torch

from e3rl.bench.learner import synthetic_trajectories
from e3rl.core.surprisal import token_logprobs
from e3rl.core.trajectory import predecessor_index, stream_visibility
from e3rl.models import load_model
from learner.stream_batch import (StreamPolicy, collate, install_attention_capture, policy_forward, split_attention,
                                  stream_logprobs)
from tests.conftest import tiny_model_config

T = 0.7


def _trajs(vocab: int = 49152):
    trajs = synthetic_trajectories(2, 2, prompt_len=5, seg_len=5, n_segments=3, erase_prob=0.7, vocab=vocab, seed=3)
    assert sum(int((t.erased_at >= 0).sum()) for t in trajs) > 0, "the batch must contain erased tokens"
    return trajs


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_one_pass_equals_separate_visible_context_forwards(family):
    model = load_model(tiny_model_config(family), seed=1)
    trajs = _trajs()
    batch = collate(trajs, pad_id=0)
    with torch.no_grad():
        one_pass = stream_logprobs(policy_forward(StreamPolicy(model), batch), batch, T)  # [B, S]
        worst = 0.0
        for i, t in enumerate(trajs):
            vis = stream_visibility(t.erased_at)
            for k in range(t.stream_ids.numel()):
                ctx = torch.cat([t.prompt_ids, t.stream_ids[[j for j in range(k) if vis[k, j]]]])
                logits = model(input_ids=ctx[None], logits_to_keep=1).logits[0, -1]  # what token k saw
                worst = max(worst, abs(float(token_logprobs(logits, t.stream_ids[k], T)) - float(one_pass[i, k])))
    assert worst < 1e-4, worst


def test_layout_padding_and_alignment():
    trajs = _trajs()
    b = collate(trajs, pad_id=0, answer_tokens=3)
    L, S = b.input_ids.shape[1], b.target_index.shape[1]
    assert b.attn_mask.shape == (len(trajs), 1, L, L)
    for i, t in enumerate(trajs):
        p, s = t.prompt_ids.numel(), t.stream_ids.numel()
        assert torch.equal(b.position_ids[i, :p], torch.arange(p))
        assert torch.equal(b.position_ids[i, p : p + s], t.position_ids)
        assert torch.equal(b.target_index[i, :s], predecessor_index(p, t.erased_at))
        assert torch.equal(b.behavior_logp[i, :s], t.behavior_logp) and b.mask[i, :s].all() and not b.mask[i, s:].any()
        kept = torch.nonzero(t.erased_at < 0).flatten()
        assert torch.equal(b.answer_index[i][b.answer_valid[i]], kept[-3:] + p)
        assert (b.attn_mask[i, 0, p + s :, : p + s] < 0).all()  # pad queries see no real token...
        assert (b.attn_mask[i, 0].diagonal() == 0).all()  # ...but themselves: softmax stays finite
    model = load_model(tiny_model_config(), seed=0)
    with torch.no_grad():
        full = model(input_ids=b.input_ids, attention_mask=b.attn_mask, position_ids=b.position_ids).logits
    assert torch.isfinite(full).all()


def test_attention_capture_equals_eager_attention_and_changes_nothing():
    trajs = _trajs()
    b = collate(trajs, pad_id=0, answer_tokens=4)
    model = load_model(tiny_model_config(), seed=2)
    policy = StreamPolicy(model)
    with torch.no_grad():
        before = policy_forward(policy, b)
        cap = install_attention_capture(model)
        cap.arm(b.answer_index)
        after = policy_forward(policy, b)
        attn = cap.disarm()  # [B, Q, L]
        eager = load_model(tiny_model_config(attn="eager"), seed=2)
        out = eager(input_ids=b.input_ids, attention_mask=b.attn_mask, position_ids=b.position_ids, output_attentions=True)
    assert torch.equal(before, after)
    ref = torch.stack(out.attentions).mean((0, 2))  # [B, L, L]: mean over layers and heads
    ref = ref.gather(1, b.answer_index[:, :, None].expand(-1, -1, ref.shape[-1]))
    assert (ref - attn)[b.answer_valid].abs().max() < 1e-5
    rows = split_attention(attn, b)
    for r, t in zip(rows, trajs):
        assert r.shape == (min(4, int((t.erased_at < 0).sum())), t.stream_ids.numel())
        assert (r[:, t.erased_at >= 0] < 1e-6).all()  # answer tokens never see erased tokens

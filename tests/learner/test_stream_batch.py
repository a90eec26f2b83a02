"""The learner's stream forward (kept-first rows, causal attention + erased rows' own visibility, no
[L, L] mask) equals separate forwards of each token's visible context and the dense-mask forward,
values and gradients; the attention capture equals eager attention under the dense mask."""
import dataclasses

import pytest
import torch

from e3rl.bench.learner import synthetic_trajectories
from e3rl.core.surprisal import token_logprobs
from e3rl.core.trajectory import SegmentTable, stream_position_ids, stream_visibility
from e3rl.models import load_model
from learner.stream_batch import StreamPolicy, collate, policy_forward, split_attention, stream_logprobs
from tests.conftest import tiny_model_config
from tests.core.test_stream_layout import simulated_erased_at
from e3rl.bench.dense_reference import dense_collate

T = 0.7


@pytest.fixture(params=["fused", "short", "packed"])
def pack(request, monkeypatch) -> int:
    """Every attention path: one row per sample through the fused causal kernel + erased pass or the
    short-row masked matmul, and shared-prompt rows. -> the collate's pack_tokens."""
    import learner.stream_batch as sb

    monkeypatch.setattr(sb, "CPU_SHORT_ROWS", 0 if request.param == "fused" else 10**6)
    return 10**6 if request.param == "packed" else 0


def _trajs(vocab: int = 49152):
    trajs = synthetic_trajectories(2, 2, prompt_len=5, seg_len=5, n_segments=3, erase_prob=0.7, vocab=vocab, seed=3)
    assert sum(int((t.erased_at >= 0).sum()) for t in trajs) > 0, "the batch must contain erased tokens"
    return trajs


def _nested_trajs(n: int = 3, vocab: int = 49152):
    """Streams whose rewinds erase several segments at once (nested erasures), of unequal lengths."""
    base = synthetic_trajectories(1, n, prompt_len=4, seg_len=3, n_segments=2, erase_prob=0.0, vocab=vocab, seed=5)
    g, out = torch.Generator().manual_seed(7), []
    for i, t in enumerate(base):
        ea = simulated_erased_at(14 + 5 * i, seed=11 + i, rewind_prob=0.3)
        p = t.prompt_ids.numel()
        out.append(dataclasses.replace(
            t, stream_ids=torch.randint(1, vocab, (ea.numel(),), generator=g), erased_at=ea,
            position_ids=stream_position_ids(p, ea), behavior_logp=torch.zeros(ea.numel()),
            surprisal=torch.zeros(ea.numel()), segments=SegmentTable.empty()))
    assert any(len(set(t.erased_at[t.erased_at >= 0].tolist())) < int((t.erased_at >= 0).sum()) for t in out)
    return out


@pytest.mark.parametrize("family,kind", [("qwen3", "segments"), ("llama", "segments"), ("qwen3", "nested")])
def test_one_pass_equals_separate_visible_context_forwards(family, kind, pack):
    model = load_model(tiny_model_config(family), seed=1)  # plain forwards: the policy gets its own copy
    trajs = _trajs() if kind == "segments" else _nested_trajs()
    batch = collate(trajs, pad_id=0, pack_tokens=pack)
    assert batch.packed == (pack > 0)
    with torch.no_grad():
        policy = StreamPolicy(load_model(tiny_model_config(family), seed=1))
        one_pass = stream_logprobs(policy_forward(policy, batch), batch, T)  # [N, S]
        worst = 0.0
        for i, t in enumerate(trajs):
            vis = stream_visibility(t.erased_at)
            for k in range(t.stream_ids.numel()):
                ctx = torch.cat([t.prompt_ids, t.stream_ids[[j for j in range(k) if vis[k, j]]]])
                logits = model(input_ids=ctx[None], logits_to_keep=1).logits[0, -1]  # what token k saw
                worst = max(worst, abs(float(token_logprobs(logits, t.stream_ids[k], T)) - float(one_pass[i, k])))
    assert worst < 1e-4, worst


@pytest.mark.parametrize("kind", ["segments", "nested"])
def test_stream_forward_equals_dense_mask_forward_values_and_gradients(kind, pack):
    """Against HF's own forward under the core's dense [L, L] mask, in stream order."""
    trajs = _trajs() if kind == "segments" else _nested_trajs()
    ref_model = load_model(tiny_model_config("qwen3", attn="eager"), seed=4)
    model = load_model(tiny_model_config("qwen3"), seed=4)
    d = dense_collate(trajs)
    out = ref_model(input_ids=d.input_ids, attention_mask=d.attn_mask, position_ids=d.position_ids, use_cache=False)
    ref_logits = out.logits.gather(1, d.target_index[..., None].expand(-1, -1, out.logits.shape[-1]))
    ref = token_logprobs(ref_logits, d.stream_ids, T) * d.mask
    b = collate(trajs, pad_id=0, pack_tokens=pack)
    logp = stream_logprobs(policy_forward(StreamPolicy(model), b), b, T)
    assert (logp - ref).abs().max() < 1e-5
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    (ref * w).sum().backward()
    (logp * w).sum().backward()
    for (name, p_ref), p in zip(ref_model.named_parameters(), model.parameters()):
        rel = float((p.grad - p_ref.grad).norm() / p_ref.grad.norm())  # fused vs math kernel: fp32 sum order
        assert rel < 1e-5, (name, rel)
    assert ref.abs().max() > 1.0


def test_layout_padding_and_alignment():
    trajs = _trajs()
    b = collate(trajs, pad_id=0, answer_tokens=3)
    L = b.input_ids.shape[1]
    assert not any(t.dim() >= 2 and t.shape[-1] == L and t.shape[-2] == L for t in dataclasses.astuple(b))  # no [L, L]
    for i, t in enumerate(trajs):
        p, s = t.prompt_ids.numel(), t.stream_ids.numel()
        kept, erased = t.erased_at < 0, t.erased_at >= 0
        k, e = int(kept.sum()), int(erased.sum())
        assert torch.equal(b.input_ids[i, : p + s], torch.cat([t.prompt_ids, t.stream_ids[kept], t.stream_ids[erased]]))
        assert torch.equal(b.position_ids[i, : p + s], torch.cat([torch.arange(p), t.position_ids[kept], t.position_ids[erased]]))
        assert torch.equal(b.input_ids[i, b.stream_rows[i, :s]], t.stream_ids)
        assert torch.equal(b.erased_rows[i][b.erased_valid[i]], torch.arange(p + k, p + s)) and b.erased_valid[i].sum() == e
        assert torch.equal(b.behavior_logp[i, :s], t.behavior_logp) and b.mask[i, :s].all() and not b.mask[i, s:].any()
        assert torch.equal(b.answer_index[i][b.answer_valid[i]], torch.arange(p + k - 3, p + k))
        assert b.erased_vis[i, 0].any(-1).all()  # padding entries see one key: softmax stays finite


def test_shared_prompt_rows_layout():
    trajs = _trajs()  # 2 prompts x 2 samples
    b = collate(trajs, pad_id=0, answer_tokens=3, pack_tokens=10**6)
    assert b.input_ids.shape[0] == 2 and b.sample_row.tolist() == [0, 0, 1, 1]
    for i, t in enumerate(trajs):
        p, s, row = t.prompt_ids.numel(), t.stream_ids.numel(), int(b.sample_row[i])
        assert torch.equal(b.input_ids[row, :p], t.prompt_ids)  # the prompt once, first
        assert torch.equal(b.input_ids[row, b.stream_rows[i, :s]], t.stream_ids)
        assert torch.equal(b.position_ids[row, b.stream_rows[i, :s]], t.position_ids)
        vis = b.packed_vis[row, 0]
        others = [j for j in range(len(trajs)) if j != i and int(b.sample_row[j]) == row]
        for j in others:  # members never see each other's streams
            cols = b.stream_rows[j, : trajs[j].stream_ids.numel()]
            assert not vis[b.stream_rows[i, :s]][:, cols].any()
        assert vis[b.stream_rows[i, :s], :p].all()  # and all see the prompt
    assert collate(trajs, 0, pack_tokens=20).packed is False  # a sample longer than the cap: no sharing


def test_attention_capture_equals_eager_attention_and_changes_nothing(pack):
    trajs = _nested_trajs()
    b = collate(trajs, pad_id=0, answer_tokens=4, pack_tokens=pack)
    model = load_model(tiny_model_config(), seed=2)
    policy = StreamPolicy(model)
    with torch.no_grad():
        before = policy_forward(policy, b)
        policy.capture.arm(b.answer_index, b.sample_row)
        after = policy_forward(policy, b)
        rows = split_attention(policy.capture.disarm(), b)  # per row [Q_b, S_b], stream order
        eager = load_model(tiny_model_config(attn="eager"), seed=2)
        d = dense_collate(trajs, answer_tokens=4)
        out = eager(input_ids=d.input_ids, attention_mask=d.attn_mask, position_ids=d.position_ids, output_attentions=True)
    assert torch.equal(before, after)
    ref = torch.stack(out.attentions).mean((0, 2))  # [B, L, L]: mean over layers and heads
    for i, (r, t) in enumerate(zip(rows, trajs)):
        p, s = t.prompt_ids.numel(), t.stream_ids.numel()
        expect = ref[i, d.answer_index[i][d.answer_valid[i]]][:, p : p + s]
        assert r.shape == expect.shape == (min(4, int((t.erased_at < 0).sum())), s)
        assert (r - expect).abs().max() < 1e-5
        assert (r[:, t.erased_at >= 0] < 1e-6).all()  # answer tokens never see erased tokens

"""Trajectories -> one padded forward over prompt + whole stream (kept AND erased tokens).

Each row is laid out kept-first (`e3rl.core.stream_layout`): prompt, kept stream tokens, erased
stream tokens, with their logical position ids. One forward then reproduces what every stream
token saw when it was generated, with no [B, 1, L, L] mask: the `e3rl_stream` attention runs
plain causal attention (fused kernels, no mask) for every row and recomputes only the erased
tokens' rows against a boolean [B, 1, E, L] visibility (E bounded by the erase budget), so memory
is linear in L. The logits predicting stream token k sit at its predecessor's position
(`target_index`), so the LM head runs only on those S positions, not on all L = P + S.

Shared prompts: a GRPO group's G samples have one prompt, often most of their tokens when answers
are short (the embedded default: ~70 prompt tokens, ~15-30 answer tokens). When every sample of
a batch fits `learner.pack_tokens`, the samples of one prompt share a row: the prompt once, then
each member's kept-first stream block, under an explicit [L, L] mask (bounded by pack_tokens).
The prompt's activations then get the gradient of all members at once, exactly as G copies would.

Also here: the cheap attention capture the `attention` allocator reads. It rides along the same
training forward: when armed, the attention function also computes softmax(q k^T) for the Q
final-answer query rows of every layer, averaged over heads and layers. Extra cost per layer:
O(B H Q L D) flops and a transient [B, H, Q, L] fp32 buffer (Q = algo.answer_tokens, e.g. 16).
All layers are averaged: the allocator wants where the answer looked overall, and the average
over depth is less noisy than any single layer.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from e3rl.core.stream_layout import kept_first_layout
from e3rl.core.trajectory import Trajectory
from learner.chunked_logprobs import token_logprobs_chunked

STREAM_IMPL = "e3rl_stream"


@dataclass
class StreamBatch:
    """B rows of prompt + streams for N samples. A row holds one sample (kept-first), or, when a
    group's samples share a prompt and fit `pack_tokens`, the prompt once and then each member's
    stream block (kept-first within the block), so the prompt is computed once for all of them."""

    input_ids: torch.Tensor  # [B, L] long, right-padded
    row_len: torch.Tensor  # [B] long: real tokens of each row (prompt once + its members' streams)
    position_ids: torch.Tensor  # [B, L] long: prompt 0..P-1, then each stream token's logical position
    erased_rows: torch.Tensor  # [B, E] long: rows of the erased tokens (E = most erased tokens in a row)
    erased_vis: torch.Tensor  # [B, 1, E, L] bool: keys each erased token saw (padding entries see row 0)
    erased_valid: torch.Tensor  # [B, E] bool
    packed_vis: torch.Tensor  # [B, 1, L, L] bool when prompts are shared (L <= pack_tokens), else [0]
    sample_row: torch.Tensor  # [N] long: the row holding sample n
    stream_rows: torch.Tensor  # [N, S] long: position in its row of stream token k (stream order)
    target_index: torch.Tensor  # [N, S] long: position in its row whose logits predict stream token k
    stream_ids: torch.Tensor  # [N, S] long
    behavior_logp: torch.Tensor  # [N, S] float: the generator's log-probs (pi_gen)
    mask: torch.Tensor  # [N, S] float: 1 on real stream tokens
    answer_index: torch.Tensor  # [N, Q] long: positions of the final kept tokens (answer queries)
    answer_valid: torch.Tensor  # [N, Q] bool
    prompt_len: torch.Tensor  # [N] long
    stream_len: torch.Tensor  # [N] long

    def to(self, device: torch.device) -> "StreamBatch":
        return StreamBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def num_tokens(self) -> float:
        return float(self.mask.sum())

    @property
    def packed(self) -> bool:
        return self.packed_vis.dim() == 4


def shared_prompt_rows(trajs: Sequence[Trajectory], pack_tokens: int) -> list[list[int]]:
    """Samples per row: those with the same prompt share one row while it stays <= pack_tokens
    (GRPO groups: G samples of one prompt, whose prompt is most of the tokens when answers are short).
    Packing is all or nothing per batch: it needs a dense [L, L] mask, so only if every sample fits."""
    lens = [t.prompt_ids.numel() + t.stream_ids.numel() for t in trajs]
    if pack_tokens <= 0 or max(lens) > pack_tokens:
        return [[i] for i in range(len(trajs))]
    by_prompt: dict[tuple, list[int]] = {}
    for i, t in enumerate(trajs):
        by_prompt.setdefault(tuple(t.prompt_ids.tolist()), []).append(i)
    rows = []
    for members in by_prompt.values():
        cur, width = [], 0
        for i in members:
            s = trajs[i].stream_ids.numel()
            if cur and width + s > pack_tokens:
                rows.append(cur)
                cur = []
            if not cur:
                width = trajs[i].prompt_ids.numel()
            cur.append(i)
            width += s
        rows.append(cur)
    return rows


def collate(trajs: Sequence[Trajectory], pad_id: int, answer_tokens: int = 16, pack_tokens: int = 0) -> StreamBatch:
    """Lay out and right-pad trajectories into one StreamBatch (see `shared_prompt_rows`)."""
    n = len(trajs)
    plan = shared_prompt_rows(trajs, pack_tokens)
    packed = any(len(r) > 1 for r in plan)
    layouts = [kept_first_layout(t.prompt_ids.numel(), t.erased_at) for t in trajs]
    row_len = [trajs[r[0]].prompt_ids.numel() + sum(trajs[i].stream_ids.numel() for i in r) for r in plan]
    B, L = len(plan), max(row_len)
    S, Q = max(1, max(t.stream_ids.numel() for t in trajs)), max(1, answer_tokens)
    E = 0 if packed else max(lay.erased_vis.shape[0] for lay in layouts)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros(B, L, dtype=torch.long)
    erased_rows = torch.zeros(B, E, dtype=torch.long)
    erased_vis = torch.zeros(B, 1, E, L, dtype=torch.bool)
    erased_vis[..., 0] = True  # padding entries attend to one real key: finite, never written back
    erased_valid = torch.zeros(B, E, dtype=torch.bool)
    vis = torch.eye(L, dtype=torch.bool).repeat(B, 1, 1) if packed else None  # pad queries see themselves
    sample_row = torch.zeros(n, dtype=torch.long)
    stream_rows = torch.zeros(n, S, dtype=torch.long)
    target = torch.zeros(n, S, dtype=torch.long)
    stream_ids = torch.full((n, S), pad_id, dtype=torch.long)
    behavior_logp = torch.zeros(n, S)
    mask = torch.zeros(n, S)
    ans_idx = torch.zeros(n, Q, dtype=torch.long)
    ans_ok = torch.zeros(n, Q, dtype=torch.bool)
    for b, members in enumerate(plan):
        p = trajs[members[0]].prompt_ids.numel()
        input_ids[b, :p], position_ids[b, :p] = trajs[members[0]].prompt_ids, torch.arange(p)
        if vis is not None:
            vis[b, :p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
        offset = p
        for i in members:
            t, lay, s = trajs[i], layouts[i], trajs[i].stream_ids.numel()
            # a position of the sample's own kept-first layout -> its position in this row
            place = lambda r, o=offset: torch.where(r < p, r, r - p + o)  # noqa: E731
            input_ids[b, offset : offset + s] = torch.cat([t.prompt_ids, t.stream_ids])[lay.order][p:]
            position_ids[b, offset : offset + s] = torch.cat([torch.arange(p), t.position_ids])[lay.order][p:]
            if vis is not None:
                k = lay.kept
                vis[b, offset : offset + k, :p] = True
                vis[b, offset : offset + k, offset : offset + k] = torch.ones(k, k, dtype=torch.bool).tril()
                vis[b, offset + k : offset + s, :p] = lay.erased_vis[:, :p]
                vis[b, offset + k : offset + s, offset : offset + s] = lay.erased_vis[:, p:]
            else:
                e = lay.erased_vis.shape[0]
                erased_rows[b, :e], erased_vis[b, 0, :e, : p + s], erased_valid[b, :e] = lay.erased_rows, lay.erased_vis, True
            sample_row[i] = b
            stream_rows[i, :s], target[i, :s] = place(lay.stream_row), place(lay.target_row)
            stream_ids[i, :s] = t.stream_ids
            behavior_logp[i, :s] = t.behavior_logp.float()
            mask[i, :s] = 1.0
            rows = offset + torch.arange(lay.kept)[-Q:]  # the last kept tokens answer
            ans_idx[i, : rows.numel()], ans_ok[i, : rows.numel()] = rows, True
            offset += s
    return StreamBatch(
        input_ids=input_ids, row_len=torch.tensor(row_len), position_ids=position_ids, erased_rows=erased_rows, erased_vis=erased_vis,
        erased_valid=erased_valid, packed_vis=vis.unsqueeze(1) if vis is not None else torch.zeros(0, dtype=torch.bool),
        sample_row=sample_row, stream_rows=stream_rows, target_index=target, stream_ids=stream_ids,
        behavior_logp=behavior_logp, mask=mask, answer_index=ans_idx, answer_valid=ans_ok,
        prompt_len=torch.tensor([t.prompt_ids.numel() for t in trajs]),
        stream_len=torch.tensor([t.stream_ids.numel() for t in trajs]),
    )


def pad_tokens(values: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Per-row 1D tensors -> [B, width] zero-padded (advantages aligned to stream tokens)."""
    out = torch.zeros(len(values), width)
    for i, v in enumerate(values):
        out[i, : v.numel()] = v.float()
    return out


# ------------------------------------------------------------------ the policy forward
def _has_logit_transform(config) -> bool:
    """Models whose *ForCausalLM rescales/softcaps logits need the full HF head path."""
    return any(getattr(config, k, None) not in (None, 1, 1.0) for k in ("final_logit_softcapping", "logits_scaling", "logit_scale"))


class StreamPolicy(nn.Module):
    """A HF causal LM that returns logits only at the stream tokens' predecessor rows.

    Wrapping (instead of calling submodules from outside) keeps every parameter fetch inside
    the root module's forward, which ZeRO-3's hooks expect. `lm` stays an ordinary HF model:
    its state_dict keys are the HF keys under the `lm.` prefix. Building one switches `lm` to the
    stream attention; `capture` is its (disarmed) attention capture.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self._full_head = _has_logit_transform(lm.config)
        self.capture = install_stream_attention(lm)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, sample_row: torch.Tensor,
                target_index: torch.Tensor, erased_rows: torch.Tensor, erased_vis: torch.Tensor,
                erased_valid: torch.Tensor, packed_vis: torch.Tensor) -> torch.Tensor:
        """-> logits [N, S, V] predicting each sample's stream tokens."""
        kw = dict(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                  e3rl_layout=StreamAttention(erased_rows, erased_vis, erased_valid, packed_vis))
        at = (sample_row[:, None], target_index)  # [N, S] positions in the rows
        if self._full_head:
            return self.lm(**kw).logits[at]  # [N, S, V]
        h = self.lm.get_decoder()(**kw).last_hidden_state  # [B, L, H]
        return self.lm.get_output_embeddings()(h[at])  # [N, S, V]


def policy_forward(policy: Callable[..., torch.Tensor], batch: StreamBatch) -> torch.Tensor:
    """Run `policy` (a StreamPolicy or the DeepSpeed engine wrapping one) on a batch -> [N, S, V]."""
    return policy(batch.input_ids, batch.position_ids, batch.sample_row, batch.target_index, batch.erased_rows,
                  batch.erased_vis, batch.erased_valid, batch.packed_vis)


def stream_logprobs(logits: torch.Tensor, batch: StreamBatch, temperature: float) -> torch.Tensor:
    """[B, S, V] -> [B, S] log q(token) under logits / T, the generator's behaviour convention
    (the core's token_logprobs math, chunked: no fp32 [B, S, V] tensor)."""
    return token_logprobs_chunked(logits, batch.stream_ids, temperature)[0] * batch.mask


def logprobs_and_entropy(logits: torch.Tensor, batch: StreamBatch, temperature: float) -> tuple[torch.Tensor, float]:
    """Like `stream_logprobs`, plus the masked entropy sum for metrics, from the same chunks."""
    logp, ent = token_logprobs_chunked(logits, batch.stream_ids, temperature, with_entropy=True)
    return logp * batch.mask, float((ent * batch.mask).sum())


# ------------------------------------------------------------------ attention capture
class AttentionCapture:
    """Attention of selected query positions, accumulated across layers during one armed forward."""

    def __init__(self):
        self.index: Optional[torch.Tensor] = None  # [N, Q] positions in the samples' rows
        self.rows: Optional[torch.Tensor] = None  # [N] the row of each sample
        self.total: Optional[torch.Tensor] = None  # [N, Q, L] sum over layers of head-mean probs
        self.layers = 0

    def arm(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        self.index, self.rows, self.total, self.layers = index, rows, None, 0

    def disarm(self) -> Optional[torch.Tensor]:
        """-> [N, Q, L] attention averaged over heads and layers (None if nothing was captured)."""
        out = None if self.total is None else self.total / max(1, self.layers)
        self.index, self.rows, self.total, self.layers = None, None, None, 0
        return out

    @torch.no_grad()
    def add(self, query: torch.Tensor, key: torch.Tensor, scaling: Optional[float], packed_vis: torch.Tensor) -> None:
        """The answer positions are kept tokens: unpacked, they saw exactly the positions <= their own
        (kept-first order); in a shared-prompt row, what `packed_vis` says."""
        idx, rows = self.index.to(query.device), self.rows.to(query.device)
        _, h, n, d = query.shape  # query [B, H, L, D]; key [B, Hkv, L, D]
        hkv, q, m = key.shape[1], idx.shape[1], idx.shape[0]
        qa = query.transpose(1, 2)[rows[:, None], idx].transpose(1, 2).float()  # [N, H, Q, D]
        scores = qa.view(m, hkv, h // hkv, q, d) @ key.float()[rows][:, :, None].transpose(-1, -2)  # [N, Hkv, g, Q, L]
        scores = scores * (scaling if scaling is not None else d ** -0.5)
        if packed_vis.dim() == 4:
            hidden = ~packed_vis[rows[:, None], 0, idx]  # [N, Q, L]
        else:
            hidden = torch.arange(n, device=idx.device)[None, None, :] > idx[:, :, None]
        scores = scores.masked_fill(hidden[:, None, None], torch.finfo(torch.float32).min)
        probs = scores.softmax(-1).mean((1, 2))  # [N, Q, L]
        self.total = probs if self.total is None else self.total + probs
        self.layers += 1


@dataclass
class StreamAttention:
    """What the `e3rl_stream` attention needs besides q, k, v (see StreamBatch)."""

    erased_rows: torch.Tensor
    erased_vis: torch.Tensor
    erased_valid: torch.Tensor
    packed_vis: torch.Tensor


# Rows up to this many tokens run one masked matmul attention on CPU instead of the fused kernel:
# measured here (bf16, 9 heads x 64, fwd+bwd, 2 threads) the CPU flash kernel is 1.8x SLOWER at
# L = 133 (66 vs 36 ms per layer) and faster from L ~ 190 on (66 vs 80 ms at 192, 84 vs 197 at 512).
# The [B, 1, L, L] mask this builds is bounded by the cap (<= 25 kB per row), so memory stays linear
# in L. GPUs always take the fused path.
CPU_SHORT_ROWS = 160


def _masked_attention(query, key, value, vis: torch.Tensor, scaling: Optional[float]) -> torch.Tensor:
    """softmax(q k^T) v under a boolean [B, 1, L, L] visibility -> [B, L, H, D]; fp32 softmax, as
    HF's eager attention."""
    d, groups = query.shape[-1], query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = (query @ key.transpose(-1, -2)) * (scaling if scaling is not None else d ** -0.5)
    probs = scores.float().masked_fill(~vis, float("-inf")).softmax(-1).to(query.dtype)
    return (probs @ value).transpose(1, 2).contiguous()


def _short_rows_visibility(layout: StreamAttention, b: int, n: int, device: torch.device) -> torch.Tensor:
    """The rule as a [B, 1, L, L] mask for unpacked rows: causal, erased tokens' rows replaced."""
    vis = torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(b, 1, n, n)
    if layout.erased_rows.shape[1]:
        bi, ei = layout.erased_valid.nonzero(as_tuple=True)
        vis = vis.clone()
        vis[bi, 0, layout.erased_rows[bi, ei]] = layout.erased_vis[bi, 0, ei]
    return vis


def _stream_attention_forward(module: nn.Module, query, key, value, attention_mask, e3rl_layout=None, **kwargs):
    """Registered as `e3rl_stream`. Unpacked rows: causal SDPA for every row (no mask: fused
    kernels), then the erased tokens' rows again with their own visibility, written over the causal
    result; on CPU, short rows take one masked matmul attention instead (CPU_SHORT_ROWS).
    Shared-prompt rows (bounded by learner.pack_tokens): one attention under their [L, L] mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lay: Optional[StreamAttention] = e3rl_layout
    if lay is None:
        raise RuntimeError("this model runs the e3rl_stream attention (a StreamPolicy wraps it): call it through "
                           "StreamPolicy with a StreamBatch, or load a separate copy for plain forwards")
    b, h, n, d = query.shape
    cpu = query.device.type == "cpu" and not (module.training and kwargs.get("dropout"))
    if lay.packed_vis.dim() == 4:
        if cpu:
            out = _masked_attention(query, key, value, lay.packed_vis, kwargs.get("scaling"))
        else:
            out, _ = sdpa_attention_forward(module, query, key, value, lay.packed_vis, **kwargs)
    elif cpu and n <= CPU_SHORT_ROWS:
        out = _masked_attention(query, key, value, _short_rows_visibility(lay, b, n, query.device), kwargs.get("scaling"))
    else:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # [B, L, H, D]
        rows = lay.erased_rows
        if rows.shape[1]:
            q_erased = query.gather(2, rows[:, None, :, None].expand(b, h, rows.shape[1], d))
            o_erased, _ = sdpa_attention_forward(module, q_erased, key, value, lay.erased_vis, **kwargs)  # [B, E, H, D]
            bi, ei = lay.erased_valid.nonzero(as_tuple=True)
            out = out.index_put((bi, rows[bi, ei]), o_erased[bi, ei])
    cap: Optional[AttentionCapture] = getattr(module, "_e3rl_capture", None)
    if cap is not None and cap.index is not None:
        cap.add(query, key, kwargs.get("scaling"), lay.packed_vis)
    return out, None


def _no_mask(*args, **kwargs) -> None:
    """The mask builder for `e3rl_stream`: visibility is causal plus the erased rows' own mask."""
    return None


def install_stream_attention(lm: nn.Module) -> AttentionCapture:
    """Switch `lm` to the stream attention (torch SDPA underneath, whatever `sdpa`/`eager` it was
    configured with: same math) and attach a disarmed capture. -> that capture."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if lm.config._attn_implementation == STREAM_IMPL:
        return next(m._e3rl_capture for m in lm.modules() if hasattr(m, "_e3rl_capture"))
    if getattr(lm.config, "sliding_window", None) and getattr(lm.config, "use_sliding_window", True):
        raise ValueError("the stream forward does not support sliding-window attention (model.path's config)")
    AttentionInterface.register(STREAM_IMPL, _stream_attention_forward)
    AttentionMaskInterface.register(STREAM_IMPL, _no_mask)
    cap = AttentionCapture()
    for m in lm.modules():
        if hasattr(m, "layer_idx"):
            m._e3rl_capture = cap
    lm.set_attn_implementation(STREAM_IMPL)
    return cap


def split_attention(attn: torch.Tensor, batch: StreamBatch) -> list[torch.Tensor]:
    """[N, Q, L] captured probs -> per sample [Q_n, S_n]: valid answer queries over its stream tokens (stream order)."""
    out = []
    for i in range(attn.shape[0]):
        s = int(batch.stream_len[i])
        cols = batch.stream_rows[i, :s].to(attn.device)
        out.append(attn[i, batch.answer_valid[i].to(attn.device)][:, cols].float().cpu())
    return out

"""Trajectories -> one padded forward over prompt + whole stream (kept AND erased tokens).

Each row is laid out kept-first (`e3rl.core.stream_layout`): prompt, kept stream tokens, erased
stream tokens, with their logical position ids. One forward then reproduces what every stream
token saw when it was generated, with no [B, 1, L, L] mask: the `e3rl_stream` attention runs
plain causal attention (fused kernels, no mask) for every row and recomputes only the erased
tokens' rows against a boolean [B, 1, E, L] visibility (E bounded by the erase budget), so memory
is linear in L. The logits predicting stream token k sit at its predecessor's row (`target_index`),
so the LM head runs only on those S rows, not on all L = P + S rows.

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
    input_ids: torch.Tensor  # [B, L] long, kept-first rows, right-padded
    position_ids: torch.Tensor  # [B, L] long: prompt 0..P-1, then each stream token's logical position
    erased_rows: torch.Tensor  # [B, E] long: rows of the erased tokens (E = most erased tokens in a row)
    erased_vis: torch.Tensor  # [B, 1, E, L] bool: keys each erased token saw (padding entries see row 0)
    erased_valid: torch.Tensor  # [B, E] bool
    stream_rows: torch.Tensor  # [B, S] long: row of stream token k (stream order)
    target_index: torch.Tensor  # [B, S] long: row whose logits predict stream token k
    stream_ids: torch.Tensor  # [B, S] long
    behavior_logp: torch.Tensor  # [B, S] float: the generator's log-probs (pi_gen)
    mask: torch.Tensor  # [B, S] float: 1 on real stream tokens
    answer_index: torch.Tensor  # [B, Q] long: rows of the final kept tokens (answer queries)
    answer_valid: torch.Tensor  # [B, Q] bool
    prompt_len: torch.Tensor  # [B] long
    stream_len: torch.Tensor  # [B] long

    def to(self, device: torch.device) -> "StreamBatch":
        return StreamBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def num_tokens(self) -> float:
        return float(self.mask.sum())


def collate(trajs: Sequence[Trajectory], pad_id: int, answer_tokens: int = 16) -> StreamBatch:
    """Right-pad a list of trajectories, each laid out kept-first, into one StreamBatch."""
    b = len(trajs)
    layouts = [kept_first_layout(t.prompt_ids.numel(), t.erased_at) for t in trajs]
    lens = [t.prompt_ids.numel() + t.stream_ids.numel() for t in trajs]
    L, S, Q = max(lens), max(1, max(t.stream_ids.numel() for t in trajs)), max(1, answer_tokens)
    E = max(lay.erased_vis.shape[0] for lay in layouts)
    input_ids = torch.full((b, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros(b, L, dtype=torch.long)
    erased_rows = torch.zeros(b, E, dtype=torch.long)
    erased_vis = torch.zeros(b, 1, E, L, dtype=torch.bool)
    erased_vis[..., 0] = True  # padding entries attend to one real key: finite, never written back
    erased_valid = torch.zeros(b, E, dtype=torch.bool)
    stream_rows = torch.zeros(b, S, dtype=torch.long)
    target = torch.zeros(b, S, dtype=torch.long)
    stream_ids = torch.full((b, S), pad_id, dtype=torch.long)
    behavior_logp = torch.zeros(b, S)
    mask = torch.zeros(b, S)
    ans_idx = torch.zeros(b, Q, dtype=torch.long)
    ans_ok = torch.zeros(b, Q, dtype=torch.bool)
    for i, (t, lay) in enumerate(zip(trajs, layouts)):
        p, s, n, e = t.prompt_ids.numel(), t.stream_ids.numel(), lens[i], lay.erased_vis.shape[0]
        input_ids[i, :n] = torch.cat([t.prompt_ids, t.stream_ids])[lay.order]
        position_ids[i, :n] = torch.cat([torch.arange(p), t.position_ids])[lay.order]
        erased_rows[i, :e], erased_vis[i, 0, :e, :n], erased_valid[i, :e] = lay.erased_rows, lay.erased_vis, True
        stream_rows[i, :s], target[i, :s] = lay.stream_row, lay.target_row
        stream_ids[i, :s] = t.stream_ids
        behavior_logp[i, :s] = t.behavior_logp.float()
        mask[i, :s] = 1.0
        rows = p + torch.arange(lay.kept)[-Q:]  # the last kept tokens answer
        ans_idx[i, : rows.numel()], ans_ok[i, : rows.numel()] = rows, True
    return StreamBatch(
        input_ids=input_ids, position_ids=position_ids, erased_rows=erased_rows, erased_vis=erased_vis,
        erased_valid=erased_valid, stream_rows=stream_rows, target_index=target, stream_ids=stream_ids,
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

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, target_index: torch.Tensor,
                erased_rows: torch.Tensor, erased_vis: torch.Tensor, erased_valid: torch.Tensor) -> torch.Tensor:
        """-> logits [B, S, V] predicting each stream token."""
        kw = dict(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                  e3rl_erased=(erased_rows, erased_vis, erased_valid))
        if self._full_head:
            logits = self.lm(**kw).logits  # [B, L, V]
            return logits.gather(1, target_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        h = self.lm.get_decoder()(**kw).last_hidden_state  # [B, L, H]
        h = h.gather(1, target_index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # [B, S, H]
        return self.lm.get_output_embeddings()(h)  # [B, S, V]


def policy_forward(policy: Callable[..., torch.Tensor], batch: StreamBatch) -> torch.Tensor:
    """Run `policy` (a StreamPolicy or the DeepSpeed engine wrapping one) on a batch -> [B, S, V]."""
    return policy(batch.input_ids, batch.position_ids, batch.target_index, batch.erased_rows, batch.erased_vis,
                  batch.erased_valid)


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
    """Attention of selected query rows, accumulated across layers during one armed forward."""

    def __init__(self):
        self.index: Optional[torch.Tensor] = None  # [B, Q]
        self.total: Optional[torch.Tensor] = None  # [B, Q, L] sum over layers of head-mean probs
        self.layers = 0

    def arm(self, index: torch.Tensor) -> None:
        self.index, self.total, self.layers = index, None, 0

    def disarm(self) -> Optional[torch.Tensor]:
        """-> [B, Q, L] attention averaged over heads and layers (None if nothing was captured)."""
        out = None if self.total is None else self.total / max(1, self.layers)
        self.index, self.total, self.layers = None, None, 0
        return out

    @torch.no_grad()
    def add(self, query: torch.Tensor, key: torch.Tensor, scaling: Optional[float]) -> None:
        """The answer rows are kept tokens: in the kept-first order they saw exactly the rows <= their own."""
        idx = self.index.to(query.device)
        b, h, _, d = query.shape  # query [B, H, L, D]; key [B, Hkv, L, D]
        hkv, q, n = key.shape[1], idx.shape[1], key.shape[2]
        qa = query.gather(2, idx[:, None, :, None].expand(b, h, q, d)).float()  # [B, H, Q, D]
        qa = qa.view(b, hkv, h // hkv, q, d)
        scores = qa @ key.float()[:, :, None].transpose(-1, -2)  # [B, Hkv, g, Q, L]
        scores = scores * (scaling if scaling is not None else d ** -0.5)
        future = torch.arange(n, device=idx.device)[None, None, :] > idx[:, :, None]  # [B, Q, L]
        scores = scores.masked_fill(future[:, None, None], torch.finfo(torch.float32).min)
        probs = scores.softmax(-1).mean((1, 2))  # [B, Q, L]
        self.total = probs if self.total is None else self.total + probs
        self.layers += 1


# Rows up to this many tokens run one masked matmul attention on CPU instead of the fused kernel:
# measured here (bf16, 9 heads x 64, fwd+bwd, 2 threads) the CPU flash kernel is 1.8x SLOWER at
# L = 133 (66 vs 36 ms per layer) and faster from L ~ 190 on (66 vs 80 ms at 192, 84 vs 197 at 512).
# The [B, 1, L, L] mask this builds is bounded by the cap (<= 25 kB per row), so memory stays linear
# in L. GPUs always take the fused path.
CPU_SHORT_ROWS = 160


def _short_rows_attention(module: nn.Module, query, key, value, erased, scaling: Optional[float]) -> torch.Tensor:
    """softmax(q k^T) v over the rule's full visibility (causal, erased rows replaced) -> [B, L, H, D];
    fp32 softmax, as HF's eager attention."""
    b, h, n, d = query.shape
    groups = h // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    vis = torch.ones(n, n, dtype=torch.bool, device=query.device).tril().expand(b, 1, n, n)
    if erased is not None and erased[0].shape[1]:
        rows, erased_vis, valid = erased
        bi, ei = valid.nonzero(as_tuple=True)
        vis = vis.clone()
        vis[bi, 0, rows[bi, ei]] = erased_vis[bi, 0, ei]
    scores = (query @ key.transpose(-1, -2)) * (scaling if scaling is not None else d ** -0.5)
    probs = scores.float().masked_fill(~vis, float("-inf")).softmax(-1).to(query.dtype)
    return (probs @ value).transpose(1, 2).contiguous()


def _stream_attention_forward(module: nn.Module, query, key, value, attention_mask, e3rl_erased=None, **kwargs):
    """Registered as `e3rl_stream`: causal SDPA for every row (no mask: fused kernels), then the
    erased tokens' rows again with their own visibility, written over the causal result. Short
    rows on CPU: one masked matmul attention instead (CPU_SHORT_ROWS)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type == "cpu" and query.shape[2] <= CPU_SHORT_ROWS and not (module.training and kwargs.get("dropout")):
        out = _short_rows_attention(module, query, key, value, e3rl_erased, kwargs.get("scaling"))
    else:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # [B, L, H, D]
        if e3rl_erased is not None and e3rl_erased[0].shape[1]:
            rows, vis, valid = e3rl_erased  # [B, E], [B, 1, E, L], [B, E]
            b, h, _, d = query.shape
            q_erased = query.gather(2, rows[:, None, :, None].expand(b, h, rows.shape[1], d))
            o_erased, _ = sdpa_attention_forward(module, q_erased, key, value, vis, **kwargs)  # [B, E, H, D]
            bi, ei = valid.nonzero(as_tuple=True)
            out = out.index_put((bi, rows[bi, ei]), o_erased[bi, ei])
    cap: Optional[AttentionCapture] = getattr(module, "_e3rl_capture", None)
    if cap is not None and cap.index is not None:
        cap.add(query, key, kwargs.get("scaling"))
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
    """[B, Q, L] captured probs -> per row [Q_b, S_b]: valid answer queries over stream tokens (stream order)."""
    out = []
    for i in range(attn.shape[0]):
        s = int(batch.stream_len[i])
        cols = batch.stream_rows[i, :s].to(attn.device)
        out.append(attn[i, batch.answer_valid[i].to(attn.device)][:, cols].float().cpu())
    return out

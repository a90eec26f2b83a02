"""Trajectories -> one padded forward over prompt + whole stream (kept AND erased tokens).

Each row is `prompt + stream` with the core's stream attention mask and logical position ids, so
one forward reproduces what every stream token saw when it was generated; there is no second
prefix forward per erased branch. The logits predicting stream token k sit at its predecessor
(`predecessor_index`), so the LM head runs only on those S rows, not on all L = P + S rows.

Also here: the cheap attention capture the `attention` allocator reads. It rides along the same
training forward: a registered attention function calls the normal kernel (sdpa/eager) and, only
when armed, recomputes softmax(q k^T) for the Q final-answer query rows of every layer, averaged
over heads and layers. Extra cost per layer: O(B H Q L D) flops and a transient [B, H, Q, L]
fp32 buffer (Q = algo.answer_tokens, e.g. 16) instead of the [B, H, L, L] eager attention would
materialise. All layers are averaged: the allocator wants where the answer looked overall, and
the average over depth is less noisy than any single layer.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from e3rl.core.surprisal import scaled_logits, token_logprobs
from e3rl.core.trajectory import Trajectory, additive_mask, predecessor_index, stream_attention_mask

CAPTURE_IMPL = "e3rl_capture"


@dataclass
class StreamBatch:
    input_ids: torch.Tensor  # [B, L] long, right-padded
    position_ids: torch.Tensor  # [B, L] long: prompt 0..P-1, then the stream's logical positions
    attn_mask: torch.Tensor  # [B, 1, L, L] additive float; a pad query sees only itself (no NaN)
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


def answer_rows(t: Trajectory, answer_tokens: int) -> torch.Tensor:
    """[Q_b] rows (prompt+stream coordinates) of the last `answer_tokens` kept stream tokens."""
    kept = torch.nonzero(t.kept_mask, as_tuple=False).flatten()
    return kept[-answer_tokens:] + t.prompt_ids.numel()


def collate(trajs: Sequence[Trajectory], pad_id: int, dtype: torch.dtype = torch.float32,
            answer_tokens: int = 16) -> StreamBatch:
    """Right-pad a list of trajectories into one StreamBatch (mask in `dtype`, the compute dtype)."""
    b = len(trajs)
    lens = [t.prompt_ids.numel() + t.stream_ids.numel() for t in trajs]
    L, S, Q = max(lens), max(1, max(t.stream_ids.numel() for t in trajs)), max(1, answer_tokens)
    input_ids = torch.full((b, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros(b, L, dtype=torch.long)
    vis = torch.eye(L, dtype=torch.bool).repeat(b, 1, 1)  # pad queries see themselves
    target = torch.zeros(b, S, dtype=torch.long)
    stream_ids = torch.full((b, S), pad_id, dtype=torch.long)
    behavior_logp = torch.zeros(b, S)
    mask = torch.zeros(b, S)
    ans_idx = torch.zeros(b, Q, dtype=torch.long)
    ans_ok = torch.zeros(b, Q, dtype=torch.bool)
    for i, t in enumerate(trajs):
        p, s, n = t.prompt_ids.numel(), t.stream_ids.numel(), lens[i]
        input_ids[i, :p], input_ids[i, p:n] = t.prompt_ids, t.stream_ids
        position_ids[i, :p] = torch.arange(p)
        position_ids[i, p:n] = t.position_ids
        vis[i, :n, :n] = stream_attention_mask(p, t.erased_at)
        target[i, :s] = predecessor_index(p, t.erased_at)
        stream_ids[i, :s] = t.stream_ids
        behavior_logp[i, :s] = t.behavior_logp.float()
        mask[i, :s] = 1.0
        rows = answer_rows(t, Q)
        ans_idx[i, : rows.numel()], ans_ok[i, : rows.numel()] = rows, True
    return StreamBatch(
        input_ids=input_ids, position_ids=position_ids, attn_mask=additive_mask(vis.unsqueeze(1), dtype),
        target_index=target, stream_ids=stream_ids, behavior_logp=behavior_logp, mask=mask, answer_index=ans_idx,
        answer_valid=ans_ok, prompt_len=torch.tensor([t.prompt_ids.numel() for t in trajs]),
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
    its state_dict keys are the HF keys under the `lm.` prefix.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self._full_head = _has_logit_transform(lm.config)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attn_mask: torch.Tensor,
                target_index: torch.Tensor) -> torch.Tensor:
        """-> logits [B, S, V] predicting each stream token."""
        kw = dict(input_ids=input_ids, attention_mask=attn_mask, position_ids=position_ids, use_cache=False)
        if self._full_head:
            logits = self.lm(**kw).logits  # [B, L, V]
            return logits.gather(1, target_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        h = self.lm.get_decoder()(**kw).last_hidden_state  # [B, L, H]
        h = h.gather(1, target_index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # [B, S, H]
        return self.lm.get_output_embeddings()(h)  # [B, S, V]


def policy_forward(policy: Callable[..., torch.Tensor], batch: StreamBatch) -> torch.Tensor:
    """Run `policy` (a StreamPolicy or the DeepSpeed engine wrapping one) on a batch -> [B, S, V]."""
    return policy(batch.input_ids, batch.position_ids, batch.attn_mask, batch.target_index)


def stream_logprobs(logits: torch.Tensor, batch: StreamBatch, temperature: float) -> torch.Tensor:
    """[B, S, V] -> [B, S] log q(token) under logits / T, the generator's behaviour convention."""
    return token_logprobs(logits, batch.stream_ids, temperature) * batch.mask


def logprobs_and_entropy(logits: torch.Tensor, batch: StreamBatch, temperature: float) -> tuple[torch.Tensor, float]:
    """Like `stream_logprobs` (same math as the core's token_logprobs), plus the masked entropy
    sum for metrics from the SAME log_softmax: one [B, S, V] softmax per micro-batch, not two."""
    logp_all = scaled_logits(logits.float(), temperature).log_softmax(-1)  # [B, S, V]
    logp = logp_all.gather(-1, batch.stream_ids.unsqueeze(-1)).squeeze(-1) * batch.mask  # [B, S]
    with torch.no_grad():
        lp = logp_all.detach()
        entropy = float((-(lp.exp() * lp).sum(-1) * batch.mask).sum())
    return logp, entropy


# ------------------------------------------------------------------ attention capture
class AttentionCapture:
    """Attention of selected query rows, accumulated across layers during one armed forward."""

    def __init__(self, base_name: str):
        self.base_name = base_name  # the real attention kernel: sdpa | eager
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
    def add(self, query: torch.Tensor, key: torch.Tensor, mask: Optional[torch.Tensor], scaling: Optional[float]) -> None:
        idx = self.index.to(query.device)
        b, h, _, d = query.shape  # query [B, H, L, D]; key [B, Hkv, L, D]
        hkv, q = key.shape[1], idx.shape[1]
        qa = query.gather(2, idx[:, None, :, None].expand(b, h, q, d)).float()  # [B, H, Q, D]
        qa = qa.view(b, hkv, h // hkv, q, d)
        scores = qa @ key.float()[:, :, None].transpose(-1, -2)  # [B, Hkv, g, Q, L]
        scores = scores * (scaling if scaling is not None else d ** -0.5)
        if mask is not None:
            rows = mask.gather(2, idx[:, None, :, None].expand(b, mask.shape[1], q, mask.shape[-1]))  # [B, 1, Q, L]
            if rows.dtype == torch.bool:
                rows = torch.zeros(rows.shape, device=rows.device).masked_fill(~rows, torch.finfo(torch.float32).min)
            scores = scores + rows.float()[:, :, None, :, : scores.shape[-1]]
        probs = scores.softmax(-1).mean((1, 2))  # [B, Q, L]
        self.total = probs if self.total is None else self.total + probs
        self.layers += 1


def _capture_attention_forward(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Registered as `e3rl_capture`: the base kernel, plus the answer rows when armed."""
    cap: AttentionCapture = module._e3rl_capture
    out = _base_kernel(module, cap.base_name)(module, query, key, value, attention_mask, **kwargs)
    if cap.index is not None:
        cap.add(query, key, attention_mask, kwargs.get("scaling"))
    return out


def install_attention_capture(lm: nn.Module) -> AttentionCapture:
    """Switch `lm` to the capturing attention function (same numerics while disarmed)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    base_name = lm.config._attn_implementation
    if base_name == CAPTURE_IMPL:
        return next(m._e3rl_capture for m in lm.modules() if hasattr(m, "_e3rl_capture"))
    if base_name not in ("sdpa", "eager"):
        raise ValueError(f"attention capture supports sdpa|eager, the model uses {base_name!r}")
    AttentionInterface.register(CAPTURE_IMPL, _capture_attention_forward)
    AttentionMaskInterface.register(CAPTURE_IMPL, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    cap = AttentionCapture(base_name)
    for m in lm.modules():
        if hasattr(m, "layer_idx"):
            m._e3rl_capture = cap
    lm.set_attn_implementation(CAPTURE_IMPL)
    return cap


def _base_kernel(module: nn.Module, name: str) -> Callable:
    """sdpa from the global registry; eager from the model family's own modeling file."""
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


def split_attention(attn: torch.Tensor, batch: StreamBatch) -> list[torch.Tensor]:
    """[B, Q, L] captured probs -> per row [Q_b, S_b]: valid answer queries over stream columns."""
    out = []
    for i in range(attn.shape[0]):
        p, s = int(batch.prompt_len[i]), int(batch.stream_len[i])
        out.append(attn[i, batch.answer_valid[i].to(attn.device)][:, p : p + s].float().cpu())
    return out

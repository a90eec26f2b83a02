"""Token log-probs (+ entropy) under softmax(logits / T) without a full fp32 [N, V] tensor.

Why. The plain path, `scaled_logits(logits.float(), T).log_softmax(-1)`, materialises an fp32
copy of the logits and an fp32 log_softmax output, and autograd keeps the latter alive until
backward. For a 152k vocabulary and an 8k-token sequence one such tensor is
8192 * 152064 * 4 B ~= 5.0 GB (the bf16 logits themselves are 2.5 GB), and the entropy metric's
`.exp()` adds another. Here the rows are processed `chunk_tokens` at a time: forward keeps only
an fp32 logsumexp per row ([N] floats), backward recomputes the chunk's softmax from the logits
autograd already holds and writes grad = g * (onehot(token) - softmax(logits / T)) / T.

Precision: every chunk is computed in fp32 (fp64 input stays fp64, so gradcheck can run);
outputs are in that compute dtype and grad_logits comes back in the logits' own dtype.
Temperature follows `e3rl.core.surprisal.scaled_logits`: T = 0 (greedy) is scored as T = 1.
"""
from __future__ import annotations

from typing import Optional

import torch

# One fp32 [chunk, V] buffer is ~64 MiB: 110 rows at V = 152064. Big enough that the per-chunk
# kernel launches are negligible next to the LM head matmul, small enough that the few live
# temporaries (fp32 copy, exp, product: a small multiple of 64 MiB) never rival the logits.
CHUNK_BYTES = 64 << 20


def default_chunk_tokens(vocab: int) -> int:
    """Rows per chunk so one fp32 [chunk, V] buffer is ~CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * max(1, vocab)))


def _temperature_divisor(temperature: float) -> float:
    return 1.0 if temperature in (0.0, 1.0) else float(temperature)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _scaled_chunk(chunk: torch.Tensor, t: float) -> torch.Tensor:
    """A FRESH compute-dtype copy of chunk / T (callers mutate it in place)."""
    z = chunk.to(_compute_dtype(chunk.dtype), copy=True)
    return z.div_(t) if t != 1.0 else z


class ChunkedTokenLogprobs(torch.autograd.Function):
    """(logits [N, V], tokens [N], T, chunk, with_entropy) -> (log q(token) [N], entropy [N] | None)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float, chunk: int,
                with_entropy: bool):
        n, t = logits.shape[0], _temperature_divisor(temperature)
        cdt = _compute_dtype(logits.dtype)
        logp = torch.empty(n, dtype=cdt, device=logits.device)
        lse = torch.empty(n, dtype=cdt, device=logits.device)
        ent = torch.empty(n, dtype=cdt, device=logits.device) if with_entropy else None
        for s in range(0, n, chunk):
            z = _scaled_chunk(logits[s : s + chunk], t)  # [c, V]
            lse_c = torch.logsumexp(z, -1)
            lse[s : s + chunk] = lse_c
            logp[s : s + chunk] = z.gather(-1, tokens[s : s + chunk, None]).squeeze(-1) - lse_c
            if ent is not None:
                z.sub_(lse_c[:, None])  # log-probs, in place
                ent[s : s + chunk] = -(torch.exp(z).mul_(z)).sum(-1)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.t, ctx.chunk = t, chunk
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, _grad_ent: Optional[torch.Tensor]):
        logits, tokens, lse = ctx.saved_tensors
        t, chunk = ctx.t, ctx.chunk
        grad = torch.empty_like(logits)
        g = grad_logp.to(lse.dtype) / t  # [N]
        for s in range(0, logits.shape[0], chunk):
            p = _scaled_chunk(logits[s : s + chunk], t).sub_(lse[s : s + chunk, None]).exp_()  # softmax
            g_c = g[s : s + chunk, None]
            p.mul_(-g_c).scatter_add_(-1, tokens[s : s + chunk, None], g_c)  # g (onehot - p) / T
            grad[s : s + chunk] = p  # cast to the logits' dtype
        return grad, None, None, None, None


def token_logprobs_chunked(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                           chunk_tokens: Optional[int] = None, with_entropy: bool = False,
                           ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log q(token) under softmax(logits / T) and, if asked, the (gradient-free) entropy.

    logits [..., V] (any float dtype); tokens [...] integer -> ([...], [...] | None), fp32
    (fp64 for fp64 logits). Same math as `e3rl.core.surprisal.token_logprobs` / `token_entropy`,
    but peak extra memory is O(chunk_tokens * V) instead of O(N * V); chunk_tokens defaults to
    `default_chunk_tokens(V)`.
    """
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"tokens {tuple(tokens.shape)} must match logits {tuple(logits.shape)}[:-1]")
    vocab = logits.shape[-1]
    chunk = int(chunk_tokens) if chunk_tokens is not None else default_chunk_tokens(vocab)
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk}")
    flat = logits.reshape(-1, vocab)
    logp, ent = ChunkedTokenLogprobs.apply(flat, tokens.reshape(-1).long(), temperature, chunk, with_entropy)
    lead = logits.shape[:-1]
    return logp.view(lead), (None if ent is None else ent.view(lead))

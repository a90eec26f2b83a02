"""What this machine can do, measured in the benchmark's own process: the matmul peak per dtype
and a plain-torch training step (a HF causal LM's loss on the same tokens, no DeepSpeed, no
stream masks), so the learner's speed is judged against numbers taken minutes apart, not against
a spec sheet.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of an n x n @ n x n matmul in `dtype` (2 n^3 flops)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def plain_step(model: torch.nn.Module, sequences: Sequence[torch.Tensor], bf16: bool, lr: float = 1e-6
               ) -> Callable[[], None]:
    """One AdamW step of the plain causal-LM loss over right-padded `sequences`, optionally under
    `torch.autocast(bfloat16)` (fp32 weights, bf16 matmuls): what a hand-written trainer would run."""
    n, width = len(sequences), max(s.numel() for s in sequences)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : s.numel()], mask[i, : s.numel()] = s, 1
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def training_flops(params: int, tokens: int) -> float:
    """6 x parameters x tokens: forward (2) and backward (4) matmul flops of a dense transformer."""
    return 6.0 * params * tokens

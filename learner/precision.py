"""The learner's training precision, resolved once per rank.

bf16 mixed precision is what the learner runs on GPUs, and it pays on CPUs with native bf16 too
(AVX512-BF16 / AMX: a bf16 matmul ran 4x faster than fp32 on our 2-core test machine, a training
step 2.2x). Without those instructions, bf16 is emulated and slower than fp32, so `auto` keeps fp32
there. Weights, activations and gradients in the forward/backward are bf16; DeepSpeed keeps fp32
master weights and optimizer state and accumulates gradients in fp32.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU flags (Linux) list a bf16 dot-product instruction set."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(f in flags for f in _BF16_CPU_FLAGS)


def learner_dtype(name: str, device: torch.device) -> torch.dtype:
    """`learner.dtype` -> the compute dtype of the forward/backward (masters stay fp32)."""
    if name == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if fast else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]

"""The learner's training precision, resolved once per rank.

bf16 mixed precision is what the learner runs on GPUs. On a CPU it is opt-in (`learner.dtype:
bfloat16`): with native bf16 (AVX512-BF16 / AMX) a training step runs 2.2x faster than fp32 on our
2-core machine, but on the embedded default (8 steps at lr 2e-5) it cost E3RL 0.065 held-out
accuracy [0.024, 0.112] over 8 seeds (docs/study_protocol.md, Part 4 item 5): most of those
updates are below bf16's resolution, so the learner computes on a model that lags the fp32
generators' (log-prob mismatch 0.17-0.21 vs 1e-5). So `auto` is bf16 on CUDA only. Without the
instructions, bf16 on a CPU is emulated and slower than fp32. Weights, activations and gradients
in the forward/backward are bf16; DeepSpeed keeps fp32 master weights and optimizer state and
accumulates gradients in fp32.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
_log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU flags (Linux) list a bf16 dot-product instruction set."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(f in flags for f in _BF16_CPU_FLAGS)


@functools.lru_cache(maxsize=None)
def learner_dtype(name: str, device: torch.device) -> torch.dtype:
    """`learner.dtype` -> the compute dtype of the forward/backward (masters stay fp32). Cached:
    the worker and the DeepSpeed config builder both resolve it, and the emulation warning is
    said once per process."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "bfloat16" and device.type == "cpu" and not cpu_has_native_bf16():
        _log.warning("learner.dtype=bfloat16 on a CPU without AVX512-BF16/AMX: bf16 is emulated and slower "
                     "than float32 here — set learner.dtype=float32 (or auto)")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]

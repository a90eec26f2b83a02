"""Weight broadcast from the ZeRO-3 learner to the generators.

`gather_state_dict` is the collective part: every rank joins `GatheredParameters` bucket by
bucket (peak extra memory = one bucket, not the model); rank 0 copies each bucket to CPU.
`WeightSync` is the transport. `ObjectStoreWeightSync` puts that CPU state_dict in the Ray object
store ONCE, tagged with the policy version; every generator loads it by reference and the object
store does the fan-out (also across nodes). An NCCL broadcast into generator GPUs can replace it
behind the same two calls (see docs/weight_sync.md for the trade-off).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
from torch import nn

BUCKET_BYTES = 256 * 2**20


@dataclass(frozen=True)
class WeightHandle:
    """What a generator needs to load a published policy."""

    version: int
    ref: Any  # transport-specific: a ray.ObjectRef for the object store
    num_bytes: int


class WeightSync(Protocol):
    def publish(self, state: dict[str, torch.Tensor], version: int) -> WeightHandle:
        """Called on learner rank 0 with a CPU state_dict; returns a handle for the generators."""

    def fetch(self, handle: WeightHandle) -> dict[str, torch.Tensor]:
        """Called by a generator: the published state_dict (CPU tensors)."""


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of distinct tensors (tied weights counted once)."""
    seen = {id(t): t.numel() * t.element_size() for t in state.values()}
    return int(sum(seen.values()))


class ObjectStoreWeightSync:
    """One ray.put per version; generators ray.get by reference (zero-copy reads on one node).

    The object is owned by the publishing learner process: it lives as long as rank 0 does,
    and is freed once no handle references it (old versions disappear on their own).
    """

    def publish(self, state: dict[str, torch.Tensor], version: int) -> WeightHandle:
        import ray

        return WeightHandle(version=version, ref=ray.put(state), num_bytes=state_bytes(state))

    def fetch(self, handle: WeightHandle) -> dict[str, torch.Tensor]:
        import ray

        return ray.get(handle.ref)


def load_weights(model: nn.Module, sync: WeightSync, handle: WeightHandle) -> int:
    """Load a published policy into a plain (non-ZeRO) model; -> its version."""
    state = sync.fetch(handle)
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return handle.version


def _is_zero3(t: torch.Tensor) -> bool:
    return hasattr(t, "ds_id")


def _buckets(params: list[nn.Parameter], limit: int) -> list[list[nn.Parameter]]:
    out, cur, size = [], [], 0
    for p in params:
        n = p.ds_numel * p.element_size()
        if cur and size + n > limit:
            out.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += n
    return out + ([cur] if cur else [])


def gather_state_dict(module: nn.Module, rank: int = 0, bucket_bytes: int = BUCKET_BYTES,
                      master: bool = False) -> Optional[dict[str, torch.Tensor]]:
    """Full state_dict of a (possibly ZeRO-3 partitioned) module as CPU tensors on rank 0; None elsewhere.

    Collective under ZeRO-3: every rank must call it. Tied weights share one CPU tensor.
    `master`: trained parameters come from the optimizer's fp32 master copies (bf16 mixed
    precision: the module holds only their bf16 roundings, which must never be published).
    """
    named = module.state_dict(keep_vars=True)  # names incl. aliases; ZeRO-3 params are empty here
    cpu: dict[int, torch.Tensor] = {}
    done: set[int] = set()  # the same on every rank, so the collectives below match
    if master:
        from deepspeed.utils import safe_get_full_fp32_param

        for t in {id(t): t for t in named.values() if t.requires_grad}.values():
            full = safe_get_full_fp32_param(t)  # collective: an all-gather of the fp32 partitions
            if full is not None:
                done.add(id(t))
                if rank == 0:
                    cpu[id(t)] = full.detach().to("cpu", copy=True).view(t.ds_shape if _is_zero3(t) else t.shape)
    sharded = list({id(t): t for t in named.values() if _is_zero3(t) and id(t) not in done}.values())
    if sharded:
        import deepspeed

        for bucket in _buckets(sharded, bucket_bytes):
            with deepspeed.zero.GatheredParameters(bucket, modifier_rank=None):
                if rank == 0:
                    for p in bucket:
                        cpu[id(p)] = p.detach().to("cpu", copy=True)
    if rank != 0:
        return None
    for t in named.values():
        if id(t) not in cpu:
            cpu[id(t)] = t.detach().to("cpu", copy=True)
    return {k: cpu[id(t)] for k, t in named.items()}


def set_fp32_masters(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Overwrite the optimizer's fp32 master copies with exact fp32 values (bf16 mixed precision
    builds them from the bf16-rounded module, which would lose the low bits of fp32 weights).
    Local on every rank: each copies its own partition."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, p in module.named_parameters():
        if p.requires_grad:
            safe_set_full_fp32_param(p, state[name].to(torch.float32))

"""Which samples each rank trains in each optimizer step of one training step (pure planning).

A rollout batch of N samples is trained in `epochs` passes of `mini_batches` optimizer steps
(PPO-style: verl's ppo_mini_batch_size / ppo_epochs). Every rank receives the whole batch, so
every rank can compute the whole plan on its own and no sizes need to be communicated:

- Shards are fixed for the training step (length-balanced: sorted by length, dealt round-robin),
  so the no-grad pass that freezes old log-probs and advantages runs once per rank on exactly the
  samples that rank will train.
- Each epoch reshuffles every rank's shard with a seed all ranks share and splits it into
  `mini_batches` near-equal chunks; mini-batch j is the union of the ranks' chunk j (a stratified
  random subset of the batch). One pass with one mini-batch keeps the shard's length order, so
  the on-policy step is the same as before mini-batches existed.
- Within a chunk, samples are sorted by length and packed into micro-batches of at most
  `micro_batch_size` sequences and, with a token budget, at most `micro_batch_tokens` padded
  tokens (sequences x the longest): short streams share a forward, a long one gets its own.
- ZeRO-3's collectives need every rank to run the same number of forwards: a rank with fewer
  samples in a mini-batch gets empty micro-batches (the worker runs zero-weight dummies).
- Loss denominators are global per mini-batch: the trained tokens and sequences of all ranks'
  chunks, so micro-batch and rank losses sum exactly to the mini-batch loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Update:
    """One optimizer step, seen from one rank."""

    micro: list[list[int]]  # this rank's micro-batches (indices into the batch); [] = dummy
    total_tokens: float  # trained tokens of the mini-batch over all ranks
    total_seqs: float  # trained sequences of the mini-batch over all ranks


def rank_shards(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Length-balanced shards: indices sorted by length, dealt round-robin to the ranks."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[r::world_size] for r in range(world_size)]


def micro_batches(idx: Sequence[int], lengths: Sequence[int], size: int, count: int,
                  max_tokens: int = 0) -> list[list[int]]:
    """`idx` sorted by length and packed into micro-batches of at most `size` sequences and (if
    max_tokens > 0) at most `max_tokens` padded tokens; padded with empty ones up to `count`."""
    out = pack(idx, lengths, size, max_tokens)
    return out + [[] for _ in range(count - len(out))]


def pack(idx: Sequence[int], lengths: Sequence[int], size: int, max_tokens: int = 0) -> list[list[int]]:
    """Greedy packing in ascending length order: a micro-batch closes when one more sequence would
    exceed `size` sequences or `max_tokens` padded tokens (a sequence longer than the budget still
    gets a micro-batch of its own)."""
    out: list[list[int]] = []
    cur: list[int] = []
    for i in sorted(idx, key=lambda j: lengths[j]):
        if cur and (len(cur) >= size or (max_tokens and (len(cur) + 1) * lengths[i] > max_tokens)):
            out.append(cur)
            cur = []
        cur.append(i)
    return out + [cur] if cur else out


def chunks(idx: Sequence[int], n: int) -> list[list[int]]:
    """Split into n contiguous near-equal parts (the first ones one longer)."""
    q, r = divmod(len(idx), n)
    out, start = [], 0
    for k in range(n):
        end = start + q + (1 if k < r else 0)
        out.append(list(idx[start:end]))
        start = end
    return out


def plan_updates(lengths: Sequence[int], trained: Sequence[int], world_size: int, rank: int,
                 micro_batch_size: int, mini_batches: int, epochs: int, seed: int,
                 micro_batch_tokens: int = 0) -> list[Update]:
    """The optimizer steps of one training step, for `rank`.

    lengths: prompt + stream tokens per sample (the forward's cost); trained: tokens that carry
    loss (0 for a sample whose loss is masked, e.g. by overlong filtering). seed: shared by all ranks.
    """
    shards = rank_shards(lengths, world_size)
    gen = torch.Generator().manual_seed(seed)
    updates: list[Update] = []
    for _ in range(epochs):
        per_rank = []
        for shard in shards:
            if mini_batches * epochs > 1:
                shard = [shard[i] for i in torch.randperm(len(shard), generator=gen).tolist()]
            per_rank.append(chunks(shard, mini_batches))
        for j in range(mini_batches):
            parts = [per_rank[r][j] for r in range(world_size)]
            n_micro = max(1, max(len(pack(p, lengths, micro_batch_size, micro_batch_tokens)) for p in parts))
            members = [i for p in parts for i in p]
            updates.append(Update(
                micro=micro_batches(parts[rank], lengths, micro_batch_size, n_micro, micro_batch_tokens),
                total_tokens=float(max(1, sum(trained[i] for i in members))),
                total_seqs=float(max(1, sum(1 for i in members if trained[i] > 0))),
            ))
    return updates


def freeze_batches(lengths: Sequence[int], world_size: int, rank: int, micro_batch_size: int,
                   micro_batch_tokens: int = 0) -> list[list[int]]:
    """Micro-batches of this rank's whole shard for the no-grad freezing pass (same count on every rank)."""
    shards = rank_shards(lengths, world_size)
    n_micro = max(1, max(len(pack(s, lengths, micro_batch_size, micro_batch_tokens)) for s in shards))
    return micro_batches(shards[rank], lengths, micro_batch_size, n_micro, micro_batch_tokens)


def padding_tokens(micro: Sequence[Sequence[int]], lengths: Sequence[int]) -> tuple[int, int]:
    """(real tokens, padded tokens) of a list of micro-batches: what right-padding costs."""
    real = sum(lengths[i] for mb in micro for i in mb)
    padded = sum(len(mb) * max(lengths[i] for i in mb) for mb in micro if mb)
    return real, padded

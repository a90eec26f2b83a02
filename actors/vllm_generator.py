"""The vLLM generator: a vLLM engine driven in segment rounds for the healing policy.

vLLM's prefix cache is a KV cache that can be rewound. Each round sends one request per unfinished
row — its prompt and kept stream, `max_tokens` up to the open segment's boundary — and pushes the
returned tokens through the same `HealingPolicy` the HF backend uses, token by token across rows,
so segments that close together are judged together (in fixed mode, until a row of the group first
erases, every row closes the same position in the same round and all G peers of it are known when
it is judged; a rewound row then trails by a position and is judged against the first attempts that
closed before it, as in the HF loop). A kept segment
extends the next request's prefix; an erased one resubmits the same prefix with a new seed: its
KV blocks are found in the cache and only the last partial block is recomputed. Erased blocks are
never referenced again and are evicted. With healing off, each row is one request to its end.

A kept close inside a request (delimiter mode) keeps the tokens sampled after it: they were drawn
from the right context. After an erasure, the rest of that row's request is discarded.

Log-probs: vLLM returns one per sampled token (`logprobs_mode`, fixed per engine). It is the
sampling distribution's (`processed_logprobs`: after temperature, top-k, top-p) unless the
surprisal must be the T = 1 policy's while sampling differs from it; then the engine returns the
policy's (`raw_logprobs`) and the learner's recompute stands in for behaviour log-probs
(`algo.behaviour_logp: recompute`, enforced by the config). Per-request seeds are drawn from one
seeded generator, but vLLM is not batch-invariant: the same seed need not give bit-identical
tokens in another batch (README, "When things go wrong").
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch

from actors.healing import HealingPolicy, TokenText
from actors.rows import Row
from actors.vllm_engine import Completion, Request, VllmEngine
from e3rl.config import Config, GenConfig, HealConfig
from e3rl.core.threshold import UncertaintyHistory
from e3rl.models import (eos_token_ids, hf_model_dir, model_max_length, resolve_device, resolve_dtype,
                         saved_generation_config)

SEED_RANGE = 2**31 - 1


def logprobs_mode(heal: HealConfig, *gens: GenConfig) -> str:
    """The one kind of log-prob an engine returns, for every sampling setting it will serve (training's
    and evaluation's): `raw_logprobs` when the healing signal must be the T = 1 policy's and some
    setting differs from it (temperature not 0 or 1, top-k, top-p); else `processed_logprobs` (the
    sampling distribution). Where a setting does not reshape the policy the two are the same numbers."""
    reshaped = any(g.reshapes_policy for g in gens)
    return "raw_logprobs" if heal.surprisal_under == "policy" and reshaped else "processed_logprobs"


class VllmGenerator:
    """Batched sampling on a vLLM engine with segment-level erase-and-regenerate (E3RL)."""

    def __init__(self, engine: VllmEngine, tokenizer, gen: GenConfig, heal: HealConfig, heal_active: bool,
                 seed: int, stream_cap: Optional[int] = None, eos: Optional[Sequence[int]] = None):
        self.engine, self.tokenizer, self.gen, self.heal = engine, tokenizer, gen, heal
        self.heal_active = heal_active
        self.stream_cap = stream_cap or Config(gen=gen).stream_cap
        self.rng = torch.Generator().manual_seed(seed)  # draws each request's seed
        self.eos = set(eos_token_ids(tokenizer) if eos is None else eos)
        self.history = UncertaintyHistory(decay=heal.history_decay)  # the run's, set by the actor per call
        self.policy_version = 0
        self.text = TokenText(tokenizer)
        self.force_erase: Optional[Callable] = None  # testing: (row, position) -> erase? (budgets still apply)
        self.stats: dict = {}

    @classmethod
    def from_config(cls, cfg: Config, tokenizer, seed: int, threads: Optional[int] = None) -> "VllmGenerator":
        """An engine on the run's model (same initial weights as the HF backend) sized for a prompt
        of `data.max_prompt_tokens` plus the stream cap, and its generator."""
        d = hf_model_dir(cfg.model, cfg.run.seed)
        device = resolve_device(cfg.model.device)
        length = cfg.data.max_prompt_tokens + cfg.stream_cap
        limit = model_max_length(d, cfg.model)
        engine = VllmEngine(d, resolve_dtype(cfg.model.dtype, device), device, cfg.gen.vllm,
                            min(length, limit) if limit else length, logprobs_mode(cfg.heal, cfg.gen, cfg.eval_gen), seed, threads,
                            trust_remote_code=cfg.model.trust_remote_code)
        return cls(engine, tokenizer, cfg.gen, cfg.heal, cfg.heal_active, seed, stream_cap=cfg.stream_cap,
                   eos=eos_token_ids(tokenizer, saved_generation_config(d)))

    # ------------------------------------------------------------ public API
    def load_weights(self, state_dict: dict, version: int) -> None:
        """Load HF-named weights into the engine in place (tied weights may be absent) and reset its prefix cache."""
        self.receive_weights(state_dict.items(), version)

    def receive_weights(self, named: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Stream (name, tensor) pairs into the engine as they arrive (vLLM's reload consumes an
        iterator), then reset its prefix cache. -1 until the stream ends (see the HF generator)."""
        self.policy_version = -1
        self.engine.load_weights_stream(named)
        self.policy_version = version

    @torch.inference_mode()
    def generate(self, prompts: list, group_ids: list, prompt_uids: Optional[list] = None) -> list:
        """G = gen.group_size trajectories per prompt, grouped by prompt (sample_index 0..G-1)."""
        _check_mode(self.engine, self.gen, self.heal)
        policy = HealingPolicy(self.gen, self.heal, self.heal_active, self.history, self.stream_cap, self.eos,
                               self.text, self.force_erase)
        rows = policy.rows(prompts, group_ids, prompt_uids)
        self.stats = {"rounds": 0, "requests": 0, "rewind_requests": 0, "rewind_recomputed_tokens": 0,
                      "rewind_recomputed_max": 0, "rewind_cached_min": -1, "prefix_tokens": 0, "cached_tokens": 0}
        rewound: set = set()  # rows whose next request resubmits an erased segment's prefix
        live = rows
        while live:
            requests = [self._request(r, seed) for r, seed in zip(live, self._seeds(len(live)))]
            done = self.engine.generate(requests, self.gen.temperature, self.gen.top_k, self.gen.top_p, self.eos)
            if not any(c.token_ids for c in done):  # nothing can change: never loop on it
                raise RuntimeError(f"vLLM returned no tokens for {len(done)} requests (longest prompt "
                                   f"{max(len(r.prompt) for r in requests)}): is data.max_prompt_tokens + the "
                                   "stream cap beyond the model's max_position_embeddings?")
            self._account(live, done, rewound)
            rewound = self._push(policy, live, done)
            live = [r for r in live if not r.finish]
        return [policy.trajectory(r, self.policy_version) for r in rows]

    # ------------------------------------------------------------ rounds
    def _seeds(self, n: int) -> list:
        return torch.randint(0, SEED_RANGE, (n,), generator=self.rng).tolist()

    def _request(self, r: Row, seed: int) -> Request:
        """The row's prompt and kept stream, to one token past the open segment's boundary (or to its
        end when not healing). The extra token is the next segment's first: kept if the segment is,
        and then the next request's prefix ends one token into a new KV block instead of at a block
        boundary, where vLLM (which must compute a prompt's last token) would recompute a whole block."""
        budget = min(self.gen.max_new_tokens - r.stream.kept, self.stream_cap - len(r.stream))
        if self.heal_active:
            seg = self.heal.segment_tokens if self.heal.segment_mode == "fixed" else self.heal.max_segment_tokens
            budget = min(budget, seg - r.open.segmenter.open_len + 1)
        return Request(r.prompt + r.stream.kept_ids(), max(budget, 1), seed)

    def _push(self, policy: HealingPolicy, live: list, done: list) -> set:
        """Feed each row's returned tokens to the policy in lock-step. -> ids of rows that rewound."""
        cursor = [0] * len(live)
        active = [k for k in range(len(live)) if done[k].token_ids]
        rewound = set()
        while active:
            rows = [live[k] for k in active]
            toks = [done[k].token_ids[cursor[k]] for k in active]
            lps = [done[k].logprobs[cursor[k]] for k in active]
            positions = [len(r.prompt) + r.stream.kept for r in rows]
            decisions = policy.push(rows, toks, lps, [-x for x in lps], positions)
            nxt = []
            for k, d in zip(active, decisions):
                cursor[k] += 1
                if d.rewind is not None:
                    rewound.add(id(live[k]))  # the rest of this request followed the erased segment
                elif not live[k].finish and cursor[k] < len(done[k].token_ids):
                    nxt.append(k)
            active = nxt
        return rewound

    def _account(self, live: list, done: list, rewound: set) -> None:
        """Forward tokens per row (prompt tokens not served from the cache + fed sampled tokens) and
        the prefix-cache figures; a request after an erasure counts what it recomputed."""
        st = self.stats
        st["rounds"] += 1
        st["requests"] += len(done)
        for r, c in zip(live, done):
            recomputed = c.prompt_tokens - c.cached_tokens
            r.forward_tokens += recomputed + max(len(c.token_ids) - 1, 0)
            st["prefix_tokens"] += c.prompt_tokens
            st["cached_tokens"] += c.cached_tokens
            if id(r) in rewound:
                st["rewind_requests"] += 1
                st["rewind_recomputed_tokens"] += recomputed
                st["rewind_recomputed_max"] = max(st["rewind_recomputed_max"], recomputed)
                least = st["rewind_cached_min"]
                st["rewind_cached_min"] = c.cached_tokens if least < 0 else min(least, c.cached_tokens)


def _check_mode(engine: VllmEngine, gen: GenConfig, heal: HealConfig) -> None:
    """An engine returns one kind of log-prob; a call whose sampling needs the other would mislabel
    them (unless its sampling does not reshape the policy: then raw and processed agree)."""
    want = logprobs_mode(heal, gen)
    if engine.logprobs_mode != want and gen.reshapes_policy:
        raise ValueError(f"this vLLM engine returns {engine.logprobs_mode}, but gen/heal now need {want}: "
                         "build the engine from the same gen.temperature / top_k / top_p / heal.surprisal_under")

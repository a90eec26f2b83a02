"""The rewindable generator: the HF engine that decodes for the healing policy.

Each sampled token's behaviour log-prob and surprisal are read off the logits the decode step
already computed and pushed to the `HealingPolicy` (actors/healing.py), which segments, judges
and budgets; this class only decodes and rewinds. When the policy erases a segment, the row's
cache columns become invisible (`RowCache.rewind`), its logical positions restart at the segment
start and its next token is re-sampled from the logits stored when the segment began. Nothing is
recomputed and other rows keep decoding. The whole stream (kept and erased tokens) is returned as
a `Trajectory`, so the learner can replay exactly what every token saw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

from actors.healing import Decision, HealingPolicy, TokenText
from actors.kv_rewind import RowCache
from actors.sampling import sample_scored
from e3rl.config import Config, GenConfig, HealConfig
from e3rl.core.surprisal import token_logprobs
from e3rl.core.threshold import UncertaintyHistory
from e3rl.models import eos_token_ids


@dataclass
class _Batch:
    """Rows decoding together and their device state (all indexed by batch position)."""

    rows: list  # [Row]
    cols: list  # physical cache column of each row's open-segment start (the next write column until fed)
    kv: RowCache
    start_logits: torch.Tensor  # [B, V] logits that sampled each open segment's first token
    line_logits: Optional[torch.Tensor]  # [B, V] step mode: logits of the last token after a newline

    def select(self, keep: list) -> None:
        idx = torch.tensor(keep, dtype=torch.long, device=self.start_logits.device)
        self.rows = [self.rows[i] for i in keep]
        self.cols = [self.cols[i] for i in keep]
        self.kv.select(idx)
        self.start_logits = self.start_logits[idx]
        if self.line_logits is not None:
            self.line_logits = self.line_logits[idx]


class RewindableGenerator:
    """Batched sampling over a HF causal LM with segment-level erase-and-regenerate (E3RL)."""

    def __init__(self, model, tokenizer, gen: GenConfig, heal: HealConfig, heal_active: bool, seed: int,
                 stream_cap: Optional[int] = None, eos_token_ids: Optional[Sequence[int]] = None):
        self.model, self.tokenizer, self.gen, self.heal = model, tokenizer, gen, heal
        self.heal_active = heal_active
        self.stream_cap = stream_cap or Config(gen=gen).stream_cap  # the one derivation lives in Config
        self.device = next(model.parameters()).device
        self.rng = torch.Generator(device=self.device).manual_seed(seed)
        self.eos = set(self._default_eos() if eos_token_ids is None else eos_token_ids)
        # the run's history, read-only while generating: the driver folds each training step's
        # judged first attempts in once, pooled over all generators (`UncertaintyHistory.update`)
        self.history = UncertaintyHistory(decay=heal.history_decay)
        self.policy_version = 0
        self.text = TokenText(tokenizer)
        self.sample_hook: Optional[Callable] = None  # testing: (rows, logits [R, V]) before each sampling
        self.force_erase: Optional[Callable] = None  # testing: (row, position) -> erase? (budgets still apply)
        self.stats: dict = {}

    @classmethod
    def from_config(cls, model, tokenizer, cfg: Config, seed: int) -> "RewindableGenerator":
        return cls(model, tokenizer, cfg.gen, cfg.heal, cfg.heal_active, seed, stream_cap=cfg.stream_cap)

    def _default_eos(self) -> list:
        return eos_token_ids(self.tokenizer, getattr(self.model, "generation_config", None))

    # ------------------------------------------------------------ public API
    def load_weights(self, state_dict: dict, version: int) -> None:
        """Copy a (CPU) state dict into the model; tied weights may be absent from it."""
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        tied = _tied_names(self.model)
        if unexpected or set(missing) - tied:
            raise KeyError(f"load_weights: missing {sorted(set(missing) - tied)} unexpected {sorted(unexpected)}")
        self.policy_version = version

    @torch.no_grad()
    def receive_weights(self, named: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy streamed (name, tensor) pairs into the model as they arrive (a tied alias shares its
        tensor). The version is -1 until the stream ends: a stream that breaks leaves the model
        half-updated and marked so, and it is reloaded before it samples again."""
        params = self.model.state_dict(keep_vars=True)
        self.policy_version = -1
        for name, t in named:
            params[name].data.copy_(t)
        self.policy_version = version

    @torch.inference_mode()
    def generate(self, prompts: list, group_ids: list, prompt_uids: Optional[list] = None) -> list:
        """G = gen.group_size trajectories per prompt, grouped by prompt (sample_index 0..G-1)."""
        # built per call: the actor may override gen / heal_active / history between calls
        policy = HealingPolicy(self.gen, self.heal, self.heal_active, self.history, self.stream_cap, self.eos,
                               self.text, self.force_erase)
        rows = policy.rows(prompts, group_ids, prompt_uids)
        self.stats = {"steps": 0, "compactions": 0, "peak_cache_bytes": 0, "peak_columns": 0}
        chunk = self.gen.rows_per_forward or len(rows)
        for a in range(0, len(rows), chunk):
            self._decode(policy, rows[a : a + chunk])
        return [policy.trajectory(r, self.policy_version) for r in rows]

    # ------------------------------------------------------------ decode loop
    def _decode(self, policy: HealingPolicy, rows: list) -> None:
        """Prefill the chunk, then one forward per step until every row has finished."""
        batch, logits = self._prefill(rows)
        while True:
            next_tok = self._sample_step(policy, batch, logits)
            done = [i for i, r in enumerate(batch.rows) if r.finish]
            if done:
                keep = [i for i, r in enumerate(batch.rows) if not r.finish]
                if not keep:
                    return
                next_tok = next_tok[torch.tensor(keep, device=next_tok.device)]
                batch.select(keep)
            self._maybe_compact(batch)
            out = self.model(input_ids=next_tok.unsqueeze(1), use_cache=True, **batch.kv.step_inputs())
            batch.kv.advance()
            for r in batch.rows:
                r.forward_tokens += 1
            logits = out.logits[:, -1, :]
            self._track(batch)

    def _prefill(self, rows: list):
        width = max(len(r.prompt) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
            mask[b, width - len(r.prompt):] = 1
            r.forward_tokens += len(r.prompt)
        kv = RowCache(mask.to(self.device), self.stream_cap, config=self.model.config)
        out = self.model(input_ids=ids.to(self.device), use_cache=True, logits_to_keep=1, **kv.prefill_inputs())
        kv.advance(width)
        logits = out.logits[:, -1, :]
        step_mode = self.heal_active and self.heal.segment_mode == "delimiter" and self.heal.delimiter == "step"
        batch = _Batch(rows, [0] * len(rows), kv, torch.zeros_like(logits),
                       torch.zeros_like(logits) if step_mode else None)
        self._track(batch)
        return batch, logits

    def _sample_step(self, policy: HealingPolicy, batch: _Batch, logits: torch.Tensor) -> torch.Tensor:
        """Sample every row's next token; rows that erase re-sample at once from stored logits."""
        # rows that rewind get their stored logits written into this (fresh, owned) tensor
        next_tok = torch.empty(len(batch.rows), dtype=torch.long, device=logits.device)
        need = list(range(len(batch.rows)))
        while need:
            idx = torch.tensor(need, device=logits.device)
            z = logits if len(need) == len(batch.rows) else logits[idx]  # [R, V]
            if self.sample_hook is not None:
                self.sample_hook([batch.rows[i] for i in need], z)
            g = self.gen
            tok, logp = sample_scored(z, g.temperature, g.top_k, g.top_p, self.rng)
            next_tok[idx] = tok
            need = self._record(policy, batch, need, idx, z, tok, logp, logits)
        return next_tok

    def _record(self, policy: HealingPolicy, batch: _Batch, need: list, idx: torch.Tensor, z: torch.Tensor,
                tok: torch.Tensor, logp: torch.Tensor, logits: torch.Tensor) -> list:
        """Push the sampled tokens with their behaviour log-probs (under the sampling distribution) to
        the policy and carry out its decisions. -> rows to re-sample."""
        logp_is_surprisal = self.heal.surprisal_under == "sampling" or not self.gen.reshapes_policy
        surp = -logp if logp_is_surprisal else -token_logprobs(z, tok, 1.0)
        decisions = policy.push([batch.rows[i] for i in need], tok.tolist(), logp.tolist(), surp.tolist(),
                                batch.kv.pos[idx].tolist())
        if self.heal_active:
            self._store_logits(batch.start_logits, idx, z, [k for k, d in enumerate(decisions) if d.opened])
            if batch.line_logits is not None:
                self._store_logits(batch.line_logits, idx, z, [k for k, d in enumerate(decisions) if d.line_start])
        return [i for i, d in zip(need, decisions) if self._apply(batch, i, d, logits)]

    def _apply(self, batch: _Batch, i: int, d: Decision, logits: torch.Tensor) -> bool:
        """Note where row i's open segment starts in the cache; rewind it if erased. -> re-sample?"""
        newest = batch.kv.length  # the column the row's newest token is written to when fed
        if d.opened:
            batch.cols[i] = newest
        if d.carried is not None:  # the carried tokens were fed in order, up to the newest
            batch.cols[i] = newest - (len(batch.rows[i].stream) - 1 - d.carried)
            if batch.rows[i].open.resumable and batch.line_logits is not None:
                batch.start_logits[i] = batch.line_logits[i]
        if d.rewind is None:
            return False
        batch.kv.rewind(i, batch.cols[i], d.rewind.position)
        logits[i] = batch.start_logits[i]
        return True

    @staticmethod
    def _store_logits(buf: torch.Tensor, idx: torch.Tensor, z: torch.Tensor, ks: list) -> None:
        if ks:
            k = torch.tensor(ks, device=z.device)
            buf[idx[k]] = z[k]

    # ------------------------------------------------------------ cache upkeep
    def _maybe_compact(self, batch: _Batch) -> None:
        """Compact when erased/padding slots exceed `compact_fraction` of the columns."""
        kv = batch.kv
        if not self.heal_active or kv.free_columns() <= self.heal.compact_fraction * kv.length:
            return
        batch.cols = kv.compact(torch.tensor(batch.cols, device=kv.mask.device)).tolist()
        for r in batch.rows:
            r.compactions += 1
        self.stats["compactions"] += 1

    def _track(self, batch: _Batch) -> None:
        st = self.stats
        st["steps"] += 1
        st["cache_bytes"], st["columns"] = batch.kv.nbytes(), batch.kv.length
        st["peak_cache_bytes"] = max(st["peak_cache_bytes"], st["cache_bytes"])
        st["peak_columns"] = max(st["peak_columns"], st["columns"])


def _tied_names(model) -> set:
    """Parameter names that alias another parameter (tied embeddings): optional in a state dict."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.update({name, seen[id(p)]})
        seen.setdefault(id(p), name)
    return tied

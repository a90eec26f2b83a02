"""The rewindable generator: batched decoding that erases and regenerates uncertain segments.

Each sampled token's surprisal is read off the logits the decode step already computed. A row's
stream is cut into segments (`StreamSegmenter`); when a segment closes, its composite uncertainty
is compared with a group-relative adaptive threshold and, within budgets, the segment is ERASED:
its cache columns become invisible (`RowCache.rewind`), the row's logical positions restart at
the segment start and its next token is re-sampled from the logits stored when the segment began.
Nothing is recomputed and other rows keep decoding. The whole stream (kept and erased tokens) is
returned as a `Trajectory`, so the learner can replay exactly what every token saw.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from actors.kv_rewind import RowCache
from actors.sampling import sample
from e3rl.config import Config, GenConfig, HealConfig
from e3rl.core.segments import SegmentSpec, StreamSegmenter
from e3rl.core.surprisal import token_logprobs
from e3rl.core.threshold import ThresholdParams, UncertaintyHistory, segment_threshold, should_erase
from e3rl.core.trajectory import NEVER, SegmentTable, Trajectory
from e3rl.core.uncertainty import UncertaintyWeights, segment_uncertainty


@dataclass
class RowState:
    """Host-side record of one sample while it decodes (cheap per-token Python bookkeeping)."""

    group: int
    sample: int
    prompt: list
    prompt_uid: str
    segmenter: StreamSegmenter
    ids: list = field(default_factory=list)  # stream tokens, generation order
    logp: list = field(default_factory=list)
    surprisal: list = field(default_factory=list)
    positions: list = field(default_factory=list)  # logical position of each stream token
    erased_at: list = field(default_factory=list)
    texts: list = field(default_factory=list)  # kept token texts (stop strings only)
    attempts: list = field(default_factory=list)  # (position, start, end, U, tau, erase_count, erased)
    seg_start: int = 0  # stream index of the open segment's first token
    seg_col: int = 0  # its physical cache column (the next write column until it is fed)
    seg_pos: int = 0  # its logical position
    start_known: bool = True  # its sampling logits are stored (else it is never erased)
    position: int = 0  # logical index n of the open segment
    after_newline: bool = False  # the last kept token's text holds a newline (step-mode carry starts)
    newline_start: int = -1  # stream index whose logits sit in the batch's `newline_logits`
    seg_erases: int = 0  # erasures of position n so far
    traj_erases: int = 0
    prev_mean: Optional[float] = None  # mean surprisal of the previous kept segment
    kept: int = 0
    finish: str = ""
    forward_tokens: int = 0
    compactions: int = 0

    def kept_ids(self) -> list:
        return [t for t, e in zip(self.ids, self.erased_at) if e == NEVER]


@dataclass
class _Close:
    """A segment closing this round: stream span [start, end) of row `i`, judged together with peers."""

    i: int
    row: RowState
    start: int
    end: int
    frozen: bool  # may not be erased (stream cap reached, or its start logits are unknown)
    u: float = float("nan")
    tau: float = float("inf")


@dataclass
class _Batch:
    """Rows decoding together and their device state (all indexed by batch position)."""

    rows: list
    kv: RowCache
    start_logits: torch.Tensor  # [B, V] logits that sampled each open segment's first token
    newline_logits: Optional[torch.Tensor]  # [B, V] step mode: logits of the last token after a newline

    def select(self, keep: list) -> None:
        idx = torch.tensor(keep, dtype=torch.long, device=self.start_logits.device)
        self.rows = [self.rows[i] for i in keep]
        self.kv.select(idx)
        self.start_logits = self.start_logits[idx]
        if self.newline_logits is not None:
            self.newline_logits = self.newline_logits[idx]


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
        self.spec = SegmentSpec(mode=heal.segment_mode, length=heal.segment_tokens, delimiter=heal.delimiter,
                                min_len=heal.min_segment_tokens, max_len=heal.max_segment_tokens)
        self.weights = UncertaintyWeights(heal.w_mean, heal.w_peak, heal.w_delta, heal.smooth_window)
        self.params = ThresholdParams(heal.threshold_k, heal.penalty_scale, heal.penalty_base,
                                      heal.history_weight, heal.min_peers, heal.spread_prior)
        # the run's history, read-only while generating: the driver folds each training step's
        # accepted segments in once, pooled over all generators (`UncertaintyHistory.update`)
        self.history = UncertaintyHistory(decay=heal.history_decay)
        self.policy_version = 0
        self.needs_text = heal.segment_mode == "delimiter" or bool(gen.stop)
        self._texts: dict = {}
        self._stop_tail = max((len(s) for s in gen.stop), default=0)
        self.sample_hook: Optional[Callable] = None  # testing: (rows, logits [R, V]) before each sampling
        self.force_erase: Optional[Callable] = None  # testing: (row, position) -> erase? (budgets still apply)
        self.stats: dict = {}

    @classmethod
    def from_config(cls, model, tokenizer, cfg: Config, seed: int) -> "RewindableGenerator":
        return cls(model, tokenizer, cfg.gen, cfg.heal, cfg.heal_active, seed, stream_cap=cfg.stream_cap)

    def _default_eos(self) -> list:
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.tokenizer):
            e = getattr(src, "eos_token_id", None)
            ids.update(e if isinstance(e, (list, tuple)) else [] if e is None else [e])
        return sorted(ids)

    # ------------------------------------------------------------ public API
    def load_weights(self, state_dict: dict, version: int) -> None:
        """Copy a (CPU) state dict into the model; tied weights may be absent from it."""
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        tied = _tied_names(self.model)
        if unexpected or set(missing) - tied:
            raise KeyError(f"load_weights: missing {sorted(set(missing) - tied)} unexpected {sorted(unexpected)}")
        self.policy_version = version

    @torch.inference_mode()
    def generate(self, prompts: list, group_ids: list, prompt_uids: Optional[list] = None) -> list:
        """G = gen.group_size trajectories per prompt, grouped by prompt (sample_index 0..G-1)."""
        g = self.gen.group_size
        uids = prompt_uids or [""] * len(prompts)
        if not (len(prompts) == len(group_ids) == len(uids)):
            raise ValueError(f"generate: {len(prompts)} prompts, {len(group_ids)} group_ids, {len(uids)} prompt_uids"
                             " — pass one of each per prompt")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate: an empty prompt — every prompt needs at least one token (e.g. BOS)")
        rows = [RowState(group=gid, sample=j, prompt=[int(x) for x in p], prompt_uid=uid,
                         segmenter=StreamSegmenter(self.spec))
                for p, gid, uid in zip(prompts, group_ids, uids) for j in range(g)]
        self._peers = defaultdict(dict)  # (group, position) -> {sample: U of its kept segment}
        self.stats = {"steps": 0, "compactions": 0, "peak_cache_bytes": 0, "peak_columns": 0}
        chunk = self.gen.rows_per_forward or len(rows)
        for a in range(0, len(rows), chunk):
            self._decode(rows[a : a + chunk])
        return [self._trajectory(r) for r in rows]

    # ------------------------------------------------------------ decode loop
    def _decode(self, rows: list) -> None:
        """Prefill the chunk, then one forward per step until every row has finished."""
        batch, logits = self._prefill(rows)
        while True:
            next_tok = self._sample_step(batch, logits)
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
        step_mode = self.heal_active and self.spec.mode == "delimiter" and self.spec.delimiter == "step"
        batch = _Batch(rows, kv, torch.zeros_like(logits), torch.zeros_like(logits) if step_mode else None)
        self._track(batch)
        return batch, logits

    def _sample_step(self, batch: _Batch, logits: torch.Tensor) -> torch.Tensor:
        """Sample every row's next token; rows that erase re-sample at once from stored logits."""
        # rows that rewind get their stored logits written into this (fresh, owned) tensor
        next_tok = torch.empty(len(batch.rows), dtype=torch.long, device=logits.device)
        need = list(range(len(batch.rows)))
        while need:
            idx = torch.tensor(need, device=logits.device)
            z = logits if len(need) == len(batch.rows) else logits[idx]  # [R, V]
            if self.sample_hook is not None:
                self.sample_hook([batch.rows[i] for i in need], z)
            tok = sample(z, self.gen.temperature, self.gen.top_k, self.gen.top_p, self.rng)
            next_tok[idx] = tok
            need = self._record(batch, need, idx, z, tok, logits)
        return next_tok

    def _record(self, batch: _Batch, need: list, idx: torch.Tensor, z: torch.Tensor, tok: torch.Tensor,
                logits: torch.Tensor) -> list:
        """Append the sampled tokens to their rows; judge closing segments; return rows to re-sample."""
        t = self.gen.temperature
        logp = token_logprobs(z, tok, t)
        surp = -logp if self.heal.surprisal_under == "sampling" or t in (0.0, 1.0) else -token_logprobs(z, tok, 1.0)
        toks, lps, sps = tok.tolist(), logp.tolist(), surp.tolist()
        poss = batch.kv.pos[idx].tolist()
        col = batch.kv.length  # where each sampled token will be written when fed
        fresh, after_nl, closes = [], [], []
        for k, i in enumerate(need):
            r = batch.rows[i]
            if r.segmenter.open_len == 0:
                fresh.append(k)
                r.seg_start, r.seg_col, r.seg_pos, r.start_known = len(r.ids), col, poss[k], True
            if r.after_newline:
                after_nl.append(k)
                r.newline_start = len(r.ids)
            r.ids.append(toks[k]); r.logp.append(lps[k]); r.surprisal.append(sps[k])
            r.positions.append(poss[k]); r.erased_at.append(NEVER)
            r.kept += 1
            text = self._text(toks[k]) if self.needs_text else ""
            r.after_newline = "\n" in text
            if self.gen.stop:
                r.texts.append(text)
            cut = r.segmenter.push(text)
            r.finish = self._finish_reason(r, toks[k])
            if cut is not None:
                closes.append(_Close(i, r, r.seg_start, len(r.ids) - r.segmenter.open_len, self._capped(r)))
        if self.heal_active:
            self._store_logits(batch.start_logits, idx, z, fresh)
            if batch.newline_logits is not None:
                self._store_logits(batch.newline_logits, idx, z, after_nl)
        erased = self._apply(batch, closes, logits)
        sampled = set(need)
        finals = [_Close(i, r, r.seg_start, len(r.ids), self._capped(r)) for i, r in enumerate(batch.rows)
                  if i in sampled and r.finish and r.segmenter.open_len > 0]
        erased += self._apply(batch, finals, logits, final=True)
        return sorted(erased)

    @staticmethod
    def _store_logits(buf: torch.Tensor, idx: torch.Tensor, z: torch.Tensor, ks: list) -> None:
        if ks:
            k = torch.tensor(ks, device=z.device)
            buf[idx[k]] = z[k]

    def _apply(self, batch: _Batch, closes: list, logits: torch.Tensor, final: bool = False) -> list:
        """Judge closes together, rewind the erased rows, advance the kept ones. Returns erased rows."""
        if not closes:
            return []
        erase = self._judge(closes)
        out = []
        for c, e in zip(closes, erase):
            r = c.row
            if e:
                self._rewind(batch, c, logits)
                out.append(c.i)
                continue
            r.attempts.append((r.position, c.start, c.end, c.u, c.tau, r.seg_erases, False))
            r.prev_mean = sum(r.surprisal[c.start : c.end]) / (c.end - c.start)
            r.position, r.seg_erases = r.position + 1, 0
            if final:
                r.segmenter.reset()
            elif c.end < len(r.ids):  # a step-mode carry opens the next segment
                self._open_carry(batch, c)
        return out

    def _open_carry(self, batch: _Batch, c: _Close) -> None:
        """The carried tokens start the new segment (the first follows a newline: its logits are kept)."""
        r, carry = c.row, len(c.row.ids) - c.end
        r.seg_start, r.seg_pos = c.end, r.positions[c.end]
        r.seg_col = batch.kv.length - (carry - 1)  # the last carried token is the one not yet fed
        r.start_known = batch.newline_logits is not None and r.newline_start == c.end
        if r.start_known:
            batch.start_logits[c.i] = batch.newline_logits[c.i]

    def _rewind(self, batch: _Batch, c: _Close, logits: torch.Tensor) -> None:
        """Erase [start, stream end) of a row: hide its columns, restart positions, restore logits."""
        r, s = c.row, len(c.row.ids)
        r.attempts.append((r.position, c.start, s, c.u, c.tau, r.seg_erases, True))
        for j in range(c.start, s):
            r.erased_at[j] = s
        r.kept -= s - c.start
        if self.gen.stop:
            del r.texts[len(r.texts) - (s - c.start):]
        r.seg_erases += 1
        r.traj_erases += 1
        r.finish = ""
        r.segmenter.reset()
        kept_before = [t for t, e in zip(r.ids[: c.start], r.erased_at[: c.start]) if e == NEVER]
        r.after_newline = bool(kept_before) and self.needs_text and "\n" in self._text(kept_before[-1])
        batch.kv.rewind(c.i, r.seg_col, r.seg_pos)
        logits[c.i] = batch.start_logits[c.i]

    def _judge(self, closes: list) -> list:
        """Composite U; threshold from the other samples of the group at the same position (kept
        earlier or closing now); budgeted decision. A segment that may not be erased (stream cap,
        unknown start logits) is not judged: its threshold stays inf."""
        for c in closes:
            s = torch.tensor(c.row.surprisal[c.start : c.end])
            c.u = segment_uncertainty(s, c.row.prev_mean, self.weights)
        if not self.heal_active:
            return [False] * len(closes)
        now = defaultdict(dict)
        for c in closes:
            now[(c.row.group, c.row.position)][c.row.sample] = c.u
        for c in closes:
            if c.frozen or not c.row.start_known:
                continue
            key = (c.row.group, c.row.position)
            peers = {**self._peers[key], **now[key]}
            peers.pop(c.row.sample)
            c.tau = segment_threshold(torch.tensor(list(peers.values())), c.row.seg_erases, self.history,
                                      self.params)
        u, tau = torch.tensor([c.u for c in closes]), torch.tensor([c.tau for c in closes])
        if self.force_erase is not None:
            u = torch.tensor([float(bool(self.force_erase(c.row, c.row.position))) for c in closes])
            tau = torch.full_like(u, 0.5)
        erase = should_erase(u, tau,
                             torch.tensor([c.row.seg_erases for c in closes]),
                             torch.tensor([c.row.traj_erases for c in closes]),
                             self.heal.max_erases_per_segment, self.heal.max_erases_per_traj).tolist()
        erase = [e and not c.frozen and c.row.start_known for e, c in zip(erase, closes)]
        for c, e in zip(closes, erase):
            if not e:
                self._peers[(c.row.group, c.row.position)][c.row.sample] = c.u
        return erase

    # ------------------------------------------------------------ helpers
    def _capped(self, r: RowState) -> bool:
        return len(r.ids) >= self.stream_cap

    def _finish_reason(self, r: RowState, tok: int) -> str:
        if tok in self.eos:
            return "eos"
        if self.gen.stop:
            tail = "".join(r.texts[-self._stop_tail:])
            if any(s in tail for s in self.gen.stop):
                return "stop"
        if r.kept >= self.gen.max_new_tokens:
            return "length"
        if self._capped(r):
            return "stream_cap"
        return ""

    def _text(self, tok: int) -> str:
        """Per-id decoded text (cached): what delimiter segmentation and stop strings read."""
        s = self._texts.get(tok)
        if s is None:
            s = self._texts[tok] = self.tokenizer.decode([tok], skip_special_tokens=False,
                                                         clean_up_tokenization_spaces=False)
        return s

    def _maybe_compact(self, batch: _Batch) -> None:
        """Compact when erased/padding slots exceed `compact_fraction` of the columns."""
        kv = batch.kv
        if not self.heal_active or kv.free_columns() <= self.heal.compact_fraction * kv.length:
            return
        cols = torch.tensor([r.seg_col for r in batch.rows], device=kv.mask.device)
        for r, c in zip(batch.rows, kv.compact(cols).tolist()):
            r.seg_col = c
            r.compactions += 1
        self.stats["compactions"] += 1

    def _track(self, batch: _Batch) -> None:
        st = self.stats
        st["steps"] += 1
        st["cache_bytes"], st["columns"] = batch.kv.nbytes(), batch.kv.length
        st["peak_cache_bytes"] = max(st["peak_cache_bytes"], st["cache_bytes"])
        st["peak_columns"] = max(st["peak_columns"], st["columns"])

    def _trajectory(self, r: RowState) -> Trajectory:
        a = list(zip(*r.attempts)) if r.attempts else [[]] * 7
        segs = SegmentTable(
            position=torch.tensor(a[0], dtype=torch.long), start=torch.tensor(a[1], dtype=torch.long),
            end=torch.tensor(a[2], dtype=torch.long), uncertainty=torch.tensor(a[3], dtype=torch.float32),
            threshold=torch.tensor(a[4], dtype=torch.float32), erase_count=torch.tensor(a[5], dtype=torch.long),
            erased=torch.tensor(a[6], dtype=torch.bool))
        return Trajectory(
            prompt_ids=torch.tensor(r.prompt, dtype=torch.long), stream_ids=torch.tensor(r.ids, dtype=torch.long),
            behavior_logp=torch.tensor(r.logp, dtype=torch.float32),
            surprisal=torch.tensor(r.surprisal, dtype=torch.float32),
            erased_at=torch.tensor(r.erased_at, dtype=torch.long),
            position_ids=torch.tensor(r.positions, dtype=torch.long), segments=segs, group_id=r.group,
            sample_index=r.sample, policy_version=self.policy_version, prompt_uid=r.prompt_uid,
            response_text=self.tokenizer.decode(r.kept_ids(), skip_special_tokens=True),
            finish_reason=r.finish, forward_tokens=r.forward_tokens, rewinds=r.traj_erases,
            compactions=r.compactions)


def _tied_names(model) -> set:
    """Parameter names that alias another parameter (tied embeddings): optional in a state dict."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.update({name, seen[id(p)]})
        seen.setdefault(id(p), name)
    return tied

"""The healing policy: what E3RL keeps and what it erases, for any decoding engine.

An engine (the HF decode loop in `generator.py`) samples tokens and owns the KV cache; this
class owns every decision about them, so all engines heal alike and none copies the logic:
- segments: each pushed token goes through its row's `StreamSegmenter` (fixed or delimiter mode);
- judging: a closed segment's composite uncertainty against the segment-level threshold, from the
  group's peers at that position, the run history and the erase count (docs/method.md §3–§4);
- budgets (erases per segment position and per trajectory) and the stream cap, which bound a row;
- the record: segment attempts, erased_at, positions, behaviour log-probs, surprisal, finish.

The engine calls `push` with each sampled token's id, behaviour log-prob, surprisal and logical
position for a set of rows, and applies the returned `Decision`s (remember where a segment opened;
rewind an erased row to its segment start and sample again). Nothing here touches a model or a
cache, so the policy is tested with scripted surprisal (tests/actors/test_healing_policy.py).
One policy serves one generate call: the peers it judges against are that call's groups.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

from actors.rows import Attempt, OpenSegment, Row, Stream
from e3rl.config import GenConfig, HealConfig
from e3rl.core.segments import SegmentSpec, StreamSegmenter
from e3rl.core.threshold import (ThresholdParams, UncertaintyHistory, gap_score, segment_reference, should_erase,
                                 threshold_from)
from e3rl.core.trajectory import SegmentTable, Trajectory
from e3rl.core.uncertainty import UncertaintyWeights, segment_uncertainty


@dataclass(frozen=True)
class Rewind:
    """Erase the row's tail from stream index `start`; its next token is sampled at `position`
    from the distribution that sampled the erased segment's first token."""

    start: int
    position: int


@dataclass
class Decision:
    """What one row's pushed token asks of the engine, to be applied in field order."""

    opened: bool = False  # the token opened a segment: keep its sampling distribution (a rewind resumes there)
    line_start: bool = False  # it follows a newline: a carried `Step k` segment may open here later
    carried: Optional[int] = None  # a kept close carried tokens over: the open segment now starts here
    rewind: Optional[Rewind] = None


class TokenText:
    """Decoded text per token id (cached; what delimiter segments and stop strings read) and the
    response text of kept ids. Lives as long as the tokenizer, across generate calls."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._pieces: dict = {}

    def piece(self, tok: int) -> str:
        s = self._pieces.get(tok)
        if s is None:
            s = self._pieces[tok] = self.tokenizer.decode([tok], skip_special_tokens=False,
                                                          clean_up_tokenization_spaces=False)
        return s

    def response(self, ids: list) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class _Close:
    """A segment closing this round: stream span [start, end) of pushed row `k`, judged with its peers."""

    k: int
    row: Row
    start: int
    end: int
    frozen: bool  # may not be erased: the stream cap is reached
    u: float = float("nan")
    tau: float = float("nan")  # nan: not judged; inf: judged without a reference (never erased)
    score: float = float("nan")  # gap score against the reference (nan: none)


class HealingPolicy:
    """Segments, judges and budgets the rows of one generate call; builds their trajectories."""

    def __init__(self, gen: GenConfig, heal: HealConfig, active: bool, history: UncertaintyHistory,
                 stream_cap: int, eos: Iterable[int], text: TokenText,
                 force_erase: Optional[Callable[[Row, int], bool]] = None):
        """active: heal (False still segments and scores, but never erases). history: the run's,
        read-only here. force_erase: testing, (row, position) -> erase? replaces U > tau; budgets apply."""
        self.gen, self.heal, self.active, self.history = gen, heal, active, history
        self.stream_cap, self.eos, self.text, self.force_erase = stream_cap, set(eos), text, force_erase
        self.spec = SegmentSpec(mode=heal.segment_mode, length=heal.segment_tokens, delimiter=heal.delimiter,
                                min_len=heal.min_segment_tokens, max_len=heal.max_segment_tokens)
        self.weights = UncertaintyWeights(heal.w_mean, heal.w_peak, heal.w_delta, heal.smooth_window)
        self.params = ThresholdParams(heal.threshold_k, heal.penalty_scale, heal.penalty_base,
                                      heal.history_weight, heal.min_peers, heal.spread_prior)
        self.needs_text = heal.segment_mode == "delimiter" or bool(gen.stop)
        self._stop_tail = max((len(s) for s in gen.stop), default=0)
        self._peers: dict = defaultdict(dict)  # (group, position) -> {sample: U of its judged first attempt}
        self._cut = history.cut_for(self.params.k)

    def rows(self, prompts: Sequence[Sequence[int]], group_ids: Sequence[int],
             prompt_uids: Optional[Sequence[str]] = None) -> list:
        """G = gen.group_size rows per prompt, grouped by prompt (sample index 0..G-1)."""
        uids = prompt_uids or [""] * len(prompts)
        if not (len(prompts) == len(group_ids) == len(uids)):
            raise ValueError(f"generate: {len(prompts)} prompts, {len(group_ids)} group_ids, {len(uids)} prompt_uids"
                             " — pass one of each per prompt")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate: an empty prompt — every prompt needs at least one token (e.g. BOS)")
        return [Row(group=gid, sample=j, prompt=[int(x) for x in p], prompt_uid=uid, stream=Stream(),
                    open=OpenSegment(StreamSegmenter(self.spec)))
                for p, gid, uid in zip(prompts, group_ids, uids) for j in range(self.gen.group_size)]

    # ------------------------------------------------------------ per token
    def push(self, rows: Sequence[Row], toks: Sequence[int], logps: Sequence[float],
             surprisals: Sequence[float], positions: Sequence[int]) -> list:
        """Append one sampled token to each row; judge the segments that close, together; -> [Decision].

        A row that ends (row.finish set) has its open segment closed and judged too; if that
        segment is erased, the row is not finished after all and samples again from `rewind`.
        """
        decisions = [Decision() for _ in rows]
        closes = []
        for k, r in enumerate(rows):
            if self._append(r, decisions[k], toks[k], logps[k], surprisals[k], positions[k]) is not None:
                end = len(r.stream) - r.open.segmenter.open_len
                closes.append(_Close(k, r, r.open.start, end, self._capped(r)))
        self._settle(closes, decisions)
        finals = [_Close(k, r, r.open.start, len(r.stream), self._capped(r)) for k, r in enumerate(rows)
                  if r.finish and r.open.segmenter.open_len > 0]
        self._settle(finals, decisions, final=True)
        return decisions

    def _append(self, r: Row, d: Decision, tok: int, logp: float, surprisal: float, position: int) -> Optional[int]:
        """Record the token, update the segmenter and the finish reason. -> tokens closing a segment, or None."""
        o = r.open
        if o.segmenter.open_len == 0:
            o.start, o.resumable, d.opened = len(r.stream), True, True
        if o.after_newline:
            o.line_start, d.line_start = len(r.stream), True
        text = self.text.piece(tok) if self.needs_text else ""
        r.stream.append(tok, logp, surprisal, position, text if self.gen.stop else None)
        o.after_newline = "\n" in text
        cut = o.segmenter.push(text)
        r.finish = self._finish_reason(r, tok)
        return cut

    def _settle(self, closes: list, decisions: list, final: bool = False) -> None:
        """Judge closes together; erase or keep each (a row's last segment: `final`)."""
        if not closes:
            return
        for c, erase in zip(closes, self._judge(closes)):
            if erase:
                decisions[c.k].rewind = self._erase(c)
            else:
                decisions[c.k].carried = self._keep(c, final)

    def _keep(self, c: _Close, final: bool) -> Optional[int]:
        """Record a kept attempt and move to the next position. -> the start of a carried segment, or None."""
        r, led = c.row, c.row.ledger
        led.attempts.append(Attempt(led.position, c.start, c.end, c.u, c.tau, c.score, led.segment_erases, False))
        led.prev_mean = sum(r.stream.surprisal[c.start : c.end]) / (c.end - c.start)
        led.position, led.segment_erases = led.position + 1, 0
        if final:
            r.open.segmenter.reset()
            return None
        if c.end == len(r.stream):
            return None
        # a step-mode carry opens the next segment; the engine kept the distribution of a line's first token
        r.open.start, r.open.resumable = c.end, r.open.line_start == c.end
        return c.end

    def _erase(self, c: _Close) -> Rewind:
        """Erase [start, stream end) of a row (a carry too): the row resumes at the segment start."""
        r, led = c.row, c.row.ledger
        led.attempts.append(Attempt(led.position, c.start, len(r.stream), c.u, c.tau, c.score, led.segment_erases, True))
        r.stream.erase(c.start)
        led.segment_erases += 1
        led.traj_erases += 1
        r.finish = ""
        r.open.segmenter.reset()
        last = r.stream.last_kept_before(c.start)
        r.open.after_newline = last is not None and self.needs_text and "\n" in self.text.piece(last)
        return Rewind(c.start, r.stream.positions[c.start])

    def _judge(self, closes: list) -> list:
        """Composite U; threshold from the other samples of the group at the same position; budgeted
        decision. A segment that may not be erased (stream cap, start not resumable) is not judged:
        its threshold stays nan.

        Peers are the *first* attempts of the other samples at that position (closed earlier or
        closing now), kept or erased: their U was measured before any decision, so they are an
        uncensored sample of the position. Regenerations are judged against peers but never are one.
        """
        for c in closes:
            s = torch.tensor(c.row.stream.surprisal[c.start : c.end])
            c.u = segment_uncertainty(s, c.row.ledger.prev_mean, self.weights)
        if not self.active:
            return [False] * len(closes)
        judged = [c for c in closes if not c.frozen and c.row.open.resumable]
        now = defaultdict(dict)
        for c in judged:
            if c.row.ledger.segment_erases == 0:
                now[(c.row.group, c.row.ledger.position)][c.row.sample] = c.u
        for c in judged:
            key = (c.row.group, c.row.ledger.position)
            peers = {**self._peers[key], **now[key]}
            peers.pop(c.row.sample, None)
            ref = segment_reference(list(peers.values()), self.history, self.params)
            c.tau = threshold_from(ref, c.row.ledger.segment_erases, self._cut, self.params)
            c.score = gap_score(c.u, ref)
        for key, first in now.items():
            self._peers[key].update(first)
        u, tau = torch.tensor([c.u for c in closes]), torch.tensor([c.tau for c in closes])
        if self.force_erase is not None:
            u = torch.tensor([float(bool(self.force_erase(c.row, c.row.ledger.position))) for c in closes])
            tau = torch.full_like(u, 0.5)
        erase = should_erase(u, tau,
                             torch.tensor([c.row.ledger.segment_erases for c in closes]),
                             torch.tensor([c.row.ledger.traj_erases for c in closes]),
                             self.heal.max_erases_per_segment, self.heal.max_erases_per_traj).tolist()
        return [e and not c.frozen and c.row.open.resumable for e, c in zip(erase, closes)]

    def _capped(self, r: Row) -> bool:
        return len(r.stream) >= self.stream_cap

    def _finish_reason(self, r: Row, tok: int) -> str:
        if tok in self.eos:
            return "eos"
        if self.gen.stop:
            tail = "".join(r.stream.texts[-self._stop_tail:])
            if any(s in tail for s in self.gen.stop):
                return "stop"
        if r.stream.kept >= self.gen.max_new_tokens:
            return "length"
        if self._capped(r):
            return "stream_cap"
        return ""

    # ------------------------------------------------------------ the record
    def trajectory(self, r: Row, policy_version: int) -> Trajectory:
        a, s = r.ledger.attempts, r.stream
        segs = SegmentTable(
            position=torch.tensor([x.position for x in a], dtype=torch.long),
            start=torch.tensor([x.start for x in a], dtype=torch.long),
            end=torch.tensor([x.end for x in a], dtype=torch.long),
            uncertainty=torch.tensor([x.uncertainty for x in a], dtype=torch.float32),
            threshold=torch.tensor([x.threshold for x in a], dtype=torch.float32),
            score=torch.tensor([x.score for x in a], dtype=torch.float32),
            erase_count=torch.tensor([x.erase_count for x in a], dtype=torch.long),
            erased=torch.tensor([x.erased for x in a], dtype=torch.bool))
        return Trajectory(
            prompt_ids=torch.tensor(r.prompt, dtype=torch.long), stream_ids=torch.tensor(s.ids, dtype=torch.long),
            behavior_logp=torch.tensor(s.logp, dtype=torch.float32),
            surprisal=torch.tensor(s.surprisal, dtype=torch.float32),
            erased_at=torch.tensor(s.erased_at, dtype=torch.long),
            position_ids=torch.tensor(s.positions, dtype=torch.long), segments=segs, group_id=r.group,
            sample_index=r.sample, policy_version=policy_version, prompt_uid=r.prompt_uid,
            response_text=self.text.response(s.kept_ids()), finish_reason=r.finish,
            forward_tokens=r.forward_tokens, rewinds=r.ledger.traj_erases, compactions=r.compactions)

"""Named records of one sample while it decodes, shared by the healing policy and every engine.

A `Row` is who the sample is (group, sample index, prompt) plus three records, each with one
owner: the `Stream` of generated tokens (kept and erased, in generation order — it becomes the
trajectory's token columns), the `OpenSegment` being decoded (what the segmenter and a rewind
need), and the `Ledger` of healing decisions (segment attempts, erase counts). The policy writes
all three; an engine writes only its counters (`forward_tokens`, `compactions`) and reads the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from e3rl.core.segments import StreamSegmenter
from e3rl.core.trajectory import NEVER


@dataclass
class Attempt:
    """One segment attempt: a row of the trajectory's `SegmentTable`."""

    position: int  # logical segment index n (an erased attempt and its replacement share it)
    start: int  # first stream index (inclusive)
    end: int  # last stream index (exclusive)
    uncertainty: float  # composite U
    threshold: float  # tau it was compared with (inf: judged without a reference; nan: not judged)
    score: float  # gap score of U against its reference (nan: not judged)
    erase_count: int  # erasures of position n before this attempt
    erased: bool


@dataclass
class Stream:
    """A row's generated tokens in generation order, kept and erased (the trajectory's token columns)."""

    ids: list = field(default_factory=list)
    logp: list = field(default_factory=list)  # behaviour log-probs (sampling distribution)
    surprisal: list = field(default_factory=list)
    positions: list = field(default_factory=list)  # logical position of each token
    erased_at: list = field(default_factory=list)  # NEVER, or the stream index of the rewind that erased it
    texts: list = field(default_factory=list)  # kept tokens' texts (tracked only for stop strings)
    kept: int = 0  # tokens not erased

    def __len__(self) -> int:
        return len(self.ids)

    def append(self, tok: int, logp: float, surprisal: float, position: int, text: Optional[str]) -> None:
        self.ids.append(tok)
        self.logp.append(logp)
        self.surprisal.append(surprisal)
        self.positions.append(position)
        self.erased_at.append(NEVER)
        self.kept += 1
        if text is not None:
            self.texts.append(text)

    def erase(self, start: int) -> None:
        """Erase [start, end): the tail a rewind to `start` discards (it was all kept)."""
        end = len(self.ids)
        for j in range(start, end):
            self.erased_at[j] = end
        self.kept -= end - start
        del self.texts[len(self.texts) - (end - start):]

    def kept_ids(self) -> list:
        return [t for t, e in zip(self.ids, self.erased_at) if e == NEVER]

    def last_kept_before(self, j: int) -> Optional[int]:
        """The last kept token id before stream index j (None: the prompt comes first)."""
        for t, e in zip(reversed(self.ids[:j]), reversed(self.erased_at[:j])):
            if e == NEVER:
                return t
        return None


@dataclass
class OpenSegment:
    """The segment a row is decoding: where it starts and whether an engine can resume there."""

    segmenter: StreamSegmenter
    start: int = 0  # stream index of its first token
    resumable: bool = True  # an engine can restart at its start (else it is never erased)
    after_newline: bool = False  # the last kept token's text holds a newline
    line_start: int = -1  # stream index of the last token sampled after a newline (a `Step k` carry may open there)


@dataclass
class Ledger:
    """A row's healing bookkeeping: which position it is at and what it has spent."""

    position: int = 0  # logical index n of the open segment
    segment_erases: int = 0  # erasures of position n so far
    traj_erases: int = 0
    prev_mean: Optional[float] = None  # mean surprisal of the previous kept segment
    attempts: list = field(default_factory=list)  # [Attempt], in stream order


@dataclass
class Row:
    """One sample while it decodes."""

    group: int
    sample: int
    prompt: list
    prompt_uid: str
    stream: Stream
    open: OpenSegment
    ledger: Ledger = field(default_factory=Ledger)
    finish: str = ""  # "" while decoding, then eos | stop | length | stream_cap
    forward_tokens: int = 0  # engine: tokens fed through the model for this row (prompt + stream)
    compactions: int = 0  # engine: cache compactions that moved this row

    def kept_ids(self) -> list:
        return self.stream.kept_ids()

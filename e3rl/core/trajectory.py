"""The segment-annotated trajectory record, its Arrow schema, and the stream attention mask.

A trajectory keeps every generated token in *stream order* (generation order), kept and erased.
`erased_at[j]` is the stream index of the first token generated after token j was erased (the
rewind happened between stream tokens erased_at[j]-1 and erased_at[j]); -1 = never erased.

Visibility: stream token i saw token j iff j <= i and j was not erased before i, i.e.
    j <= i  and  (erased_at[j] == -1 or erased_at[j] > i).
Every stream token also sees the whole prompt. One forward pass over prompt + stream with that
mask and the logical `position_ids` reproduces what each token saw when it was generated.

The logits that *predicted* stream token k sit at its predecessor: the last token visible at
time k (the prompt's last token if none). After a rewind several stream tokens share one
predecessor: the original first token of the erased segment and its replacement.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, fields

import pyarrow as pa
import torch

NEVER = -1


@dataclass
class SegmentTable:
    """One row per segment *attempt*; attempts tile the stream in order."""

    position: torch.Tensor  # [R] long: logical segment index n (erased attempts repeat n)
    start: torch.Tensor  # [R] long: first stream index (inclusive)
    end: torch.Tensor  # [R] long: last stream index (exclusive)
    uncertainty: torch.Tensor  # [R] float: composite U (nan if never judged)
    threshold: torch.Tensor  # [R] float: tau it was compared with (inf: no reference; nan: not judged)
    score: torch.Tensor  # [R] float: gap score of U against its reference (nan if not judged)
    erase_count: torch.Tensor  # [R] long: erasures of position n before this attempt
    erased: torch.Tensor  # [R] bool

    def __len__(self) -> int:
        return int(self.position.numel())

    @staticmethod
    def empty() -> "SegmentTable":
        z = torch.zeros(0, dtype=torch.long)
        return SegmentTable(z, z, z, torch.zeros(0), torch.zeros(0), torch.zeros(0), z, torch.zeros(0, dtype=torch.bool))


@dataclass
class Trajectory:
    prompt_ids: torch.Tensor  # [P] long
    stream_ids: torch.Tensor  # [S] long: generated tokens in generation order
    behavior_logp: torch.Tensor  # [S] float: log q(token) under the sampling distribution
    surprisal: torch.Tensor  # [S] float: -log p(token) under the surprisal distribution
    erased_at: torch.Tensor  # [S] long: stream index of the erasing rewind, -1 = kept
    position_ids: torch.Tensor  # [S] long: logical positions (prompt length + visible before)
    segments: SegmentTable
    group_id: int = 0
    sample_index: int = 0
    policy_version: int = 0
    prompt_uid: str = ""
    response_text: str = ""
    finish_reason: str = ""  # eos | stop | length | stream_cap
    reward: float = 0.0  # training reward: correctness plus any configured shaping
    correct: bool = False  # full credit from the task's verifier (what evaluation counts)
    forward_tokens: int = 0  # tokens fed through the model for this row (prompt + stream)
    rewinds: int = 0
    compactions: int = 0

    @property
    def kept_mask(self) -> torch.Tensor:  # [S] bool
        return self.erased_at < 0

    @property
    def kept_ids(self) -> torch.Tensor:  # [K_tokens]
        return self.stream_ids[self.kept_mask]

    def token_segment(self) -> torch.Tensor:
        """[S] index of the segment attempt each stream token belongs to."""
        idx = torch.full_like(self.stream_ids, -1)
        for r in range(len(self.segments)):
            idx[int(self.segments.start[r]) : int(self.segments.end[r])] = r
        return idx


# ------------------------------------------------------------------ stream mask math
def stream_visibility(erased_at: torch.Tensor) -> torch.Tensor:
    """[S] -> bool [S, S]: vis[i, j] = token i saw token j."""
    s = erased_at.numel()
    i = torch.arange(s).unsqueeze(1)
    j = torch.arange(s).unsqueeze(0)
    ea = erased_at.unsqueeze(0)
    return (j <= i) & ((ea < 0) | (ea > i))


def stream_attention_mask(prompt_len: int, erased_at: torch.Tensor) -> torch.Tensor:
    """bool [P+S, P+S]: causal over the prompt, prompt visible to all, stream block by visibility."""
    s = erased_at.numel()
    n = prompt_len + s
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:prompt_len, :prompt_len] = torch.ones(prompt_len, prompt_len, dtype=torch.bool).tril()
    mask[prompt_len:, :prompt_len] = True
    mask[prompt_len:, prompt_len:] = stream_visibility(erased_at)
    return mask


def stream_position_ids(prompt_len: int, erased_at: torch.Tensor) -> torch.Tensor:
    """[S] logical position of each stream token: P + number of tokens it saw before itself."""
    vis = stream_visibility(erased_at)
    return prompt_len + vis.long().sum(1) - 1


def predecessor_index(prompt_len: int, erased_at: torch.Tensor) -> torch.Tensor:
    """[S] index in prompt+stream coordinates of the token whose logits predicted stream token k."""
    vis = stream_visibility(erased_at)  # token k's context excludes k itself:
    s = erased_at.numel()
    seen_before = vis & ~torch.eye(s, dtype=torch.bool)
    j = torch.arange(s).expand(s, s)
    last = torch.where(seen_before, j, torch.full_like(j, -1)).max(1).values
    return torch.where(last >= 0, last + prompt_len, torch.full_like(last, prompt_len - 1))


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """bool [.., L, L] -> additive float mask (0 where visible, dtype-min elsewhere)."""
    out = torch.zeros(mask.shape, dtype=dtype)
    return out.masked_fill(~mask, torch.finfo(dtype).min)


# ------------------------------------------------------------------ Arrow
_SEGMENT_STRUCT = pa.struct(
    [
        ("position", pa.int32()),
        ("start", pa.int32()),
        ("end", pa.int32()),
        ("uncertainty", pa.float32()),
        ("threshold", pa.float32()),
        ("score", pa.float32()),
        ("erase_count", pa.int32()),
        ("erased", pa.bool_()),
    ]
)

TRAJECTORY_SCHEMA = pa.schema(
    [
        ("prompt_ids", pa.list_(pa.int32())),
        ("stream_ids", pa.list_(pa.int32())),
        ("behavior_logp", pa.list_(pa.float32())),
        ("surprisal", pa.list_(pa.float32())),
        ("erased_at", pa.list_(pa.int32())),
        ("position_ids", pa.list_(pa.int32())),
        ("segments", pa.list_(_SEGMENT_STRUCT)),
        ("group_id", pa.int64()),
        ("sample_index", pa.int32()),
        ("policy_version", pa.int64()),
        ("prompt_uid", pa.string()),
        ("response_text", pa.string()),
        ("finish_reason", pa.string()),
        ("reward", pa.float64()),
        ("correct", pa.bool_()),
        ("forward_tokens", pa.int64()),
        ("rewinds", pa.int32()),
        ("compactions", pa.int32()),
    ]
)

_TENSOR_COLS = {
    "prompt_ids": torch.long,
    "stream_ids": torch.long,
    "behavior_logp": torch.float32,
    "surprisal": torch.float32,
    "erased_at": torch.long,
    "position_ids": torch.long,
}
_SEG_DTYPES = {f.name: (torch.bool if f.name == "erased" else torch.long if f.name in ("position", "start", "end", "erase_count") else torch.float32) for f in fields(SegmentTable)}


def to_record_batch(trajs: list[Trajectory]) -> pa.RecordBatch:
    cols: dict[str, list] = {name: [] for name in TRAJECTORY_SCHEMA.names}
    for t in trajs:
        for f in fields(Trajectory):
            v = getattr(t, f.name)
            if f.name == "segments":
                cols["segments"].append([
                    {k.name: getattr(v, k.name)[r].item() for k in fields(SegmentTable)} for r in range(len(v))
                ])
            elif isinstance(v, torch.Tensor):
                cols[f.name].append(v.tolist())
            else:
                cols[f.name].append(v)
    return pa.RecordBatch.from_pydict(cols, schema=TRAJECTORY_SCHEMA)


def from_record_batch(batch: pa.RecordBatch) -> list[Trajectory]:
    rows = batch.to_pylist()
    out = []
    for row in rows:
        segs = row.pop("segments")
        table = SegmentTable(**{
            name: torch.tensor([s.get(name, math.nan) for s in segs], dtype=dt) for name, dt in _SEG_DTYPES.items()
        })
        kwargs = {k: (torch.tensor(v, dtype=_TENSOR_COLS[k]) if k in _TENSOR_COLS else v) for k, v in row.items()}
        out.append(Trajectory(segments=table, **kwargs))
    return out


def to_ipc_bytes(trajs: list[Trajectory]) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, TRAJECTORY_SCHEMA) as w:
        w.write_batch(to_record_batch(trajs))
    return sink.getvalue()


def from_ipc_bytes(data: bytes) -> list[Trajectory]:
    reader = pa.ipc.open_stream(io.BytesIO(data))
    out: list[Trajectory] = []
    for b in reader:
        out.extend(from_record_batch(b))
    return out

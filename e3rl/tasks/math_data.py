"""Math datasets (DeepMath-103K, AIME 2024/2025, MATH500) as `Problem`s, through HF `datasets`.

A local file or directory (.parquet/.json/.jsonl) goes through `load_dataset("parquet"|"json")`;
anything else is taken as a hub name (`load_dataset(name, split=...)`). The schema is detected from
the columns or named explicitly, so a renamed column fails loudly instead of yielding empty prompts.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e3rl.tasks.base import LoadStats, Problem, answer_text

_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}


@dataclass(frozen=True)
class Schema:
    """Where a format keeps its fields. `question` lists accepted alternatives, first match wins."""

    name: str
    question: tuple[str, ...]
    answer: str
    id: str | None = None
    difficulty: str | None = None
    meta: tuple[str, ...] = ()


FORMATS: dict[str, Schema] = {
    # zwhe99/DeepMath-103K; r1_solution_1..3 are large and deliberately not loaded.
    "deepmath": Schema("deepmath", ("question",), "final_answer", None, "difficulty",
                       ("difficulty", "topic")),
    # HuggingFaceH4/aime_2024 uses problem/answer/id; AIME 2025 sets use question/answer.
    "aime": Schema("aime", ("problem", "question"), "answer", "id"),
    # HuggingFaceH4/MATH-500
    "math500": Schema("math500", ("problem",), "answer", "unique_id", "level", ("subject", "level")),
}


def detect_format(columns: list[str], where: str = "dataset") -> str:
    """The format name implied by a column set; ValueError when none fits."""
    cols = set(columns)
    if "final_answer" in cols:
        return "deepmath"
    if "problem" in cols and "answer" in cols and ("unique_id" in cols or "subject" in cols):
        return "math500"
    if "answer" in cols and cols & {"problem", "question"}:
        return "aime"
    raise ValueError(f"{where}: cannot detect the format from columns {sorted(cols)}; expected "
                     "deepmath (question, final_answer), aime (problem|question, answer) or "
                     "math500 (problem, answer, unique_id)")


def _missing(schema: Schema, columns: list[str]) -> list[str]:
    cols = set(columns)
    missing = [] if cols & set(schema.question) else ["|".join(schema.question)]
    return missing + ([schema.answer] if schema.answer not in cols else [])


def _is_local(path_or_name: str) -> bool:
    """A hub name is `owner/name`; paths exist, start like paths, or end in a data extension."""
    p = path_or_name
    return (os.path.exists(p) or p.startswith(("/", "./", "../", "~"))
            or Path(p).suffix.lower() in _BUILDERS)


def _holds_no_rows(f: Path) -> bool:
    """A parquet file of zero rows or a json/jsonl file of only whitespace (`datasets` cannot load
    either: StopIteration / DatasetGenerationError). Unreadable files are left to `datasets`."""
    try:
        if f.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(f).num_rows == 0
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 16):
                if chunk.strip():
                    return False
        return True
    except (OSError, ValueError):
        return False


def _open(path_or_name: str, split: str, cache_dir: str | None) -> tuple[Any, str, str]:
    """(dataset, where-for-errors, default source name); dataset None when local files hold no rows."""
    from datasets import load_dataset

    if not _is_local(path_or_name):
        ds = load_dataset(path_or_name, split=split, cache_dir=cache_dir)
        return ds, path_or_name, path_or_name.rstrip("/").split("/")[-1].lower()
    path = Path(path_or_name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset file not found: {path}")
    files = ([f for f in sorted(path.iterdir()) if f.suffix.lower() in _BUILDERS]
             if path.is_dir() else [path])
    builders = {_BUILDERS.get(f.suffix.lower()) for f in files}
    if not files or None in builders or len(builders) != 1:
        raise ValueError(f"{path}: expected .parquet, .json or .jsonl files of one kind")
    files = [f for f in files if not _holds_no_rows(f)]
    if not files:
        return None, str(path), path.stem
    # Local files always land in the "train" split of the json/parquet builders.
    ds = load_dataset(builders.pop(), data_files=[str(f) for f in files], split="train",
                      cache_dir=cache_dir)
    return ds, str(path), path.stem


def _prompt_lengths(prompts: list[str], tokenizer: Any) -> list[int]:
    """Token counts of the raw questions (chars without a tokenizer); the template adds a constant."""
    if tokenizer is None:
        return [len(p) for p in prompts]
    if not prompts:
        return []
    return [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def load_math(path_or_name: str, *, format: str | None = None, split: str = "train",
              source: str | None = None, difficulty: tuple[float, float] | None = None,
              max_prompt_len: int | None = None, tokenizer: Any = None, n: int | None = None,
              seed: int = 0, cache_dir: str | None = None) -> tuple[list[Problem], LoadStats]:
    """Load a math set as Problems, in file order.

    Rows without a usable gold answer are skipped and counted. Then, in order: `difficulty`
    keeps rows with lo <= difficulty <= hi (the `difficulty` column, or MATH500's `level`);
    `max_prompt_len` keeps questions of at most that many tokens (chars if no tokenizer);
    `n` keeps a seeded random subset of that size (file order preserved). `split` applies to hub
    datasets only (local files load as one split). Local files without rows give no problems.
    """
    ds, where, default_source = _open(path_or_name, split, cache_dir)
    if ds is None:
        return [], LoadStats(total=0, kept=0, skipped_no_answer=0, skipped_filtered=0)
    fmt = format or detect_format(ds.column_names, where)
    if fmt not in FORMATS:
        raise ValueError(f"{where}: unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    schema = FORMATS[fmt]
    missing = _missing(schema, ds.column_names)
    if missing:
        raise ValueError(f"{where}: missing columns for format '{fmt}': {', '.join(missing)} "
                         f"(found {sorted(ds.column_names)})")
    if difficulty is not None and schema.difficulty not in ds.column_names:
        raise ValueError(f"{where}: a difficulty filter needs a difficulty column; format "
                         f"'{fmt}' has {schema.difficulty or 'none'}")
    question = next(c for c in schema.question if c in ds.column_names)
    wanted = {question, schema.answer, schema.id, schema.difficulty, *schema.meta} - {None}
    rows = ds.select_columns([c for c in ds.column_names if c in wanted]).to_list()
    src = source or default_source

    candidates: list[Problem] = []
    no_answer = 0
    for i, row in enumerate(rows):
        gold, text = answer_text(row.get(schema.answer)), answer_text(row.get(question))
        if gold is None or text is None:
            no_answer += 1
            continue
        rid = row.get(schema.id) if schema.id else None
        meta = {k: row[k] for k in schema.meta if row.get(k) is not None}
        candidates.append(Problem(uid=f"{src}/{rid if rid is not None else i}", prompt=text,
                                  answer=gold, source=src, meta={"format": fmt, **meta}))

    kept = _filter(candidates, schema, difficulty, max_prompt_len, tokenizer)
    if n is not None and n < len(kept):
        idx = sorted(random.Random(seed).sample(range(len(kept)), n))
        kept = [kept[i] for i in idx]
    stats = LoadStats(total=len(rows), kept=len(kept), skipped_no_answer=no_answer,
                      skipped_filtered=len(rows) - no_answer - len(kept))
    return kept, stats


def _filter(problems: list[Problem], schema: Schema, difficulty: tuple[float, float] | None,
            max_prompt_len: int | None, tokenizer: Any) -> list[Problem]:
    """Apply the difficulty range and the prompt-length cap."""
    out = problems
    if difficulty is not None:
        lo, hi = difficulty
        out = [p for p in out if _in_range(p.meta.get(schema.difficulty or ""), lo, hi)]
    if max_prompt_len is not None:
        lengths = _prompt_lengths([p.prompt for p in out], tokenizer)
        out = [p for p, n in zip(out, lengths) if n <= max_prompt_len]
    return out


def _in_range(value: Any, lo: float, hi: float) -> bool:
    try:
        return lo <= float(value) <= hi
    except (TypeError, ValueError):
        return False

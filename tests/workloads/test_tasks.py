"""Task loaders (math sets, reasoning-gym) and prompt building, on small offline fixtures."""
from __future__ import annotations

import json
from pathlib import Path
import shutil

import pytest

from e3rl.tasks import (DEFAULT_INSTRUCTION, LoadStats, Problem, build_prompt, detect_format,
                        last_boxed, load_gym, load_math, score_gym)
from e3rl.tasks import gym as gym_mod
from e3rl.tasks.math_data import _is_local


def _check_invariant(stats: LoadStats) -> None:
    assert stats.kept + stats.skipped_no_answer + stats.skipped_filtered == stats.total


def test_deepmath_parquet_skips_and_counts_missing_answers(fixtures_dir):
    problems, stats = load_math(str(fixtures_dir / "deepmath_sample.parquet"))
    assert stats == LoadStats(total=10, kept=7, skipped_no_answer=3, skipped_filtered=0)
    assert [p.uid for p in problems] == [f"deepmath_sample/{i}" for i in (0, 1, 2, 3, 4, 5, 9)]
    first = problems[0]
    assert first.answer == "3" and first.source == "deepmath_sample"
    assert first.prompt.startswith("Evaluate the limit")
    assert first.meta == {"format": "deepmath", "difficulty": 3.0,
                          "topic": "Mathematics -> Calculus -> Differential Calculus -> Limits"}
    assert problems[3].answer == "\\dfrac{1}{4}"
    assert "r1_solution_1" not in first.meta


@pytest.mark.parametrize("name, fmt, stats, uid0, answers", [
    ("aime2024_sample.jsonl", "aime", (3, 2, 1, 0), "aime2024_sample/60", ["204", "025"]),
    ("aime2025_sample.jsonl", "aime", (4, 3, 1, 0), "aime2025_sample/0", ["70", "16", "504"]),
    ("math500_sample.jsonl", "math500", (5, 4, 1, 0), "math500_sample/test/precalculus/807.json",
     ["\\left( 3, \\frac{\\pi}{2} \\right)", "26000", "\\frac{14}{3}", "-125"]),
])
def test_eval_sets_detect_schema(fixtures_dir, name, fmt, stats, uid0, answers):
    problems, st = load_math(str(fixtures_dir / name))
    assert (st.total, st.kept, st.skipped_no_answer, st.skipped_filtered) == stats
    assert problems[0].uid == uid0
    assert [p.answer for p in problems] == answers
    assert all(p.meta["format"] == fmt and p.prompt for p in problems)
    explicit, st2 = load_math(str(fixtures_dir / name), format=fmt, source="bench")
    assert st2 == st and [p.answer for p in explicit] == answers
    assert explicit[0].source == "bench" and explicit[0].uid.startswith("bench/")


def test_math500_meta_and_detect_format():
    assert detect_format(["problem", "answer", "solution", "subject", "level", "unique_id"]) == "math500"
    assert detect_format(["id", "problem", "answer"]) == "aime"
    assert detect_format(["question", "answer"]) == "aime"
    assert detect_format(["question", "final_answer", "difficulty"]) == "deepmath"


def test_bad_file_errors_name_file_and_columns(fixtures_dir):
    bad = fixtures_dir / "bad_missing_answer.jsonl"
    with pytest.raises(ValueError) as auto:
        load_math(str(bad))
    assert str(bad) in str(auto.value) and "cannot detect" in str(auto.value)
    with pytest.raises(ValueError) as explicit:
        load_math(str(bad), format="deepmath")
    msg = str(explicit.value)
    assert "\n" not in msg and str(bad) in msg
    assert "missing columns for format 'deepmath': final_answer" in msg
    with pytest.raises(ValueError, match="missing columns for format 'aime': answer \\(found"):
        load_math(str(bad), format="aime")
    with pytest.raises(ValueError, match="missing columns for format 'math500': problem \\("):
        load_math(str(fixtures_dir / "aime2025_sample.jsonl"), format="math500")
    with pytest.raises(ValueError, match="unknown format 'gsm8k'"):
        load_math(str(fixtures_dir / "aime2024_sample.jsonl"), format="gsm8k")


def test_missing_path_raises_file_not_found(tmp_path):
    missing = tmp_path / "nope" / "deepmath.parquet"
    with pytest.raises(FileNotFoundError) as e:
        load_math(str(missing))
    assert str(e.value) == f"dataset file not found: {missing}"


def test_difficulty_and_char_length_filters(fixtures_dir):
    path = str(fixtures_dir / "deepmath_sample.parquet")
    mid, st = load_math(path, difficulty=(3.0, 6.5))
    assert [p.meta["difficulty"] for p in mid] == [3.0, 4.5, 5.0, 6.5]
    assert st == LoadStats(total=10, kept=4, skipped_no_answer=3, skipped_filtered=3)
    short, st = load_math(path, max_prompt_len=60)
    assert all(len(p.prompt) <= 60 for p in short) and len(short) == 4
    _check_invariant(st)
    with pytest.raises(ValueError, match="difficulty column"):
        load_math(str(fixtures_dir / "aime2024_sample.jsonl"), difficulty=(1, 5))
    levels, _ = load_math(str(fixtures_dir / "math500_sample.jsonl"), difficulty=(2, 3))
    assert [p.meta["level"] for p in levels] == [2, 3]


def test_token_length_filter_uses_tokenizer(fixtures_dir, plain_tokenizer):
    path = str(fixtures_dir / "deepmath_sample.parquet")
    everything, _ = load_math(path)
    lengths = {p.uid: len(plain_tokenizer(p.prompt, add_special_tokens=False)["input_ids"])
               for p in everything}
    cap = sorted(lengths.values())[3]
    kept, st = load_math(path, max_prompt_len=cap, tokenizer=plain_tokenizer)
    assert [p.uid for p in kept] == [u for u, n in lengths.items() if n <= cap]
    assert st.skipped_filtered == 7 - len(kept) and 0 < len(kept) < 7
    chars, _ = load_math(path, max_prompt_len=cap)
    assert len(chars) < len(kept)  # the cap in chars is much stricter than in tokens


def test_seeded_subset_is_deterministic_and_ordered(fixtures_dir):
    path = str(fixtures_dir / "deepmath_sample.parquet")
    a, st = load_math(path, n=3, seed=1)
    b, _ = load_math(path, n=3, seed=1)
    assert [p.uid for p in a] == [p.uid for p in b]
    assert st == LoadStats(total=10, kept=3, skipped_no_answer=3, skipped_filtered=4)
    idx = [int(p.uid.split("/")[1]) for p in a]
    assert idx == sorted(idx)
    others = {tuple(p.uid for p in load_math(path, n=3, seed=s)[0]) for s in range(2, 8)}
    assert len(others) > 1
    whole, st = load_math(path, n=100)
    assert len(whole) == 7 and st.skipped_filtered == 0


def test_directory_of_files_and_hub_names(fixtures_dir, tmp_path, monkeypatch):
    shutil.copy(fixtures_dir / "aime2024_sample.jsonl", tmp_path / "part-0.jsonl")
    shutil.copy(fixtures_dir / "aime2024_sample.jsonl", tmp_path / "part-1.jsonl")
    (tmp_path / "README.md").write_text("shards of one set")
    problems, st = load_math(str(tmp_path))
    assert st == LoadStats(total=6, kept=4, skipped_no_answer=2, skipped_filtered=0)
    assert problems[0].source == tmp_path.name

    assert not _is_local("zwhe99/DeepMath-103K") and _is_local("data/x.parquet")
    import datasets

    calls = []

    def fake_load_dataset(name, split=None, cache_dir=None):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"question": ["1+1?"], "final_answer": ["2"],
                                           "difficulty": [1.0], "topic": ["t"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub, st = load_math("zwhe99/DeepMath-103K")
    assert calls == [("zwhe99/DeepMath-103K", "train")]
    assert hub[0].uid == "deepmath-103k/0" and hub[0].answer == "2"


def test_build_prompt_with_chat_template(chat_tokenizer):
    p = Problem(uid="u", prompt="What is 2+3?", answer="5", source="t")
    text = build_prompt(p, chat_tokenizer, DEFAULT_INSTRUCTION)
    user = "What is 2+3?\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert text.endswith(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    with_system = build_prompt(p, chat_tokenizer, DEFAULT_INSTRUCTION, system="Be brief.")
    assert with_system == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                           f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


def test_build_prompt_fallback_without_template(plain_tokenizer):
    p = Problem(uid="u", prompt="What is 2+3?", answer="5", source="t")
    assert build_prompt(p, plain_tokenizer, "Box it.") == "Question: What is 2+3?\nBox it.\nAnswer:"
    assert build_prompt(p, plain_tokenizer, "", system="S") == "S\n\nQuestion: What is 2+3?\nAnswer:"


def test_last_boxed_nesting_escapes_and_truncation():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{3}{4}}") == "\\frac{3}{4}"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert last_boxed("\\boxed{7} then \\boxed{\\frac{1}{") == "7"  # cut-off box ignored
    assert last_boxed("\\fbox{ 9 }") == "9"
    assert last_boxed("no box") is None


def test_gym_problems_score_with_the_task_scorer():
    problems, st = load_gym("basic_arithmetic", size=6, seed=3)
    assert st == LoadStats(total=6, kept=6, skipped_no_answer=0, skipped_filtered=0)
    p = problems[0]
    assert p.uid == "rg/basic_arithmetic/3/0" and p.meta["rg_task"] == "basic_arithmetic"
    json.dumps(p.meta)  # JSON-safe: travels in records and Arrow tables
    assert score_gym(p, f"so the result is \\boxed{{{p.answer}}}") == 1.0
    assert score_gym(p, f"<answer>{p.answer}</answer>") == 1.0
    assert score_gym(p, "\\boxed{123456789}") == 0.0
    assert score_gym(p, "no final answer") == 0.0


def test_gym_scoring_recreates_the_dataset_after_a_json_round_trip():
    problems, _ = load_gym("chain_sum", size=4, seed=7, min_terms=2, max_terms=3)
    p = problems[2]
    assert isinstance(p.meta["rg_entry"]["metadata"]["difficulty"]["num_terms"], list)
    again = Problem(**json.loads(json.dumps(p.__dict__)))  # as a worker process would get it
    gym_mod._dataset.cache_clear()
    assert score_gym(again, f"\\boxed{{{p.answer}}}") == 1.0
    assert score_gym(again, f"\\boxed{{{int(p.answer) + 1}}}") == 0.0


@pytest.mark.parametrize("config", sorted(p.name for p in (Path(__file__).parents[2] / "configs").glob("qwen3-*.yaml")))
def test_the_qwen3_configs_load_their_data_with_each_sources_own_schema(config, fixtures_dir, tokenizer):
    """A Qwen3 config's data section, as written, over the repository's fixtures of the same schemas
    (DeepMath parquet; AIME 2024 problem/answer, AIME 2025 question/answer). It once stopped at
    start-up: `data.format: deepmath` was applied to the AIME files too ("missing columns")."""
    from e3rl.config import load_config
    from e3rl.data import load_workload

    cfg = load_config(Path(__file__).parents[2] / "configs" / config, [
        f"data.train={fixtures_dir / 'deepmath_sample.parquet'}", "data.train_size=0",
        f"data.eval=[{fixtures_dir / 'aime2024_sample.jsonl'},{fixtures_dir / 'aime2025_sample.jsonl'}]"])
    assert cfg.data.format == "deepmath"
    work = load_workload(cfg, tokenizer)
    assert work.train and all(p.answer for p in work.train)
    assert [len(v) for v in work.evals.values()] == [2, 3]  # every row with an answer, each file by its own columns
    assert all(p.answer and p.prompt for v in work.evals.values() for p in v)

"""The rehearsal plan: `--rehearse --plan` passes on every config in configs/ (a new config is
covered with no new test code), and the one function behind it changes only what size and device
decide: segment counts, erase budgets, mini-batch counts, group sizes and every algorithm setting
stay as written."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from e3rl.config import Config, ConfigError, load_config
from e3rl.rehearsal.plan import (KNOWN_ARCHITECTURES, Machine, data_schema, real_architecture, rehearsal_config,
                                 tiny_architecture)
from e3rl.run import main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
LAPTOP = Machine(cpus=2, gpus=0, bf16=False)
GPU_NODE = Machine(cpus=64, gpus=8, bf16=True)
SIZE_AND_DEVICE = ("model.", "data.train", "data.eval", "data.max_prompt_tokens", "gen.max_new_tokens",
                   "gen.max_stream_tokens", "gen.vllm.block_size", "heal.segment_tokens", "heal.min_segment_tokens",
                   "heal.max_segment_tokens", "reward.overlong_buffer", "reward.rehearsal", "algo.prompts_per_step",
                   "algo.mini_batch_prompts", "learner.num_workers", "learner.dtype", "learner.micro_batch_tokens",
                   "learner.pack_tokens", "resources.", "run.")
"""The only fields a rehearsal may change."""


def _segments(c: Config) -> float:
    unit = c.heal.segment_tokens if c.heal.segment_mode == "fixed" else c.heal.max_segment_tokens
    return c.gen.max_new_tokens / unit


@pytest.mark.parametrize("name", CONFIGS)
def test_plan_passes_for_every_config(name, capsys):
    """The CLI path users run, in-process: table printed, static checks passed, exit 0."""
    assert main([str(REPO / "configs" / name), "--rehearse", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "rehearsal plan: ok" in out and "as written" in out


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("machine", [LAPTOP, GPU_NODE], ids=["laptop", "gpu-node"])
def test_plan_keeps_what_size_does_not_decide(name, machine, tmp_path):
    cfg = load_config(REPO / "configs" / name)
    rehearsed, changes, stand = rehearsal_config(cfg, machine, tmp_path)
    for c in changes:
        assert c.field.startswith(SIZE_AND_DEVICE), f"{c.field} is not decided by size or device"
        assert c.why
    for section in ("algo", "heal", "gen"):  # every algorithm setting that is not a size stays
        written, now = dataclasses.asdict(getattr(cfg, section)), dataclasses.asdict(getattr(rehearsed, section))
        moved = {k for k in written if written[k] != now[k]}
        assert all(f"{section}.{k}".startswith(SIZE_AND_DEVICE) or k == "vllm" for k in moved), moved
    assert _segments(rehearsed) == pytest.approx(_segments(cfg), rel=0.02)
    assert rehearsed.stream_cap - rehearsed.gen.max_new_tokens == pytest.approx(
        (cfg.stream_cap - cfg.gen.max_new_tokens) * rehearsed.gen.max_new_tokens / cfg.gen.max_new_tokens, abs=1)
    assert (rehearsed.mini_batches, rehearsed.algo.epochs) == (cfg.mini_batches, cfg.algo.epochs)
    assert rehearsed.gen.group_size == cfg.gen.group_size
    assert rehearsed.algo.prompts_per_step >= rehearsed.resources.num_generators
    assert rehearsed.run.output_dir == cfg.run.output_dir.rstrip("/") + "-rehearsal"
    assert (rehearsed.run.steps, rehearsed.run.save_every, rehearsed.reward.rehearsal) == (2, 1, True)
    r = rehearsed.resources
    assert r.num_generators * r.cpus_per_generator + rehearsed.learner.num_workers * r.cpus_per_learner <= machine.cpus
    if machine.gpus == 0:
        assert rehearsed.model.device == "cpu" and r.gpus_per_generator == r.gpus_per_learner == 0
        assert (r.num_generators, rehearsed.learner.num_workers) == (min(cfg.resources.num_generators, 2),
                                                                     min(cfg.learner.num_workers, 2))
        assert "float16" not in (rehearsed.model.dtype, rehearsed.learner.dtype)
        assert rehearsed.model.dtype != "bfloat16"  # this laptop has no native bf16
        if rehearsed.gen.backend in ("vllm", "auto"):
            assert (rehearsed.gen.vllm.block_size or 32) % 32 == 0
    if stand.model_dir is not None:
        assert rehearsed.model.path == str(stand.model_dir)
        assert stand.eos_tokens == rehearsed.gen.max_new_tokens


def test_flagship_plan_on_this_laptop(tmp_path):
    """The numbers the issue asks for on the 4B flagship: 16 segments of 2 x 32-token blocks, 5
    erasures' worth of stream, 2 + 2 actors on 2 cores, a tiny Qwen3 with the real GQA ratio and
    head size, AIME stand-ins in their two schemas."""
    cfg = load_config(REPO / "configs" / "qwen3-4b-e3rl.yaml")
    c, _, stand = rehearsal_config(cfg, LAPTOP, tmp_path)
    assert (c.heal.segment_tokens, c.gen.max_new_tokens, c.gen.max_stream_tokens) == (64, 1024, 1344)
    assert c.gen.vllm.block_size == 32 and c.heal.max_erases_per_traj == 5
    assert (c.resources.num_generators, c.learner.num_workers, c.resources.cpus_per_generator) == (2, 2, 0.5)
    assert c.resources.torch_threads == 1
    a = stand.arch
    assert (a["model_type"], a["head_dim"], a["num_attention_heads"] // a["num_key_value_heads"]) == ("qwen3", 128, 4)
    assert a["tie_word_embeddings"] is True
    assert sorted(s for s, _ in stand.data.values()) == ["aime2024", "aime2025", "deepmath"]
    c8, _, s8 = rehearsal_config(load_config(REPO / "configs" / "qwen3-8b-e3rl.yaml"), LAPTOP, tmp_path)
    assert s8.arch["tie_word_embeddings"] is False and s8.model_dir != stand.model_dir


def test_model_dir_config_json_wins_and_unknown_models_are_one_line(tmp_path):
    real = tmp_path / "MyLlama"
    real.mkdir()
    (real / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
        "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False, "vocab_size": 32000}))
    tiny = tiny_architecture(real_architecture(real))
    assert tiny["architectures"] == ["LlamaForCausalLM"] and tiny["head_dim"] == 128
    assert (tiny["num_attention_heads"], tiny["num_key_value_heads"]) == (1, 1)  # MHA stays MHA
    assert tiny["intermediate_size"] == round(256 * 11008 / 4096 / 32) * 32
    with pytest.raises(ConfigError, match=r"^model\.path: .*config\.json"):
        real_architecture(tmp_path / "SomeModel-7B")
    assert set(KNOWN_ARCHITECTURES) >= {"qwen3-4b", "qwen3-8b"}


def test_stand_in_schemas_follow_the_format_then_the_name():
    assert data_schema("zwhe99/DeepMath-103K", "auto", True) == "deepmath"
    assert data_schema("/data/train.parquet", "deepmath", True) == "deepmath"
    assert data_schema("/data/aime_2024.jsonl", "auto", False) == "aime2024"
    assert data_schema("/data/aime_2025.jsonl", "auto", False) == "aime2025"
    assert data_schema("HuggingFaceH4/MATH-500", "auto", False) == "math500"

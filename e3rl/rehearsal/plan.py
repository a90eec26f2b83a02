"""What a rehearsal changes in a config, and why: one function, the same rules for every config.

`rehearsal_config(cfg, machine, cache)` keeps every field as written except those that size and
the device decide, and returns the rehearsed config, one `Change` per field it touched (the table
`--rehearse` prints), and the `StandIns` the runner must write before that config can load.

The rules:
- model: a local model dir becomes a tiny random-init model of the same architecture (the dir's
  config.json when present, else `KNOWN_ARCHITECTURES` by the dir's name): same model type, head
  size, GQA ratio, tied/untied head; 2 layers, hidden 256. The dir's tokenizer when present, else a
  stand-in with the same special tokens and chat-template features. `builtin:` and `random` models
  are already toy-sized and stay.
- lengths scale together by one factor, so the segment count, erase budget and length ratios stay
  the config's: a segment becomes `SEGMENT_BLOCKS` KV blocks of the engine on this device (vLLM's
  CPU build takes multiples of 32 tokens).
- batches: the prompts per step shrink to what the generators need, keeping the number of
  mini-batches (optimizer steps per step) and epochs; evaluation to `EVAL_PROBLEMS` x
  `EVAL_SAMPLES`; group size and every algorithm setting stay.
- placement: learner ranks and generators up to what the machine hosts, CPUs per actor split to
  fit, one torch thread per actor; device and precision what the machine runs.
- data: the config's own files where they exist, else small generated files in the same schema.
- run: `REHEARSAL_STEPS` steps in `<output_dir>-rehearsal` (never the real run's dir, whose
  `resume: auto` would pick the rehearsal's checkpoints up), a checkpoint after every step.
- reward: a random model earns none, so every advantage and gradient would be 0 (and DAPO's
  dynamic sampling would refill forever): under `reward.rehearsal` a seeded coin stands in for
  the verifier, while the real verdict is still computed and logged (`reward/verified_accuracy`).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e3rl.config import Config, ConfigError, config_from_dict
from e3rl.data import looks_local

REHEARSAL_STEPS = 2
"""Training steps: one before the resume, one after."""
SEGMENT_BLOCKS = 2
"""A rehearsed segment spans this many KV blocks, so a rewind still reuses whole cached blocks."""
CPU_BLOCK = 32
"""vLLM's CPU build needs KV blocks in multiples of 32 tokens (16 raises "No common block size")."""
TRAIN_ROWS = 64
"""Training problems a rehearsal draws (enough for its steps and dynamic-sampling refills)."""
EVAL_PROBLEMS = 2
"""Problems per held-out set."""
EVAL_SAMPLES = 4
"""Samples per held-out problem."""
PROMPT_FLOOR = 128
"""The prompt cap never scales below this: a question must still fit."""
TINY_HIDDEN = 256
TINY_LAYERS = 2
INIT_STD = 0.1
"""Random-init weight std: HF's 0.02 gives near-uniform logits, so surprisal (and healing) would be
flat; 0.1 gives a spread of token probabilities."""
TRUNCATED_SHARE = 0.25
"""The stand-in model's EOS row is scaled so this share of its responses runs to `gen.max_new_tokens`:
the rehearsal sees responses that end and responses that are cut off."""

KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    # The Qwen3 model cards' config.json values that shape the tiny model (head size, GQA, MLP ratio, tying).
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=40960),
    "qwen3-1.7b": dict(model_type="qwen3", hidden_size=2048, intermediate_size=6144, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=40960),
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=40960),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, max_position_embeddings=40960),
    "qwen3-14b": dict(model_type="qwen3", hidden_size=5120, intermediate_size=17408, num_attention_heads=40,
                      num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, max_position_embeddings=40960),
    "qwen3-32b": dict(model_type="qwen3", hidden_size=5120, intermediate_size=25600, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, max_position_embeddings=40960),
}
"""Architectures the rehearsal knows by a model dir's name (lower case) when the dir is absent."""

KEPT_ARCH_KEYS = ("model_type", "architectures", "head_dim", "tie_word_embeddings", "max_position_embeddings",
                  "rope_theta", "rope_scaling", "rms_norm_eps", "hidden_act", "attention_bias", "use_sliding_window",
                  "sliding_window", "max_window_layers", "layer_types")
"""Architecture features the tiny model copies from the real config (the rest is size)."""

DATA_SCHEMAS = ("deepmath", "aime2024", "aime2025", "math500")
"""Stand-in data files: DeepMath-103K (parquet: question, final_answer, difficulty, topic, r1_solution_1..3),
AIME 2024 (HuggingFaceH4/aime_2024: id, problem, solution, answer, url, year), AIME 2025
(question, answer), MATH-500 (problem, solution, answer, subject, level, unique_id)."""


@dataclass(frozen=True)
class Machine:
    """What the machine at hand runs: it decides placement, device and precision."""

    cpus: int
    gpus: int
    bf16: bool
    """Native bf16 matmuls: CUDA, or a CPU with AVX512-BF16 / AMX (elsewhere bf16 is emulated and
    slow, so the rehearsal runs float32)."""

    @classmethod
    def detect(cls) -> "Machine":
        import torch

        from e3rl.models import usable_cores

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            flags = ""
        return cls(cpus=usable_cores(), gpus=gpus, bf16=gpus > 0 or "avx512_bf16" in flags or "amx_bf16" in flags)


@dataclass(frozen=True)
class Change:
    """One field the rehearsal set, for the printed table."""

    field: str
    written: Any
    rehearsed: Any
    why: str


@dataclass(frozen=True)
class StandIns:
    """What the runner writes (once, under the cache) before the rehearsed config can load."""

    model_dir: Path | None = None
    """The tiny model's dir (None: the config's model is already toy-sized)."""
    arch: dict = field(default_factory=dict)
    """Its transformers config kwargs (model_type included); vocab_size follows the tokenizer."""
    tokenizer: str = ""
    """The real tokenizer's dir, or "" for the stand-in (written into `model_dir`)."""
    eos_tokens: int = 0
    """The response cap the stand-in model's EOS rate is calibrated for ..."""
    eos_survive: float = TRUNCATED_SHARE
    """... so that this share of its responses runs to the cap without EOS."""
    data: dict = field(default_factory=dict)
    """Generated data files: {path: (schema, rows)}."""


def rehearsal_config(cfg: Config, machine: Machine, cache: Path) -> tuple[Config, list[Change], StandIns]:
    """The config as rehearsed on `machine`, what changed and why, and the stand-ins to write."""
    tree = cfg.to_dict()
    changes: list[Change] = []

    def put(dotted: str, value: Any, why: str) -> None:
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        if node[leaf] != value:
            changes.append(Change(dotted, node[leaf], value, why))
            node[leaf] = value

    on_gpu = machine.gpus > 0 and cfg.model.device in ("auto", "cuda")
    _device(cfg, machine, on_gpu, put)
    _placement(cfg, machine, on_gpu, put)
    block = _lengths(cfg, on_gpu, put)
    _batches(cfg, tree, put)
    data = _data(cfg, cache, put)
    model_dir, arch, tokenizer = _model(cfg, cache, put)
    max_new = tree["gen"]["max_new_tokens"]
    if model_dir is not None:
        model_dir = model_dir.with_name(f"{model_dir.name}-eos{max_new}")
        put("model.path", str(model_dir), f"a tiny random {arch['model_type']} model of the same architecture "
            f"(its EOS row scaled so ~{TRUNCATED_SHARE:.0%} of responses run to the {max_new}-token cap)"
            + ("" if tokenizer else "; a stand-in tokenizer with the same special tokens and chat-template features"))
    put("reward.rehearsal", True, "a random model earns no reward: a seeded coin stands in for the verifier "
        "(the real verdict is logged as reward/verified_accuracy), or every advantage and gradient would be 0")
    out = tree["run"]["output_dir"].rstrip("/")
    put("run.output_dir", f"{out}-rehearsal", "never the real run's dir (its resume: auto would find these checkpoints)")
    put("run.steps", REHEARSAL_STEPS, "one step, a resume from its checkpoint, one more step")
    put("run.token_budget", 0, "the rehearsal runs its steps")
    put("run.save_every", 1, "a checkpoint after every step, so the resume has one")
    put("run.eval_every", 0, "evaluation before and after")
    put("run.resume", "auto", "the second step resumes from the first one's checkpoint")
    put("run.report", True, "the report is part of the path")
    try:
        rehearsed = config_from_dict(tree)
    except ConfigError as e:
        raise ConfigError(f"rehearsal: the scaled-down config is invalid ({e})") from None
    return rehearsed, changes, StandIns(model_dir, arch, tokenizer, max_new if model_dir else 0, TRUNCATED_SHARE, data)


# ---------------------------------------------------------------- the rules, one per concern
def _device(cfg: Config, machine: Machine, on_gpu: bool, put) -> None:
    if not on_gpu:
        put("model.device", "cpu", "no GPU on this machine")
    for name, value in (("model.dtype", cfg.model.dtype), ("learner.dtype", cfg.learner.dtype)):
        if value in ("bfloat16", "float16") and not on_gpu and not (value == "bfloat16" and machine.bf16):
            put(name, "float32", f"this CPU has no native {value} matmuls")


def _placement(cfg: Config, machine: Machine, on_gpu: bool, put) -> None:
    r, l = cfg.resources, cfg.learner
    if on_gpu:
        per_role = max(1, machine.gpus // 2)
        gens = min(r.num_generators, max(1, int(per_role // max(r.gpus_per_generator, 1e-9))))
        ranks = min(l.num_workers, max(1, int(per_role // max(r.gpus_per_learner, 1e-9))))
    else:
        gens, ranks = min(r.num_generators, machine.cpus), min(l.num_workers, machine.cpus)
        put("resources.gpus_per_generator", 0.0, "no GPU on this machine")
        put("resources.gpus_per_learner", 0.0, "no GPU on this machine")
    put("resources.num_generators", gens, f"what this machine hosts ({machine.cpus} cores, {machine.gpus} GPUs)")
    put("learner.num_workers", ranks, f"what this machine hosts ({machine.cpus} cores, {machine.gpus} GPUs)")
    share = round(machine.cpus / (gens + ranks), 3)
    put("resources.cpus_per_generator", min(r.cpus_per_generator, share), f"{gens + ranks} actors share {machine.cpus} cores")
    put("resources.cpus_per_learner", min(r.cpus_per_learner, share), f"{gens + ranks} actors share {machine.cpus} cores")
    put("resources.torch_threads", 1, "one torch thread per process: the actors share the cores")
    put("resources.embedded_cpus", 0, "the embedded Ray takes this machine's cores")


def _lengths(cfg: Config, on_gpu: bool, put) -> int:
    """Scale every length by one factor (the segment's), so ratios and segment counts stay."""
    g, h = cfg.gen, cfg.heal
    block = g.vllm.block_size or (16 if on_gpu else CPU_BLOCK)
    if not on_gpu and block % CPU_BLOCK:
        block = -(-block // CPU_BLOCK) * CPU_BLOCK
        put("gen.vllm.block_size", block, "vLLM's CPU build takes KV blocks in multiples of 32 tokens")
    unit = h.segment_tokens if h.segment_mode == "fixed" else h.max_segment_tokens
    target = SEGMENT_BLOCKS * block
    if unit <= target:
        return block
    f = target / unit
    why = f"x{f:.3g}: a segment of {SEGMENT_BLOCKS} KV blocks ({target} tokens), every length scaled alike"

    def scaled(v: int) -> int:
        return max(1, round(v * f))

    if h.segment_mode == "fixed":
        put("heal.segment_tokens", target, why)
    else:
        put("heal.max_segment_tokens", target, why)
        put("heal.min_segment_tokens", scaled(h.min_segment_tokens), why)
    put("gen.max_new_tokens", scaled(g.max_new_tokens), why)
    if g.max_stream_tokens:
        put("gen.max_stream_tokens", scaled(g.max_stream_tokens), why)
    if cfg.reward.overlong_buffer:
        put("reward.overlong_buffer", scaled(cfg.reward.overlong_buffer), why)
    put("data.max_prompt_tokens", max(PROMPT_FLOOR, scaled(cfg.data.max_prompt_tokens)), why + f" (at least {PROMPT_FLOOR})")
    for name, v in (("learner.micro_batch_tokens", cfg.learner.micro_batch_tokens), ("learner.pack_tokens", cfg.learner.pack_tokens)):
        if v:
            put(name, scaled(v), why)
    return block


def _batches(cfg: Config, tree: dict, put) -> None:
    """Fewest prompts that keep the mini-batch count and feed every generator."""
    a, run = cfg.algo, cfg.run
    gens = tree["resources"]["num_generators"]
    per_mb = max(1, -(-gens // cfg.mini_batches))
    prompts = cfg.mini_batches * per_mb
    if prompts < a.prompts_per_step:
        why = f"toy size: {cfg.mini_batches} mini-batch(es) of {per_mb} prompt(s), as many optimizer steps as written"
        put("algo.prompts_per_step", prompts, why)
        if a.mini_batch_prompts:
            put("algo.mini_batch_prompts", per_mb, why)
    if run.eval_group_size > EVAL_SAMPLES:
        put("run.eval_group_size", EVAL_SAMPLES, "toy size")
    d = cfg.data
    if d.eval_size == 0 or d.eval_size > EVAL_PROBLEMS:
        put("data.eval_size", EVAL_PROBLEMS, "toy size")
    if d.train_size == 0 or d.train_size > TRAIN_ROWS:
        put("data.train_size", TRAIN_ROWS, "toy size")


def data_schema(spec: str, fmt: str, train: bool) -> str:
    """The schema of a stand-in for a data source that is not here: the configured format, else
    what the name says (an AIME 2025 set has `question/answer`, AIME 2024 `problem/answer`)."""
    name = spec.lower()
    if fmt == "deepmath" or (fmt == "auto" and "deepmath" in name):
        return "deepmath"
    if fmt == "math500" or (fmt == "auto" and re.search(r"math-?500", name)):
        return "math500"
    if fmt == "aime" or "aime" in name:
        return "aime2025" if "2025" in name else "aime2024"
    return "deepmath" if train else "aime2024"


def _stand_in_path(cache: Path, schema: str, rows: int) -> str:
    ext = "parquet" if schema == "deepmath" else "jsonl"
    return str(cache / "rehearsal-data" / f"{schema}-{rows}.{ext}")


def _data(cfg: Config, cache: Path, put) -> dict:
    d = cfg.data
    written: dict = {}

    def source(spec: str, train: bool) -> str:
        if spec.startswith("gym:") or (looks_local(spec) and Path(spec).expanduser().exists()):
            return spec
        schema = data_schema(spec, d.format if train else d.eval_format, train)
        rows = TRAIN_ROWS if train else 8
        path = _stand_in_path(cache, schema, rows)
        written[path] = (schema, rows)
        return path

    train = source(d.train, True)
    put("data.train", train, "not on this machine: a generated file in the same schema")
    evals = [source(s, False) for s in d.eval]
    put("data.eval", evals, "not on this machine: generated files in the same schemas")
    return written


def _model(cfg: Config, cache: Path, put) -> tuple[Path | None, dict, str]:
    m = cfg.model
    if m.path == "random" or m.path.startswith("builtin:"):
        return None, {}, ""
    real = Path(m.path).expanduser()
    arch = real_architecture(real)
    tiny = tiny_architecture(arch)
    tokenizer = m.tokenizer
    if not tokenizer and any((real / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = str(real)
    put("model.tokenizer", tokenizer, "the model dir's own tokenizer")
    if m.gguf_file:
        put("model.gguf_file", "", "the tiny model is saved as safetensors")
    key = json.dumps({"arch": tiny, "tokenizer": tokenizer}, sort_keys=True)
    name = f"{real.name.lower() or 'model'}-tiny-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    return cache / "rehearsal-models" / name, tiny, tokenizer


def real_architecture(model_dir: Path) -> dict:
    """The real model's config.json (only it is needed, not the weights), else a known architecture."""
    path = model_dir / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise ConfigError(f"model.path: {path} is not valid JSON ({e}) — fix or remove it") from None
    known = KNOWN_ARCHITECTURES.get(model_dir.name.lower())
    if known is None:
        raise ConfigError(f"model.path: {str(model_dir)!r} is not on this machine and its architecture is not one "
                          f"the rehearsal knows ({', '.join(KNOWN_ARCHITECTURES)}) — put the model's config.json "
                          "there (the weights are not needed)")
    return dict(known)


def tiny_architecture(real: dict) -> dict:
    """Same family and shape features (head size, GQA ratio, MLP ratio, tying), toy size."""
    heads, kv = int(real.get("num_attention_heads", 4)), int(real.get("num_key_value_heads") or real.get("num_attention_heads", 4))
    hidden = int(real.get("hidden_size", TINY_HIDDEN))
    ratio = int(real.get("intermediate_size", 4 * hidden)) / hidden
    tiny = {k: real[k] for k in KEPT_ARCH_KEYS if k in real and real[k] is not None}
    tiny.setdefault("head_dim", hidden // heads)
    tiny.update(hidden_size=TINY_HIDDEN, intermediate_size=max(32, round(TINY_HIDDEN * ratio / 32) * 32),
                num_hidden_layers=TINY_LAYERS, num_attention_heads=max(1, heads // max(kv, 1)), num_key_value_heads=1,
                initializer_range=INIT_STD)
    if "layer_types" in tiny:  # per-layer attention kinds (sliding / full): the first layers', as many as kept
        tiny["layer_types"] = list(tiny["layer_types"])[:TINY_LAYERS]
    if "max_window_layers" in tiny:
        tiny["max_window_layers"] = min(int(tiny["max_window_layers"]), TINY_LAYERS)
    return tiny


def default_cache() -> Path:
    from e3rl.models import cache_root

    return cache_root()



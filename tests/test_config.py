from pathlib import Path

import pytest
import yaml

from e3rl.config import Config, ConfigError, load_config, parse_override, save_config

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
    (["algo.loss=ppo"], "algo.loss: 'ppo' is not one of ['clip', 'gspo']"),
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

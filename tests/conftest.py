"""Shared test fixtures: tiny random-init HF models (built from a config) and the real tokenizer."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from e3rl.config import ModelConfig  # noqa: E402

TINY = {
    "qwen3": dict(model_type="qwen3", vocab_size=49152, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=1024, tie_word_embeddings=True),
    # vLLM's CPU attention needs head_dim 64 or more: the model both backends run in the vLLM tests
    "qwen3_hd64": dict(model_type="qwen3", vocab_size=49152, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                       max_position_embeddings=1024, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", vocab_size=49152, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, tie_word_embeddings=True),
    "llama": dict(model_type="llama", vocab_size=49152, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, tie_word_embeddings=True),
}


def tiny_model_config(family: str = "qwen3", init_std: float = 0.2, attn: str = "sdpa") -> ModelConfig:
    """A random-init model over the real SmolLM2 tokenizer's vocab; init_std > HF's 0.02 so logits
    are far from uniform and equivalence tests can fail."""
    return ModelConfig(path="random", random_init=TINY[family], init_std=init_std,
                       tokenizer="builtin:smollm2-135m-instruct", attn_implementation=attn, device="cpu")


@pytest.fixture(scope="session")
def tokenizer():
    from e3rl.models import load_tokenizer

    return load_tokenizer(tiny_model_config())


@pytest.fixture(scope="session")
def tiny_model():
    from e3rl.models import load_model

    return load_model(tiny_model_config(), seed=0)


@pytest.fixture(scope="session")
def vllm_model():
    """The HF model the vLLM tests compare against (fp32, the same weights the engine loads)."""
    from e3rl.models import load_model

    return load_model(tiny_model_config("qwen3_hd64"), seed=0)


@pytest.fixture(scope="session")
def vllm_engine():
    """One in-process vLLM engine on `vllm_model`'s weights for the whole run (start-up and the first
    batch cost seconds). Tests that change its weights restore them. Where vLLM is not installed
    this fails, never skips: CI must test both backends."""
    import torch

    from actors.vllm_engine import VllmEngine
    from e3rl.config import VllmConfig
    from e3rl.models import hf_model_dir

    before = torch.get_num_threads()
    engine = VllmEngine(hf_model_dir(tiny_model_config("qwen3_hd64"), seed=0), torch.float32, torch.device("cpu"),
                        VllmConfig(kv_cache_gib=0.25), max_model_len=1024, logprobs_mode="processed_logprobs",
                        threads=before)
    return engine


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test run (starting Ray costs ~6 s). 4 logical CPUs on a 2-core
    machine: actors here are light, and fractional reservations keep placement honest."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    """tests/actors and tests/learner run many tiny-model ops in this process: on a shared 2-core
    machine a second OpenMP thread only spin-waits for a busy core (measured: 17 s vs 0.7 s for one
    test under load). Ray actors set their own thread counts."""
    import torch

    if request.node.path.parent.name not in ("actors", "learner"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

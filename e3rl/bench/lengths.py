"""`python -m e3rl.bench lengths [--model default|toy] [--lengths 512,1024,...]`: learner memory and
time against the sequence length L.

One prompt + stream row per length, cut into 16 kept segments plus 2 erased attempts (the paper's
16-segment layout), bf16 weights as the learner runs them. For each L, one forward + backward of
the policy log-prob loss (no optimizer: its state does not depend on L):
- `stream`: what the learner runs (kept-first row, causal SDPA + the erased rows' own visibility,
  chunked log-probs);
- `dense`: what it ran before (stream order, the dense [1, 1, L, L] mask, one fp32 log_softmax
  over [S, V]), from `e3rl.bench.dense_reference`.
Each (mode, L) runs in a fresh process: peak memory is its high-water RSS during the first step
above its level before it (Linux: the peak is reset through /proc/self/clear_refs), so it counts
every allocation, the allocator's included, and no memory cached by an earlier step hides any;
the time is that of a second step (the first pays one-time kernel selection). Both include the
parameters' bf16 gradients (~270 MB for the default's 135M parameters), the same for every L.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

import torch

from e3rl.bench import report
from e3rl.bench.learner import BENCH_MODEL, build_trajectory
from e3rl.core.trajectory import Trajectory

PROMPT = 64
SEGMENTS, ERASED = 16, 2


def long_trajectory(length: int, vocab: int, seed: int = 0) -> Trajectory:
    """~`length` tokens: a 64-token prompt, 16 kept segments, erased attempts at segments 3 and 9."""
    g = torch.Generator().manual_seed(seed)
    seg = max(1, (length - PROMPT) // (SEGMENTS + ERASED))
    attempts = []
    for n in range(SEGMENTS):
        if n in (3, 9):
            attempts.append((n, torch.randint(1, vocab, (seg,), generator=g), True))
        attempts.append((n, torch.randint(1, vocab, (seg,), generator=g), False))
    return build_trajectory(torch.randint(1, vocab, (PROMPT,), generator=g), attempts, [0.5] * len(attempts))


def _rss_mb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def stream_step(model: torch.nn.Module, traj: Trajectory) -> Callable[[], None]:
    from learner.stream_batch import StreamPolicy, collate, policy_forward, stream_logprobs

    policy = StreamPolicy(model)

    def step() -> None:
        b = collate([traj], pad_id=0)
        stream_logprobs(policy_forward(policy, b), b, 1.0).sum().backward()

    return step


def dense_step(model: torch.nn.Module, traj: Trajectory) -> Callable[[], None]:
    from e3rl.bench.dense_reference import dense_collate
    from e3rl.core.surprisal import token_logprobs

    def step() -> None:
        b = dense_collate([traj])
        mask = b.attn_mask.to(next(model.parameters()).dtype)
        h = model.get_decoder()(input_ids=b.input_ids, attention_mask=mask, position_ids=b.position_ids,
                                use_cache=False).last_hidden_state
        h = h.gather(1, b.target_index[..., None].expand(-1, -1, h.shape[-1]))
        (token_logprobs(model.get_output_embeddings()(h), b.stream_ids) * b.mask).sum().backward()

    return step


def measure(step: Callable[[], None], model: torch.nn.Module) -> dict[str, Optional[float]]:
    """Peak memory of a first step, time of a second (see the module docstring)."""
    gc.collect()
    exact = _reset_peak()
    before = _rss_mb("VmRSS")
    step()
    peak = _rss_mb("VmHWM")
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    return {"s": round(seconds, 3),
            "peak_mb": round(peak - before, 1) if exact and peak is not None and before is not None else None}


def _one(model_kind: str, mode: str, length: int) -> dict:
    """One (mode, L) measurement, in this (fresh) process."""
    from e3rl.bench.learner import _bench_config
    from e3rl.models import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(_bench_config(1, 2, 1, 2, model_kind).model, seed=0).to(torch.bfloat16)
    traj = long_trajectory(length, model.get_output_embeddings().weight.shape[0])
    make = stream_step if mode == "stream" else dense_step
    return {"mode": mode, "L": traj.prompt_ids.numel() + traj.stream_ids.numel(),
            "erased_tokens": int((traj.erased_at >= 0).sum()), **measure(make(model, traj), model)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m e3rl.bench lengths", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="write the JSON here too")
    ap.add_argument("--model", choices=("default", "toy"), default="default")
    ap.add_argument("--lengths", default="512,1024,2048,4096")
    ap.add_argument("--modes", default="stream,dense")
    ap.add_argument("--one", nargs=2, metavar=("MODE", "L"), help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args(list(argv or []))
    if args.one:
        print("E3RL_LENGTH " + json.dumps(_one(args.model, args.one[0], int(args.one[1]))), flush=True)
        return 0
    from e3rl.models import materialize_builtin

    if args.model == "default":
        materialize_builtin("builtin:smollm2-135m-instruct")
    rows = []
    for mode in args.modes.split(","):
        for length in (int(x) for x in args.lengths.split(",")):
            proc = subprocess.run([sys.executable, "-m", "e3rl.bench", "lengths", "--model", args.model,
                                   "--one", mode, str(length)], capture_output=True, text=True)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("E3RL_LENGTH ")]
            if proc.returncode != 0 or not lines:
                rows.append({"mode": mode, "L": length, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                rows.append(json.loads(lines[-1].split(" ", 1)[1]))
            print(rows[-1], flush=True)
    by = {(r["mode"], r["L"]): r for r in rows if "error" not in r}
    ratios = {str(L): {"time_dense_over_stream": round(by[("dense", L)]["s"] / by[("stream", L)]["s"], 2),
                       "peak_dense_minus_stream_mb": (round(by[("dense", L)]["peak_mb"] - by[("stream", L)]["peak_mb"], 1)
                                                      if by[("dense", L)]["peak_mb"] is not None else None)}
              for (mode, L) in by if mode == "stream" and ("dense", L) in by}
    return report({"model": args.model, "dtype": "bfloat16", "threads": torch.get_num_threads(),
                   "layout": f"prompt {PROMPT}, {SEGMENTS} kept segments + {ERASED} erased attempts",
                   "rows": rows, "dense_vs_stream": ratios, "bench_model": BENCH_MODEL if args.model == "toy" else None},
                  args.out, indent=1)

"""`python -m e3rl.bench learner [--model default|toy] --out FILE.json`: the learner against this machine.

On the embedded default's real model (SmolLM2-135M, `--model default`) or a toy, one batch shaped
like a default step (2 groups x 8 samples, ~110 tokens each, with erasures), all in one run:
- the e3rl step (one ZeRO-3 rank with every core, as the embedded default trains) and the same on
  `--workers` ranks, in `--dtype` (bf16 where the CPU has it natively: the fast path, opt-in on CPUs);
- plain torch on the same tokens: a HF causal-LM loss + fused AdamW in fp32 and under bf16 autocast,
  and our stream step without DeepSpeed (`TorchStep`);
- the matmul peaks (fp32, bf16) measured in the same process, achieved GFLOP/s (6 x params x tokens
  / step) and MFU against them, the learner's padding fraction;
- the weight broadcast seconds and bytes, and its floor: ray.put + ray.get of the same bytes.
Steps are timed interleaved in blocks (`--block` consecutive calls of each per repetition, the first
of a block dropped: see `_interleaved_medians`), medians reported.

Also home of `synthetic_trajectories`: realistic erasure layouts built with the core's mask math,
shared with tests/learner.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import time
from typing import Optional, Sequence

import torch

from e3rl.bench import report
from learner.precision import cpu_has_native_bf16, learner_dtype
from e3rl.core.trajectory import SegmentTable, Trajectory, stream_position_ids

BENCH_MODEL = dict(model_type="qwen3", vocab_size=8192, hidden_size=192, intermediate_size=512,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=48,
                   max_position_embeddings=1024, tie_word_embeddings=True)


# ------------------------------------------------------------------ synthetic trajectories
def build_trajectory(prompt_ids: torch.Tensor, attempts: Sequence[tuple[int, torch.Tensor, bool]],
                     uncertainty: Sequence[float], group_id: int = 0, sample_index: int = 0,
                     reward: float = 0.0) -> Trajectory:
    """One trajectory from segment attempts (position n, tokens, erased) in generation order.

    An erased attempt [s, e) is rewound right after its last token, so erased_at = e for it: the
    replacement's first token (stream index e) is the first that no longer sees it.
    """
    p = prompt_ids.numel()
    stream = torch.cat([tok for _, tok, _ in attempts])
    erased_at = torch.full((stream.numel(),), -1, dtype=torch.long)
    starts, ends, counts, seen = [], [], [], {}
    start = 0
    for n, tok, erased in attempts:
        end = start + tok.numel()
        if erased:
            erased_at[start:end] = end
        starts.append(start), ends.append(end), counts.append(seen.get(n, 0))
        seen[n] = seen.get(n, 0) + int(erased)
        start = end
    r = len(attempts)
    segs = SegmentTable(
        position=torch.tensor([a[0] for a in attempts]), start=torch.tensor(starts), end=torch.tensor(ends),
        uncertainty=torch.tensor(list(uncertainty), dtype=torch.float32), threshold=torch.full((r,), float("inf")),
        score=torch.full((r,), float("nan")),
        erase_count=torch.tensor(counts), erased=torch.tensor([a[2] for a in attempts]),
    )
    return Trajectory(
        prompt_ids=prompt_ids.long(), stream_ids=stream.long(), behavior_logp=torch.zeros(stream.numel()),
        surprisal=torch.zeros(stream.numel()), erased_at=erased_at, position_ids=stream_position_ids(p, erased_at),
        segments=segs, group_id=group_id, sample_index=sample_index, reward=reward,
        rewinds=int(sum(a[2] for a in attempts)),
    )


def synthetic_trajectories(n_groups: int, group_size: int, prompt_len: int = 8, seg_len: int = 6,
                           n_segments: int = 3, erase_prob: float = 0.4, vocab: int = 1000,
                           seed: int = 0) -> list[Trajectory]:
    """Groups sharing a prompt, random tokens, random erasures (<= 1 per position), mixed rewards."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for gi in range(n_groups):
        prompt = torch.randint(1, vocab, (prompt_len + gi % 3,), generator=g)
        for si in range(group_size):
            attempts = []
            for n in range(n_segments):
                length = seg_len + int(torch.randint(-2, 3, (1,), generator=g))
                if n < n_segments - 1 and float(torch.rand(1, generator=g)) < erase_prob:
                    attempts.append((n, torch.randint(1, vocab, (length,), generator=g), True))
                attempts.append((n, torch.randint(1, vocab, (length,), generator=g), False))
            unc = torch.rand(len(attempts), generator=g).tolist()
            reward = float(si % 2) if si < 2 else float(torch.rand(1, generator=g) < 0.5)
            out.append(build_trajectory(prompt, attempts, unc, group_id=gi, sample_index=si, reward=reward))
    return out


@torch.no_grad()
def fill_behavior_logp(trajs: list[Trajectory], model: torch.nn.Module, temperature: float, noise: float = 0.05,
                       seed: int = 0) -> None:
    """Behaviour log-probs = the model's own (one stream forward) + noise: ratios near 1, some clipped."""
    from learner.stream_batch import StreamPolicy, collate, policy_forward, stream_logprobs

    g = torch.Generator().manual_seed(seed)
    batch = collate(trajs, pad_id=0)
    logp = stream_logprobs(policy_forward(StreamPolicy(model), batch), batch, temperature)
    for i, t in enumerate(trajs):
        s = t.stream_ids.numel()
        t.behavior_logp = logp[i, :s] + noise * torch.randn(s, generator=g)


# ------------------------------------------------------------------ plain-torch baseline
class TorchStep:
    """The same update as the ZeRO-3 learner in one process: stream forward, advantages, loss, AdamW."""

    def __init__(self, cfg, model: torch.nn.Module):
        from learner.advantages import AdvantageSpec
        from learner.stream_batch import StreamPolicy

        self.cfg, self.policy = cfg, StreamPolicy(model)
        self.spec = AdvantageSpec.from_config(cfg)
        self.capture = self.policy.capture if self.spec.needs_attention else None
        lc = cfg.learner
        self.opt = torch.optim.AdamW(model.parameters(), lr=lc.lr, betas=lc.betas, eps=1e-8, weight_decay=lc.weight_decay)

    def __call__(self, trajs: list[Trajectory]) -> float:
        from e3rl.core.loss import LOSSES, LossInputs, LossSettings
        from learner.advantages import batch_token_advantages, outcome_advantages
        from learner.stream_batch import collate, logprobs_and_entropy, pad_tokens, policy_forward, split_attention

        a, mbs = self.cfg.algo, self.cfg.learner.micro_batch_size
        outcome = outcome_advantages(trajs, self.spec.estimator)
        settings = LossSettings(a.clip_low, a.clip_high, a.loss_agg, 0.0, self.cfg.gen.max_new_tokens,
                                float(sum(t.stream_ids.numel() for t in trajs)), float(len(trajs)))
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(0, len(trajs), mbs):
            mb = trajs[i : i + mbs]
            b = collate(mb, 0, self.spec.answer_tokens, self.cfg.learner.pack_tokens)
            if self.capture is not None:
                self.capture.arm(b.answer_index, b.sample_row)
            logits = policy_forward(self.policy, b)
            attn = self.capture.disarm() if self.capture is not None else None
            logp, _ = logprobs_and_entropy(logits, b, self.cfg.gen.temperature)  # entropy: logged like the learner
            adv = pad_tokens(batch_token_advantages(mb, outcome[i : i + mbs], self.spec,
                                                    split_attention(attn, b) if attn is not None else None), b.mask.shape[1])
            loss, _ = LOSSES[a.loss](LossInputs(logp, logp.detach(), adv, b.mask), settings)  # on-policy, as the learner
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.learner.grad_clip)
        self.opt.step()
        return total


# ------------------------------------------------------------------ the benchmark
def _bench_config(workers: int, mbs: int, n_groups: int, group_size: int, model: str = "toy", dtype: str = "auto"):
    from e3rl.config import AlgoConfig, Config, GenConfig, LearnerConfig, ModelConfig, ResourcesConfig

    mc = (ModelConfig(path="builtin:smollm2-135m-instruct", device="cpu") if model == "default"
          else ModelConfig(path="random", random_init=BENCH_MODEL, init_std=0.05, device="cpu"))
    return Config(
        model=mc, learner=LearnerConfig(num_workers=workers, lr=1e-5, micro_batch_size=mbs, dtype=dtype),
        algo=AlgoConfig(prompts_per_step=n_groups, allocation="attention"),
        gen=GenConfig(group_size=group_size, temperature=1.0),
        resources=ResourcesConfig(cpus_per_learner=1.0),
    ).validate()


def _interleaved_medians(fns: dict, steps: int, warmup: int, block: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, alternating them every repetition so that load from
    other processes on a shared machine hits all of them alike.

    `block` > 1: each repetition runs `block` consecutive calls of a fn and keeps all but the first.
    On this VM a process whose memory sat idle while another process computed is 20-40% slower for
    its next step (measured: the e3rl learner 9.0 s per step alone, 12.5 s right after a plain step
    in the driver, and the plain step slowed the same way): strict alternation measures that switch,
    not the step. With blocks, every fn pays it once per block and the kept calls are warm alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(warmup + steps):
        for name, fn in fns.items():
            for call in range(block):
                t0 = time.perf_counter()
                fn()
                if rep >= warmup and (call > 0 or block == 1):
                    times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _object_store_floor(num_bytes: int, repeats: int = 3) -> float:
    """ray.put + ray.get of one buffer of the same size: the transport's lower bound."""
    import numpy as np
    import ray

    buf = np.ones(num_bytes, dtype=np.uint8)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ray.get(ray.put(buf))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m e3rl.bench learner", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="write the JSON here too")
    ap.add_argument("--model", choices=("default", "toy"), default="default",
                    help="default: the embedded default's SmolLM2-135M; toy: a 3M-parameter random model")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=60)
    ap.add_argument("--seg-len", type=int, default=10)
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--block", type=int, default=2, help="consecutive calls per fn and repetition; the first is dropped")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"),
                    default="bfloat16" if cpu_has_native_bf16() else "float32",
                    help="learner.dtype of the e3rl step (default: bf16 where this CPU has it natively, the fast path)")
    args = ap.parse_args(list(argv or []))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from e3rl.bench.hardware import matmul_gflops, plain_step, training_flops
    from e3rl.models import load_model, materialize_builtin
    from learner.group import LearnerGroup

    if args.model == "default":
        materialize_builtin("builtin:smollm2-135m-instruct")
    n = args.groups * args.group_size
    cfg = _bench_config(args.workers, n, args.groups, args.group_size, args.model, args.dtype)
    one = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, num_workers=1))
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    model = load_model(cfg.model, seed=cfg.run.seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    vocab = model.get_output_embeddings().weight.shape[0]
    trajs = synthetic_trajectories(args.groups, args.group_size, args.prompt_len, args.seg_len, args.segments,
                                   vocab=vocab, seed=1)
    fill_behavior_logp(trajs, model, cfg.gen.temperature)
    seqs = [torch.cat([t.prompt_ids, t.stream_ids]) for t in trajs]
    tokens = sum(s.numel() for s in seqs)
    params = sum(p.numel() for p in model.parameters())
    peaks = {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)}
    # Phase 1 in this process: the plain references and our stream step without DeepSpeed.
    fns = {
        "plain_fp32": plain_step(load_model(cfg.model, seed=cfg.run.seed), seqs, bf16=False),
        "plain_bf16_autocast": plain_step(load_model(cfg.model, seed=cfg.run.seed), seqs, bf16=True),
        "stream_torch_fp32": (lambda s=TorchStep(cfg, load_model(cfg.model, seed=cfg.run.seed)): s(trajs)),
    }
    med = _interleaved_medians(fns, args.steps, args.warmup, args.block)
    anchor = {"plain_bf16_autocast": fns["plain_bf16_autocast"]}  # re-timed beside the learners
    del fns, model
    gc.collect()
    # Phase 2: the learners in Ray (every model copy costs ~2 GB with its optimizer: one group at a time).
    ray.init(address="local", num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False)
    metrics: dict[str, dict] = {}
    setup_s: dict[str, float] = {}
    try:
        for name, c in (("e3rl_1rank", one), (f"e3rl_{args.workers}ranks", cfg)):
            t0 = time.perf_counter()
            g = LearnerGroup(c, init_state=init)
            setup_s[name] = round(time.perf_counter() - t0, 2)
            timed = anchor | {name: lambda g=g, name=name: metrics.__setitem__(name, g.train_step(trajs))}
            both = _interleaved_medians(timed, args.steps, args.warmup, args.block)
            med[name] = both[name]
            med[f"plain_bf16_autocast_beside_{name}"] = both["plain_bf16_autocast"]
            if name != "e3rl_1rank":
                t0 = time.perf_counter()
                handle = g.publish_weights()
                ray.get(handle.ref)
                sync_s = time.perf_counter() - t0
                floor_s = _object_store_floor(handle.num_bytes)
            g.shutdown()
    finally:
        ray.shutdown()
    flops = training_flops(params, tokens)
    e3, plain16 = med["e3rl_1rank"], med["plain_bf16_autocast_beside_e3rl_1rank"]
    result = {
        "model": args.model, "model_params": params, "batch_sequences": n, "batch_tokens": tokens, "threads": threads,
        "learner_dtype": str(learner_dtype(cfg.learner.dtype, torch.device("cpu"))).removeprefix("torch."),
        "step_s_medians": {k: round(v, 3) for k, v in med.items()}, "load_avg_1m": round(os.getloadavg()[0], 2),
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peaks.items()},
        "achieved_gflops": {k: round(flops / v / 1e9, 1) for k, v in med.items()},
        "e3rl_mfu_vs_bf16_peak": round(flops / e3 / 1e9 / peaks["bfloat16"], 3),
        # the learner forwards fewer tokens than the samples hold when a group's prompt is shared:
        # the MFU above is per sample token (the plain steps' work); this one counts what ran
        "e3rl_tokens_forwarded": metrics["e3rl_1rank"]["learner/tokens_forwarded"],
        "e3rl_mfu_on_forwarded_tokens": round(training_flops(params, int(metrics["e3rl_1rank"]["learner/tokens_forwarded"]))
                                              / e3 / 1e9 / peaks["bfloat16"], 3),
        "plain_bf16_mfu_vs_bf16_peak": round(flops / plain16 / 1e9 / peaks["bfloat16"], 3),
        "e3rl_vs_plain_bf16_autocast": round(e3 / plain16, 3),
        "e3rl_vs_plain_fp32": round(e3 / med["plain_fp32"], 3),
        f"zero3_{args.workers}ranks_vs_plain_bf16_autocast": round(
            med[f"e3rl_{args.workers}ranks"] / med[f"plain_bf16_autocast_beside_e3rl_{args.workers}ranks"], 3),
        "padding_frac": round(metrics["e3rl_1rank"]["learner/padding_frac"], 3),
        "e3rl_phases_s": {k.removeprefix("learner/"): round(v, 3) for k, v in metrics["e3rl_1rank"].items()
                          if k.endswith("_s") and k != "learner/step_s"},
        "zero3_setup_s": setup_s, "updates_each": (args.steps + args.warmup) * args.block,
        "weight_sync_s": round(sync_s, 4), "weight_sync_bytes": handle.num_bytes,
        "object_store_floor_s": round(floor_s, 4), "weight_sync_vs_floor": round(sync_s / max(floor_s, 1e-9), 2),
    }
    return report(result, args.out, indent=1)

"""The vLLM backend against the HF backend and the model itself, on a real in-process engine.

Both backends run the same fp32 weights (`vllm_model` is what `vllm_engine` loaded), so greedy
decoding must produce the same tokens — through forced erasures too — and the log-probs vLLM
returns must be the HF model's to float32 rounding (different kernels: 1e-4 is ~50x the measured
gap). The prefix-cache tests spy on the real engine's requests (no mock: every request still runs).
"""
from __future__ import annotations

import re

import pytest
import torch

from actors.generator import RewindableGenerator
from actors.vllm_generator import VllmGenerator
from e3rl.config import GenConfig, HealConfig

TEXTS = ["Hello there, how are you today?", "1+1=", "The quick brown fox"]
LOGP_TOL = 1e-4


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode(t) for t in TEXTS]


def both(vllm_engine, vllm_model, tokenizer, gen, heal, active, force_erase=None, eos=()):
    v = VllmGenerator(vllm_engine, tokenizer, gen, heal, active, seed=0, eos=eos)
    h = RewindableGenerator(vllm_model, tokenizer, gen, heal, active, seed=0, eos_token_ids=eos)
    v.force_erase = h.force_erase = force_erase
    return v, h


def assert_same_trajectories(tv, th):
    for a, b in zip(tv, th, strict=True):
        assert a.stream_ids.tolist() == b.stream_ids.tolist()
        assert a.erased_at.tolist() == b.erased_at.tolist()
        assert a.position_ids.tolist() == b.position_ids.tolist()
        assert a.segments.erased.tolist() == b.segments.erased.tolist()
        assert a.finish_reason == b.finish_reason and a.response_text == b.response_text
        assert torch.allclose(a.behavior_logp, b.behavior_logp, atol=LOGP_TOL, rtol=0)
        assert torch.allclose(a.surprisal, b.surprisal, atol=LOGP_TOL, rtol=0)


def test_greedy_without_healing_matches_the_hf_backend(vllm_engine, vllm_model, tokenizer, prompts):
    gen = GenConfig(group_size=2, max_new_tokens=24, temperature=0)
    v, h = both(vllm_engine, vllm_model, tokenizer, gen, HealConfig(segment_tokens=8), active=False)
    tv, th = v.generate(prompts, [0, 1, 2]), h.generate(prompts, [0, 1, 2])
    assert_same_trajectories(tv, th)
    assert v.stats["rounds"] == 1  # healing off: one request per row to its end


@pytest.mark.parametrize("mode", ["fixed", "delimiter"])
def test_greedy_with_forced_erasures_matches_the_hf_backend(vllm_engine, vllm_model, tokenizer, prompts, mode):
    """Rewinds on both engines: every kept and erased token, position and log-prob agrees."""
    gen = GenConfig(group_size=2, max_new_tokens=20, temperature=0)
    heal = HealConfig(segment_mode=mode, segment_tokens=5, min_segment_tokens=2, max_segment_tokens=6,
                      max_erases_per_segment=2, max_erases_per_traj=3)
    v, h = both(vllm_engine, vllm_model, tokenizer, gen, heal, active=True,
                force_erase=lambda row, position: (row.sample + position) % 2 == 1)
    tv, th = v.generate(prompts, [0, 1, 2]), h.generate(prompts, [0, 1, 2])
    assert_same_trajectories(tv, th)
    assert sum(t.rewinds for t in tv) >= 6


@pytest.mark.parametrize("top_k, top_p", [(0, 0.8), (20, 1.0)])
def test_behaviour_logprobs_mean_the_sampling_distribution_on_both_backends(vllm_engine, vllm_model, tokenizer,
                                                                          prompts, top_k, top_p):
    """Under T = 0.7 with top-p or top-k, each backend's behaviour log-prob of every sampled token is
    its log-prob under the truncated, renormalised distribution it was drawn from, as a fresh
    forward computes it. The HF loop once recorded the untruncated softmax(z / T), while vLLM returned
    the truncated one: the same token had two behaviour log-probs, and TIS weights differed by engine."""
    from actors.sampling import filter_logits

    gen = GenConfig(group_size=2, max_new_tokens=12, temperature=0.7, top_k=top_k, top_p=top_p)
    heal = HealConfig(surprisal_under="sampling")  # the engine's logprobs_mode: processed_logprobs
    v, h = both(vllm_engine, vllm_model, tokenizer, gen, heal, False)
    # vLLM's kernels may put a token at the nucleus / top-k edge on the other side: that moves the
    # normaliser by the token's mass (seen: 3e-4), far below the gap truncation makes (>= 0.05 here)
    for g, tol in ((h, LOGP_TOL), (v, 1e-3)):
        for t in g.generate(prompts, [0, 1, 2]):
            prompt = t.prompt_ids.tolist()
            ids = torch.tensor([prompt + t.stream_ids.tolist()])
            with torch.no_grad():
                z = vllm_model(ids).logits[0, len(prompt) - 1 : -1].float() / gen.temperature
            ref = filter_logits(z, top_k, top_p).log_softmax(-1).gather(1, t.stream_ids[:, None])[:, 0]
            assert torch.allclose(t.behavior_logp, ref, atol=tol, rtol=0), type(g).__name__
            assert torch.allclose(t.surprisal, -ref, atol=tol, rtol=0)
            untruncated = z.log_softmax(-1).gather(1, t.stream_ids[:, None])[:, 0]
            assert (ref - untruncated).min() > 0.05  # what the HF loop recorded before: far off


def test_eos_and_stop_strings_end_rows_as_on_hf(vllm_engine, vllm_model, tokenizer, prompts):
    gen = GenConfig(group_size=2, max_new_tokens=24, temperature=0)
    heal = HealConfig(segment_tokens=4)
    _, h = both(vllm_engine, vllm_model, tokenizer, gen, heal, active=False)
    ref = h.generate(prompts, [0, 1, 2])
    eos = (int(ref[0].stream_ids[6]),)  # a token greedy decoding emits: it must end row 0 there
    stop = ("".join(tokenizer.decode([t]) for t in ref[2].stream_ids[9:11].tolist()),)  # as the policy reads it
    gen = GenConfig(group_size=2, max_new_tokens=24, temperature=0, stop=stop)
    v, h = both(vllm_engine, vllm_model, tokenizer, gen, heal, active=True, eos=eos)
    tv, th = v.generate(prompts, [0, 1, 2]), h.generate(prompts, [0, 1, 2])
    assert_same_trajectories(tv, th)
    assert tv[0].finish_reason == "eos" and len(tv[0].stream_ids) <= 7
    assert tv[2].finish_reason == tv[3].finish_reason == "stop" and len(tv[2].stream_ids) <= 11  # prompt 1's rows


def test_seeded_sampling_repeats_and_differs_across_seeds(vllm_engine, tokenizer, prompts):
    gen = GenConfig(group_size=4, max_new_tokens=16)
    heal = HealConfig(segment_tokens=4)
    g = VllmGenerator(vllm_engine, tokenizer, gen, heal, True, seed=0, eos=())
    runs = []
    for seed in (3, 3, 4):
        g.rng.manual_seed(seed)
        runs.append([t.stream_ids.tolist() for t in g.generate(prompts, [0, 1, 2])])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert len({tuple(s) for s in runs[0][:4]}) > 1  # a group's samples differ (each request has its own seed)


class Spy:
    """Records every request the real engine runs and what it answered."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, requests, *args):
        done = self.engine.generate(requests, *args)
        self.calls.append(list(zip(requests, done)))
        return done


def test_a_rewind_reuses_the_cached_prefix(vllm_engine, tokenizer):
    """Prompts + streams of >= 4 blocks, segments as long as a block: every request that resubmits an
    erased segment's prefix finds all of that prefix's blocks but the last in the cache — it
    recomputes at most one block ((prefix - 1) mod B + 1 tokens: vLLM always computes a prompt's last
    token, so a block-aligned prefix recomputes its last block) — and under one block on average."""
    bs = vllm_engine.block_size
    gen = GenConfig(group_size=2, max_new_tokens=3 * bs)
    heal = HealConfig(segment_tokens=bs, max_erases_per_segment=2, max_erases_per_traj=4)
    g = VllmGenerator(vllm_engine, tokenizer, gen, heal, True, seed=0, eos=())
    g.force_erase = lambda row, position: (row.sample + position) % 2 == 0
    long = [tokenizer.encode(" ".join([t] * 40))[: 2 * bs + 5 + 9 * i] for i, t in enumerate(TEXTS)]
    trajs = g.generate(long, [0, 1, 2])
    st = g.stats
    assert st["rewind_requests"] == sum(t.rewinds for t in trajs) >= 12
    assert st["rewind_cached_min"] >= 2 * bs and st["rewind_recomputed_max"] <= bs
    assert st["rewind_recomputed_tokens"] / st["rewind_requests"] < bs
    # a kept segment's next request ends one token into a new block: it recomputes that token only
    assert st["cached_tokens"] / st["prefix_tokens"] > 0.8


def test_weights_load_in_place_and_no_old_block_is_reused(vllm_engine, vllm_model, tokenizer, prompts):
    """After a load, vLLM's log-probs of a fixed continuation are the HF model's with the new
    weights, and a prompt cached under the old weights is recomputed in full."""
    spy = Spy(vllm_engine)
    g = VllmGenerator(spy, tokenizer, GenConfig(group_size=2, max_new_tokens=12, temperature=0),
                      HealConfig(segment_tokens=4), False, seed=0, eos=())
    long = [tokenizer.encode(" ".join([TEXTS[0]] * 10))]
    g.generate(long, [0])
    original = {k: v.clone() for k, v in vllm_model.state_dict().items()}
    gen_ = torch.Generator().manual_seed(1)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=gen_) if v.dim() == 2 else v for k, v in original.items()}
    new["lm_head.weight"] = new["model.embed_tokens.weight"]  # tied
    try:
        g.load_weights({k: v for k, v in new.items() if k != "lm_head.weight"}, version=7)  # tied: absent
        vllm_model.load_state_dict(new)
        spy.calls.clear()
        t = g.generate(long, [0])[0]
        assert all(done.cached_tokens == 0 for req, done in spy.calls[0][:1])
        ids = torch.tensor([long[0] + t.stream_ids.tolist()])
        with torch.no_grad():
            ref = vllm_model(ids).logits[0, len(long[0]) - 1 : -1].log_softmax(-1)
        ref = ref.gather(1, t.stream_ids[:, None])[:, 0]
        assert torch.allclose(t.behavior_logp, ref, atol=LOGP_TOL, rtol=0)
        assert t.policy_version == 7
    finally:
        g.load_weights(original, version=0)
        vllm_model.load_state_dict(original)


def test_only_the_policys_stop_ids_end_a_request():
    """vLLM would also stop at its generation config's EOS; a row the policy has not finished would
    then pay a new round (and prefill) for nothing, so that stop is off and ours are explicit."""
    from actors.vllm_engine import Request, VllmEngine

    (p,) = VllmEngine.sampling_params([Request([1, 2], 5, 7)], 1.0, 0, 1.0, {9, 3})
    assert p.ignore_eos and sorted(p.stop_token_ids) == [3, 9] and p.seed == 7 and p.max_tokens == 5
    assert p.logprobs == 0 and not p.detokenize


def test_a_model_vllm_cannot_run_here_is_one_line_at_start(tmp_path):
    """vLLM's CPU attention rejects head_dim 16 only when it first runs: the engine's warm-up request
    turns that into a config error at start-up, not a traceback in the first rollout. In its own
    process: a second engine that fails tears down vLLM's process-wide parallel state, which the
    session's engine in this process still uses."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import torch\n"
        "from actors.vllm_engine import VllmEngine\n"
        "from e3rl.config import ConfigError, VllmConfig\n"
        "from e3rl.models import hf_model_dir\n"
        "from tests.conftest import tiny_model_config\n"
        "try:\n"
        "    VllmEngine(hf_model_dir(tiny_model_config('qwen3'), seed=0), torch.float32, torch.device('cpu'),\n"
        "               VllmConfig(kv_cache_gib=0.25), max_model_len=256, logprobs_mode='processed_logprobs')\n"
        "except ConfigError as e:\n"
        "    print('CONFIG-ERROR', e)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    line = next((x for x in out.stdout.splitlines() if x.startswith("CONFIG-ERROR ")), "")
    assert re.match(r"CONFIG-ERROR gen.backend: vLLM cannot run this model on cpu \(.*head_dim.*\) — use gen.backend=hf",
                    line), out.stdout[-2000:] + out.stderr[-2000:]


def _perturbed(model, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v.clone()
           for k, v in model.state_dict().items()}
    new["lm_head.weight"] = new["model.embed_tokens.weight"]  # tied
    return new


def _send_perturbed(address, bucket_bytes: int) -> None:
    """A learner stand-in in its own process: the test model's perturbed weights, bucket by bucket."""
    from learner.sync_group import SyncGroup, plan_buckets
    from learner.weights import state_specs
    from e3rl.models import load_model
    from tests.conftest import tiny_model_config

    torch.set_num_threads(1)
    model = load_model(tiny_model_config("qwen3_hd64"), seed=0)
    model.load_state_dict(_perturbed(model))
    sd = model.state_dict()
    group = SyncGroup(address, 0, torch.device("cpu"))
    group.send(plan_buckets(state_specs(model), bucket_bytes), lambda b: {s.name: sd[s.name] for s in b.slots})


def test_weights_streamed_over_the_sync_group_reach_the_engine(vllm_engine, vllm_model, tokenizer):
    """The collective sync's vLLM end: buckets arrive from another process and go straight into
    the engine (reload on the stream, tied head added, prefix cache reset); its log-probs are then
    the HF model's with those weights."""
    import multiprocessing as mp
    import socket

    from learner.sync_group import GroupAddress, SyncGroup, plan_buckets
    from learner.weights import state_specs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = GroupAddress("127.0.0.1", port, 2, epoch=0, timeout_s=30.0)
    specs = state_specs(vllm_model)
    bucket = sum(torch.Size(sh).numel() * 4 for _, sh, _ in specs) // 10
    sender = mp.get_context("spawn").Process(target=_send_perturbed, args=(address, bucket))
    sender.start()
    g = VllmGenerator(vllm_engine, tokenizer, GenConfig(group_size=1, max_new_tokens=8, temperature=0),
                      HealConfig(segment_tokens=4), False, seed=0, eos=())
    original = {k: v.clone() for k, v in vllm_model.state_dict().items()}
    try:
        g.receive_weights(SyncGroup(address, 1, torch.device("cpu")).receive(plan_buckets(specs, bucket)), version=3)
        sender.join(timeout=60)
        assert sender.exitcode == 0 and g.policy_version == 3
        vllm_model.load_state_dict(_perturbed(vllm_model))
        prompt = tokenizer.encode(TEXTS[0])
        t = g.generate([prompt], [0])[0]
        with torch.no_grad():
            ref = vllm_model(torch.tensor([prompt + t.stream_ids.tolist()])).logits[0, len(prompt) - 1 : -1]
        ref = ref.log_softmax(-1).gather(1, t.stream_ids[:, None])[:, 0]
        assert torch.allclose(t.behavior_logp, ref, atol=LOGP_TOL, rtol=0)
    finally:
        if sender.is_alive():
            sender.kill()
        g.load_weights(original, version=0)
        vllm_model.load_state_dict(original)


def test_seeded_batches_larger_than_one_scheduler_step_run_on_cpu(vllm_engine):
    """More prompt tokens than one scheduler step takes (4096 by default): with chunked prefill
    vLLM splits a prompt across steps and then rewinds the request's seeded generator with
    `set_offset`, which CPU generators do not have ("CPU Generator does not use offset": the
    healing study's first 800-sample batch). Seeded requests still repeat exactly."""
    from actors.vllm_engine import Request

    reqs = [Request([(7 * i + j) % 500 + 10 for j in range(100)], 4, 1000 + i) for i in range(64)]  # 6400 tokens
    a = vllm_engine.generate(reqs, 1.0, 0, 1.0, set())
    b = vllm_engine.generate(reqs, 1.0, 0, 1.0, set())
    assert all(len(x.token_ids) == 4 for x in a)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]

"""The rewindable generator on tiny random-init HF models (CPU): equivalence, rewinds, budgets, accounting."""
from __future__ import annotations

import pytest
import torch

from actors.generator import RewindableGenerator
from e3rl.config import GenConfig, HealConfig
from e3rl.core.trajectory import stream_position_ids
from e3rl.models import load_model
from tests.conftest import tiny_model_config

TEXTS = ["Hello there, how are you today?", "1+1=", "The quick brown fox jumps over the lazy"]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode(t) for t in TEXTS]


def left_pad(prompts, rows_per_prompt, pad):
    """The batch HF generate sees: every prompt repeated G times, left-padded."""
    flat = [p for p in prompts for _ in range(rows_per_prompt)]
    width = max(map(len, flat))
    ids = torch.full((len(flat), width), pad, dtype=torch.long)
    mask = torch.zeros(len(flat), width, dtype=torch.long)
    for b, p in enumerate(flat):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    return ids, mask


def check_stream(t):
    """Invariants every trajectory must satisfy (the learner relies on them)."""
    assert torch.equal(t.position_ids, stream_position_ids(len(t.prompt_ids), t.erased_at))
    segs = t.segments
    assert int(segs.start[0]) == 0 and int(segs.end[-1]) == len(t.stream_ids)
    assert torch.equal(segs.start[1:], segs.end[:-1])  # attempts tile the stream in order
    for r in range(len(segs)):
        span = t.erased_at[int(segs.start[r]) : int(segs.end[r])]
        assert bool((span >= 0).all()) == bool(segs.erased[r])
    assert int(segs.erased.sum()) == t.rewinds
    assert not bool(segs.erased[-1])  # a row only ends on a kept attempt


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_greedy_matches_hf_generate(family, tokenizer, prompts):
    model = load_model(tiny_model_config(family), seed=1)
    gen = GenConfig(group_size=2, max_new_tokens=20, temperature=0.0)
    g = RewindableGenerator(model, tokenizer, gen, HealConfig(segment_tokens=6), heal_active=False, seed=0)
    trajs = g.generate(prompts, [0, 1, 2])
    ids, mask = left_pad(prompts, 2, tokenizer.pad_token_id)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=20,
                         eos_token_id=sorted(g.eos), pad_token_id=tokenizer.pad_token_id)
    assert len({tuple(t.stream_ids.tolist()) for t in trajs}) == 3  # different prompts, different text
    for b, t in enumerate(trajs):
        ours = t.stream_ids.tolist()
        assert out[b, ids.shape[1] :].tolist()[: len(ours)] == ours
        assert (t.group_id, t.sample_index) == (b // 2, b % 2)
        assert not bool(t.segments.erased.any()) and bool(torch.isfinite(t.segments.uncertainty).all())
        check_stream(t)


def test_logits_after_rewinds_and_compaction_match_fresh_forward(tiny_model, tokenizer, prompts):
    """Before every sampling, each row's logits equal a fresh forward over prompt + kept tokens."""
    gen = GenConfig(group_size=2, max_new_tokens=14, temperature=1.0)
    heal = HealConfig(segment_tokens=4, compact_fraction=0.1, max_erases_per_segment=2, max_erases_per_traj=3)
    g = RewindableGenerator(tiny_model, tokenizer, gen, heal, heal_active=True, seed=3)
    g.force_erase = lambda row, position: row.sample == 0 and position in (0, 2)  # rows 0, 2, 4 rewind
    checked = {"rewound": 0, "compacted": 0}

    def hook(rows, logits):
        for r, z in zip(rows, logits):
            seq = torch.tensor([r.prompt + r.kept_ids()])
            ref = tiny_model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1]
            torch.testing.assert_close(z, ref, atol=1e-4, rtol=0)
            checked["rewound"] += r.ledger.traj_erases > 0
            checked["compacted"] += r.compactions > 0 and r.ledger.traj_erases > 0

    g.sample_hook = hook
    trajs = g.generate(prompts, [0, 1, 2])
    assert checked["rewound"] > 10 and checked["compacted"] > 5
    assert [t.rewinds for t in trajs] == [3, 0, 3, 0, 3, 0]
    assert any(t.compactions > 0 for t in trajs) and g.stats["compactions"] > 0
    for t in trajs:
        check_stream(t)
        assert int(t.kept_mask.sum()) == 14


@pytest.mark.parametrize("mode", ["hook", "threshold"])
def test_budgets_bound_adversarial_erasing(tiny_model, tokenizer, prompts, mode):
    gen = GenConfig(group_size=3, max_new_tokens=12, temperature=1.0)
    heal = HealConfig(segment_tokens=3, max_erases_per_segment=2, max_erases_per_traj=5, threshold_k=-50.0,
                      min_peers=1)
    g = RewindableGenerator(tiny_model, tokenizer, gen, heal, heal_active=True, seed=0)
    if mode == "hook":
        g.force_erase = lambda row, position: True
    trajs = g.generate(prompts[:2], [0, 1])
    for t in trajs:
        check_stream(t)
        segs = t.segments
        assert t.rewinds <= 5 and int(segs.erase_count.max()) <= 2
        per_position = torch.bincount(segs.position[segs.erased], minlength=1)
        assert int(per_position.max()) <= 2
        assert t.finish_reason in ("length", "stream_cap", "eos")
        assert len(t.stream_ids) <= 24  # the stream cap (2 x max_new_tokens)
    assert sum(t.rewinds for t in trajs) >= 6 * 4


def test_forward_token_accounting_is_exact(tiny_model, tokenizer, prompts):
    """Tokens fed = non-padding prompt tokens + every sampled token fed back; compaction feeds none."""
    fed = []

    def count(module, args, kwargs, out):
        q = kwargs["input_ids"].shape[1]
        fed.append(int(kwargs["attention_mask"][:, -q:].sum()))

    gen = GenConfig(group_size=2, max_new_tokens=10, temperature=1.0, rows_per_forward=4)
    heal = HealConfig(segment_tokens=3, compact_fraction=0.1)
    g = RewindableGenerator(tiny_model, tokenizer, gen, heal, heal_active=True, seed=1)
    g.force_erase = lambda row, position: row.sample == 1
    handle = tiny_model.register_forward_hook(count, with_kwargs=True)
    try:
        trajs = g.generate(prompts, [0, 1, 2])
    finally:
        handle.remove()
    assert sum(fed) == sum(t.forward_tokens for t in trajs)
    assert sum(t.rewinds for t in trajs) > 0 and sum(t.compactions for t in trajs) > 0
    for t in trajs:
        # every sampled token is fed back once, except the row's last one and each token whose
        # sampling closed a segment that was then erased (it is erased before being fed)
        assert t.forward_tokens == len(t.prompt_ids) + len(t.stream_ids) - 1 - t.rewinds


def test_heal_off_records_segments_and_sampling_is_seeded(tiny_model, tokenizer, prompts):
    gen = GenConfig(group_size=2, max_new_tokens=16, temperature=0.8, top_k=50, top_p=0.9)
    make = lambda: RewindableGenerator(tiny_model, tokenizer, gen, HealConfig(segment_tokens=5), False, seed=7)
    a, b = make().generate(prompts, [0, 1, 2]), make().generate(prompts, [0, 1, 2])
    for x, y in zip(a, b):
        assert torch.equal(x.stream_ids, y.stream_ids) and torch.equal(x.behavior_logp, y.behavior_logp)
        check_stream(x)
        assert x.rewinds == 0 and len(x.segments) == 4 and not bool(x.segments.erased.any())
        assert bool(torch.isfinite(x.segments.uncertainty).all())
        assert bool((x.behavior_logp <= 0).all()) and bool((x.surprisal >= 0).all())


def test_delimiter_segments_end_after_newlines(tiny_model, tokenizer, prompts):
    nl = tokenizer.encode("\n")
    assert len(nl) == 1
    heal = HealConfig(segment_mode="delimiter", delimiter="newline", min_segment_tokens=1, max_segment_tokens=64)
    gen = GenConfig(group_size=2, max_new_tokens=40, temperature=1.0)
    g = RewindableGenerator(tiny_model, tokenizer, gen, heal, heal_active=True, seed=0)
    bias = torch.zeros(tiny_model.config.vocab_size)
    bias[nl[0]] = 9.0  # make newlines frequent in the random model's output
    handle = tiny_model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        trajs = g.generate(prompts, [0, 1, 2])
    finally:
        handle.remove()
    closed = 0
    for t in trajs:
        check_stream(t)
        segs = t.segments
        last = len(segs) - 1  # the final segment closes when the row ends, wherever that is
        for r in range(last):
            if not bool(segs.erased[r]):  # (an erased final attempt also ends where its row ended)
                end_text = tokenizer.decode([int(t.stream_ids[int(segs.end[r]) - 1])])
                assert "\n" in end_text or int(segs.end[r]) - int(segs.start[r]) == 64
                closed += 1
    assert closed >= 6


def test_stop_strings_end_rows(tiny_model, tokenizer, prompts):
    model_out = RewindableGenerator(tiny_model, tokenizer, GenConfig(group_size=1, max_new_tokens=12, temperature=0.0),
                                    HealConfig(), False, seed=0).generate(prompts[:1], [0])[0]
    stop = tokenizer.decode(model_out.stream_ids[4:6].tolist())
    gen = GenConfig(group_size=1, max_new_tokens=12, temperature=0.0, stop=(stop,))
    t = RewindableGenerator(tiny_model, tokenizer, gen, HealConfig(), False, seed=0).generate(prompts[:1], [0])[0]
    assert t.finish_reason == "stop" and stop in t.response_text and len(t.stream_ids) <= 6


def test_step_mode_carry_and_rewinds_see_the_right_context(tiny_model, tokenizer, prompts):
    """`Step k` headers are carried into the next segment; rewinds there resume from the right logits."""
    words = [" the", " cat", " sat", " on", " mat", ".", "\n", "Step", "1", ":"]
    script = [tokenizer.encode(w) for w in words]
    assert all(len(s) == 1 for s in script)
    succ = torch.zeros(tiny_model.config.vocab_size, dtype=torch.long)
    succ[:] = script[0][0]
    for a, b in zip(script, script[1:]):
        succ[a[0]] = b[0]
    fed = {}
    pre = tiny_model.register_forward_pre_hook(lambda m, a, k: fed.update(ids=k["input_ids"]), with_kwargs=True)
    # the random model follows a script (each token's successor gets +30), so every line is a `Step` header
    head = tiny_model.lm_head.register_forward_hook(
        lambda m, i, o: o + 30.0 * torch.nn.functional.one_hot(succ[fed["ids"][:, -o.shape[1]:]], o.shape[-1]))
    heal = HealConfig(segment_mode="delimiter", delimiter="step", min_segment_tokens=2, max_segment_tokens=64,
                      max_erases_per_segment=1, max_erases_per_traj=3)
    gen = GenConfig(group_size=2, max_new_tokens=30, temperature=1.0)
    g = RewindableGenerator(tiny_model, tokenizer, gen, heal, heal_active=True, seed=0)
    g.force_erase = lambda row, position: row.sample == 0 and position >= 1

    def check(rows, logits):
        for r, z in zip(rows, logits):
            seq = torch.tensor([r.prompt + r.kept_ids()])
            torch.testing.assert_close(z, tiny_model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1],
                                       atol=1e-4, rtol=0)

    g.sample_hook = check
    try:
        trajs = g.generate(prompts[:2], [0, 1])
    finally:
        pre.remove(), head.remove()
    step_id, nl_id = script[7][0], script[6][0]
    for t in trajs:
        check_stream(t)
        segs = t.segments
        kept = [r for r in range(len(segs)) if not bool(segs.erased[r])]
        for r in kept[1:]:  # every kept segment after the first starts with its carried header
            assert int(t.stream_ids[int(segs.start[r])]) == step_id
        for r in kept[:-1]:
            assert int(t.stream_ids[int(segs.end[r]) - 1]) == nl_id
    assert [t.rewinds for t in trajs] == [3, 0, 3, 0]

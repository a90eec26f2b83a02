"""The healing policy on its own: budgets, forced erasures, adversarial surprisal, trajectory invariants.

The behavioural tests run against every backend (`backend` fixture): a scripted engine that feeds
the policy per-token surprisal with no model, the HF generator on a tiny model, and the vLLM
generator (segment rounds on a real in-process engine). A new engine joins by adding a runner. A model backend cannot be fed scripted surprisal, so each scenario also
fixes the threshold so that any positive surprisal gets the same decision.
"""
from __future__ import annotations

import subprocess
import sys
from functools import partial
from typing import Callable, Optional

import pytest
import torch

from actors.healing import HealingPolicy, Rewind, TokenText
from e3rl.config import Config, GenConfig, HealConfig
from e3rl.core.threshold import UncertaintyHistory
from e3rl.core.trajectory import NEVER, stream_position_ids

NL, STEP, ONE = 1, 2, 3  # scripted token ids whose text matters


class FakeTokenizer:
    """Token id -> text, enough for segmentation and stop strings."""

    TEXT = {NL: "\n", STEP: "Step", ONE: " 1"}

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) -> str:
        return "".join(self.TEXT.get(i, f" w{i}") for i in ids)


def default_token(row, j: int) -> int:
    return 10 + (7 * row.sample + 3 * j) % 50


def default_surprisal(row, j: int) -> float:
    return 1.0 + ((131 * row.group + 31 * row.sample + 17 * j) % 23) / 10


def make_policy(gen, heal, history=UncertaintyHistory(), force_erase=None, active=True) -> HealingPolicy:
    return HealingPolicy(gen, heal, active, history, Config(gen=gen).stream_cap, eos=(),
                         text=TokenText(FakeTokenizer()), force_erase=force_erase)


def drive(policy, rows, token=default_token, surprisal=default_surprisal, log: Optional[list] = None) -> None:
    """A model-free engine: each round every live row samples; a rewound row samples again at once
    from its segment start (as the HF engine does), then finished rows leave."""
    nxt = {id(r): len(r.prompt) for r in rows}  # next logical position
    live = list(rows)
    while live:
        need = live
        while need:
            s = [surprisal(r, len(r.stream)) for r in need]
            decisions = policy.push(need, [token(r, len(r.stream)) for r in need], [-x for x in s], s,
                                    [nxt[id(r)] for r in need])
            for r, d in zip(need, decisions):
                nxt[id(r)] = d.rewind.position if d.rewind else nxt[id(r)] + 1
                if log is not None:
                    log.append((r, d))
            need = [r for r, d in zip(need, decisions) if d.rewind]
        live = [r for r in live if not r.finish]


# ------------------------------------------------------------------ backends
def run_scripted(gen, heal, history=UncertaintyHistory(), force_erase=None, surprisal: Callable = default_surprisal,
                 groups: int = 2) -> list:
    policy = make_policy(gen, heal, history, force_erase)
    rows = policy.rows([[5] * (3 + g) for g in range(groups)], list(range(groups)))
    drive(policy, rows, surprisal=surprisal)
    return [policy.trajectory(r, 0) for r in rows]


def run_model(make, tokenizer, gen, heal, history=UncertaintyHistory(), force_erase=None, surprisal=None,
              groups: int = 2) -> list:
    """A model engine built by `make(gen, heal)`; `surprisal` is the model's own here."""
    g = make(gen, heal)
    g.history, g.force_erase = history, force_erase
    texts = ["Hello there, how are you today?", "1+1=", "The quick brown fox"][:groups]
    return g.generate([tokenizer.encode(t) for t in texts], list(range(groups)))


@pytest.fixture(params=["scripted", "hf", "vllm"])
def backend(request):
    if request.param == "scripted":
        return run_scripted
    tok = request.getfixturevalue("tokenizer")
    if request.param == "vllm":
        from actors.vllm_generator import VllmGenerator

        engine = request.getfixturevalue("vllm_engine")
        return partial(run_model, lambda gen, heal: VllmGenerator(engine, tok, gen, heal, True, seed=0, eos=()), tok)
    from actors.generator import RewindableGenerator

    model = request.getfixturevalue("tiny_model")
    return partial(run_model, lambda gen, heal: RewindableGenerator(model, tok, gen, heal, True, seed=0,
                                                                    eos_token_ids=()), tok)


def check_invariants(t, gen: GenConfig) -> None:
    """What the learner relies on, from the segment table alone."""
    segs, n = t.segments, len(t.stream_ids)
    start, end, pos, erased = segs.start.tolist(), segs.end.tolist(), segs.position.tolist(), segs.erased.tolist()
    assert start[0] == 0 and end[-1] == n and start[1:] == end[:-1]  # attempts tile the stream in order
    assert [p for p, e in zip(pos, erased) if not e] == list(range(erased.count(False)))  # kept: 0..K-1
    assert not erased[-1] and sum(erased) == t.rewinds
    expected = []
    for r in range(len(segs)):
        expected += [end[r] if erased[r] else NEVER] * (end[r] - start[r])
        assert int(segs.erase_count[r]) == sum(erased[q] and pos[q] == pos[r] for q in range(r))
        if erased[r]:  # its replacement follows at once, at the same logical position
            assert pos[r + 1] == pos[r]
            assert int(t.position_ids[start[r + 1]]) == int(t.position_ids[start[r]])
    assert t.erased_at.tolist() == expected
    assert torch.equal(t.position_ids, stream_position_ids(len(t.prompt_ids), t.erased_at))
    assert int(t.kept_mask.sum()) <= gen.max_new_tokens and n <= Config(gen=gen).stream_cap


# ------------------------------------------------------------------ every backend
def test_budgets_cap_erasures_per_segment_and_per_trajectory(backend):
    gen = GenConfig(group_size=2, max_new_tokens=12, max_stream_tokens=100)
    heal = HealConfig(segment_tokens=3, max_erases_per_segment=2, max_erases_per_traj=5)
    for t in backend(gen, heal, force_erase=lambda row, position: True):
        check_invariants(t, gen)
        segs = t.segments
        assert torch.bincount(segs.position[segs.erased], minlength=4).tolist() == [2, 2, 1, 0]
        assert t.rewinds == 5 and t.finish_reason == "length" and int(t.kept_mask.sum()) == 12


def test_a_forced_erasure_rewinds_to_the_segment_start(backend):
    gen = GenConfig(group_size=2, max_new_tokens=12)
    heal = HealConfig(segment_tokens=3, max_erases_per_segment=1)
    trajs = backend(gen, heal, force_erase=lambda row, position: row.sample == 0 and position == 1)
    for t in trajs:
        check_invariants(t, gen)
        segs = t.segments
        if t.sample_index == 1:
            assert t.rewinds == 0
            continue
        assert segs.erased.tolist() == [False, True, False, False, False]
        assert segs.start.tolist() == [0, 3, 6, 9, 12] and segs.position.tolist() == [0, 1, 1, 2, 3]
        p = len(t.prompt_ids)
        assert t.position_ids[:9].tolist() == [p, p + 1, p + 2, p + 3, p + 4, p + 5, p + 3, p + 4, p + 5]
        assert t.erased_at[3:6].tolist() == [6, 6, 6]


def test_adversarial_surprisal_ends_at_the_stream_cap(backend):
    """Every segment is a defect (huge surprisal, a history that puts tau at 0, no penalty growth)
    and the budgets are unlimited: only the stream cap ends a row, where its segment is frozen."""
    gen = GenConfig(group_size=2, max_new_tokens=12)  # stream cap 24
    heal = HealConfig(segment_tokens=3, max_erases_per_segment=1000, max_erases_per_traj=1000, threshold_k=0.0,
                      penalty_scale=0.0, min_peers=99)
    history = UncertaintyHistory(mean=0.0, var=1.0, count=100)
    for t in backend(gen, heal, history=history, surprisal=lambda row, j: 1e4):
        check_invariants(t, gen)
        assert t.finish_reason == "stream_cap" and len(t.stream_ids) == 24 and t.rewinds == 7
        assert int(t.kept_mask.sum()) == 3 and t.segments.threshold[-1].isnan()  # frozen, not judged


def test_invariants_under_real_thresholds_and_forcing(backend):
    gen = GenConfig(group_size=3, max_new_tokens=15)
    heal = HealConfig(segment_tokens=4, max_erases_per_segment=2, max_erases_per_traj=4, threshold_k=0.0)
    real = backend(gen, heal, groups=2)
    forced = backend(gen, heal, groups=2, force_erase=lambda row, position: (row.sample + position) % 3 == 0)
    for t in real + forced:
        check_invariants(t, gen)
    assert sum(t.rewinds for t in forced) >= 6


# ------------------------------------------------------------------ the policy alone
def test_the_policy_imports_no_engine():
    """Decisions must stay reusable by every engine: no model code, cache, Ray or vLLM behind them."""
    code = ("import sys, actors.healing\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'ray', 'vllm')"
            " or m in ('actors.kv_rewind', 'actors.generator')]\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_push_asks_the_engine_to_rewind_to_the_segment_start():
    gen, heal = GenConfig(group_size=1, max_new_tokens=9), HealConfig(segment_tokens=3)
    policy = make_policy(gen, heal, force_erase=lambda row, position: position == 1 and row.ledger.segment_erases == 0)
    (row,) = policy.rows([[5, 6]], [0])
    push = lambda j, pos: policy.push([row], [20 + j], [-1.0], [1.0], [pos])[0]
    assert push(0, 2).opened and not push(1, 3).opened
    assert push(2, 4).rewind is None  # position 0 kept
    assert push(3, 5).opened and push(4, 6).rewind is None
    d = push(5, 7)
    assert d.rewind == Rewind(start=3, position=5) and row.finish == "" and row.stream.kept == 3
    assert push(6, 5).opened  # the engine resumes at the segment start's position
    assert [push(7, 6).rewind, push(8, 7).rewind] == [None, None] and row.finish == ""
    for j in range(9, 12):
        push(j, j - 1)
    assert row.finish == "length" and row.kept_ids() == [20, 21, 22, 26, 27, 28, 29, 30, 31]


def test_nan_surprisal_never_erases_and_inf_erases_while_budget_lasts():
    gen = GenConfig(group_size=2, max_new_tokens=9)
    heal = HealConfig(segment_tokens=3, max_erases_per_segment=2, max_erases_per_traj=3, min_peers=99)
    history = UncertaintyHistory(mean=1.0, var=1.0, count=10)
    nan = run_scripted(gen, heal, history, surprisal=lambda row, j: float("nan"))
    inf = run_scripted(gen, heal, history, surprisal=lambda row, j: float("inf"))
    assert all(t.rewinds == 0 for t in nan) and all(t.rewinds == 3 for t in inf)
    for t in nan + inf:
        check_invariants(t, gen)


def test_inactive_policy_scores_segments_but_never_erases():
    gen, heal = GenConfig(group_size=2, max_new_tokens=9), HealConfig(segment_tokens=3)
    policy = make_policy(gen, heal, force_erase=lambda row, position: True, active=False)
    rows = policy.rows([[5, 6]], [0])
    drive(policy, rows)
    for t in (policy.trajectory(r, 0) for r in rows):
        check_invariants(t, gen)
        assert t.rewinds == 0 and len(t.segments) == 3 and torch.isfinite(t.segments.uncertainty).all()
        assert torch.isnan(t.segments.threshold).all()  # never judged


def test_delimiter_segments_close_after_newlines():
    gen = GenConfig(group_size=2, max_new_tokens=20)
    heal = HealConfig(segment_mode="delimiter", delimiter="newline", min_segment_tokens=2, max_segment_tokens=6,
                      max_erases_per_segment=1)
    policy = make_policy(gen, heal, force_erase=lambda row, position: row.sample == 0 and position == 1)
    rows = policy.rows([[5, 6]], [0])
    drive(policy, rows, token=lambda row, j: NL if j % 4 == 3 else 10 + j)
    for t in (policy.trajectory(r, 0) for r in rows):
        check_invariants(t, gen)
        segs = t.segments
        for r in range(len(segs) - 1):
            assert int(t.stream_ids[int(segs.end[r]) - 1]) == NL  # every closed segment ends on a newline
    assert [policy.trajectory(r, 0).rewinds for r in rows] == [1, 0]


def test_a_step_header_is_carried_and_its_segment_resumes_at_the_header():
    """`Step 1` is only recognised at its digit: the header's tokens open the next segment, and an
    erasure of that segment rewinds to the header (the engine kept the line start's distribution)."""
    gen = GenConfig(group_size=1, max_new_tokens=40)
    heal = HealConfig(segment_mode="delimiter", delimiter="step", min_segment_tokens=2, max_segment_tokens=64,
                      max_erases_per_segment=1)
    policy = make_policy(gen, heal, force_erase=lambda row, position: position == 1)
    (row,) = policy.rows([[5]], [0])
    line = [11, 12, NL, STEP, ONE, 13, 14, NL]  # " w11 w12\nStep 1 w13 w14\n"
    log = []
    drive(policy, [row], token=lambda r, j: line[r.stream.kept % len(line)], log=log)
    first = [d for _, d in log if d.carried is not None][0]
    assert first.carried == 3 and row.stream.ids[3] == STEP  # the carry opens at the header
    assert sum(d.line_start for _, d in log) >= 4  # every token after a newline is a possible carry start
    t = policy.trajectory(row, 0)
    check_invariants(t, gen)
    segs = t.segments
    erased = segs.erased.tolist().index(True)
    assert int(segs.position[erased]) == 1 and int(segs.start[erased]) == 3
    assert int(t.stream_ids[int(segs.start[erased + 1])]) == STEP  # the replacement starts at a header again
    assert [d.rewind for _, d in log if d.rewind] == [Rewind(start=3, position=4)]

"""The rehearsal's stand-ins: a tokenizer with Qwen3's layout (`<|im_end|>` ends a turn,
`<|endoftext|>` is the pad token and also an EOS id), a tiny model whose EOS rate is calibrated so
a set share of responses reaches the cap (checked against transformers' own sampler), an EOS that
stays in the learner's loss mask when it is the pad id, and data files the real loaders read in the
real schemas."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.generator import RewindableGenerator
from e3rl.config import Config, DataConfig, GenConfig, HealConfig
from e3rl.data import render_prompt, resolve_reward_thinking
from e3rl.models import eos_token_ids, saved_generation_config
from e3rl.rehearsal.plan import KNOWN_ARCHITECTURES, StandIns, tiny_architecture
from e3rl.rehearsal.standins import stand_in_rows, write_data, write_model
from e3rl.tasks.base import Problem
from e3rl.tasks.math_data import load_math
from learner.stream_batch import collate

CAP = 48
SURVIVE = 0.25


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    d = tmp_path_factory.mktemp("standin")
    s = StandIns(model_dir=d / "qwen3-4b-tiny", arch=tiny_architecture(KNOWN_ARCHITECTURES["qwen3-4b"]),
                 eos_tokens=CAP, eos_survive=SURVIVE)
    write_model(s)
    return s


def _prompts(tok, n: int, thinking: bool = True) -> list[list[int]]:
    cfg = Config(data=DataConfig(chat_template_kwargs={"enable_thinking": thinking}))
    rows = stand_in_rows("deepmath", n, seed=7)
    probs = [Problem(uid=str(i), prompt=r["question"], answer=r["final_answer"], source="t") for i, r in enumerate(rows)]
    return [tok(render_prompt(cfg, p, tok), add_special_tokens=False)["input_ids"] for p in probs]


def test_tokenizer_has_qwen3s_layout(stand_in):
    tok = AutoTokenizer.from_pretrained(stand_in.model_dir)
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert (tok.eos_token_id, tok.pad_token_id) == (im_end, eot)
    assert eos_token_ids(tok, saved_generation_config(stand_in.model_dir)) == sorted([im_end, eot])
    think = tok("<think>\nso 2</think>\n\\boxed{2}", add_special_tokens=False)["input_ids"]
    assert tok.decode(think, skip_special_tokens=True) == "<think>\nso 2</think>\n\\boxed{2}"
    on, off = (Config(data=DataConfig(chat_template_kwargs={"enable_thinking": t})) for t in (True, False))
    assert resolve_reward_thinking(on, tok).reward.thinking == "required"
    assert resolve_reward_thinking(off, tok).reward.thinking == "none"


def test_eos_calibration_holds_under_transformers_sampling(stand_in):
    """The share of responses that reach the cap without an end token, sampled by HF `generate` at
    T = 1 from the rehearsal's own prompts (not the calibration prompt)."""
    tok = AutoTokenizer.from_pretrained(stand_in.model_dir)
    model = AutoModelForCausalLM.from_pretrained(stand_in.model_dir).eval()
    ends = eos_token_ids(tok, model.generation_config)
    torch.manual_seed(0)
    survived, n = 0, 0
    for prompt in _prompts(tok, 8):
        ids = torch.tensor([prompt] * 32)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=CAP,
                             eos_token_id=ends, pad_token_id=tok.pad_token_id, top_k=None, top_p=None)
        resp = out[:, ids.shape[1]:]
        survived += sum(not any(t in ends for t in r) for r in resp.tolist())
        n += resp.shape[0]
    share = survived / n
    print(f"share reaching the cap: {share:.3f} of {n}")
    # binomial SEs of this sample and of the calibration's 8 prompts x 8 rows (their survival is ~0 or ~1)
    se = math.sqrt(SURVIVE * (1 - SURVIVE) * (1 / n + 1 / 64))
    assert abs(share - SURVIVE) < 3 * se, f"{share:.3f} of {n} responses reached the cap (target {SURVIVE})"
    assert 0 < share < 1


def test_a_pad_id_eos_stays_in_the_loss_mask(stand_in):
    """Qwen3's `<|endoftext|>` is both the pad id and an EOS id: a response that ends with it must
    keep it as its last stream token, in the learner's loss mask, finished by `eos`."""
    tok = AutoTokenizer.from_pretrained(stand_in.model_dir)
    model = AutoModelForCausalLM.from_pretrained(stand_in.model_dir).eval()
    im_end, pad = tok.eos_token_id, tok.pad_token_id
    with torch.no_grad():  # make the pad id as likely an ending as <|im_end|>
        head = model.get_output_embeddings().weight
        head[pad].copy_(head[im_end])
    g = RewindableGenerator(model, tok, GenConfig(group_size=8, max_new_tokens=CAP, temperature=1.0),
                            HealConfig(segment_tokens=8), heal_active=True, seed=0)
    prompts = _prompts(tok, 4)
    trajs = g.generate([p for p in prompts for _ in range(8)], [i for i in range(4) for _ in range(8)])
    ended = {int(t.stream_ids[-1]): t for t in trajs if t.finish_reason == "eos"}
    assert {im_end, pad} <= set(ended), f"endings seen: {sorted(ended)}"
    batch = collate(trajs, pad_id=pad)
    for i, t in enumerate(trajs):
        last = int(batch.stream_len[i]) - 1
        if t.finish_reason == "eos":
            assert int(batch.stream_ids[i, last]) in (im_end, pad) and bool(t.kept_mask[-1])
            assert batch.mask[i, last] == 1.0, f"the EOS of sample {i} is not trained on"
        assert batch.mask[i, last + 1:].sum() == 0


@pytest.mark.parametrize("schema,fmt", [("deepmath", "deepmath"), ("aime2024", "aime"), ("aime2025", "aime"),
                                        ("math500", "math500")])
def test_stand_in_data_loads_through_the_real_loaders(schema, fmt, tmp_path):
    ext = "parquet" if schema == "deepmath" else "jsonl"
    path = write_data(tmp_path / f"{schema}.{ext}", schema, 8)
    problems, stats = load_math(str(path), format=None, n=None, seed=0)
    assert stats.kept == 8 and all(p.answer for p in problems)
    assert {p.meta["format"] for p in problems} == {fmt}


def test_the_rehearsal_coin_stands_in_for_the_verifier_and_the_verdict_is_kept():
    """Under `reward.rehearsal` the coin is the outcome every consumer sees (rewards, advantages,
    dynamic sampling), reproducible and mixed within a group; the verifier's verdict rides along."""
    from e3rl.config import RewardConfig
    from e3rl.rewards import score_response, score_stats

    cfg = RewardConfig(rehearsal=True, thinking="none")
    problem = Problem(uid="p0", prompt="What is 2 + 3?", answer="5", source="t")
    responses = [f"attempt {i}: \\boxed{{{5 if i % 4 == 0 else i + 10}}}" for i in range(32)]
    scores = [score_response(cfg, r, problem) for r in responses]
    assert scores == [score_response(cfg, r, problem) for r in responses]  # reproducible
    assert {s.reward for s in scores} == {0.0, 1.0} and all(s.correct == (s.reward == 1.0) for s in scores)
    assert [s.verdict for s in scores] == [i % 4 == 0 for i in range(32)]
    stats = score_stats(scores)
    assert stats["reward/verified_accuracy"] == 0.25
    assert stats["reward/accuracy"] == sum(s.correct for s in scores) / 32
    plain = score_response(RewardConfig(thinking="none"), responses[0], problem)
    assert (plain.correct, plain.verdict) == (True, None) and "reward/verified_accuracy" not in score_stats([plain])

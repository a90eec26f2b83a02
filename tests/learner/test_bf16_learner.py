"""bf16 mixed precision on two real ZeRO-3 ranks against the same learner in fp32, from the same
weights and batch: fp32 master copies that start exact and are what gets published, log-probs
close to fp32, an update pointing the same way, and bit-exact resume within bf16.
"""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from e3rl.bench.learner import fill_behavior_logp, synthetic_trajectories
from e3rl.config import AlgoConfig, Config, GenConfig, LearnerConfig, ModelConfig, ResourcesConfig
from e3rl.models import load_model
from learner.stream_batch import collate, stream_logprobs
from tests.conftest import tiny_model_config

# bf16 keeps 8 mantissa bits (relative error 2^-9 per rounding). Measured on these ~140 tokens, whose
# log-probs average -12.2: |bf16 - fp32| max 0.109, mean 0.018. Bounds: about 2x the measured values.
LOGP_MAX, LOGP_MEAN = 0.25, 0.04
COSINE = 0.99


def _cfg(dtype: str) -> Config:
    return Config(
        model=ModelConfig(path="random", random_init=tiny_model_config().random_init, init_std=0.2, device="cpu",
                          tokenizer="builtin:smollm2-135m-instruct"),
        learner=LearnerConfig(num_workers=2, lr=1e-3, micro_batch_size=2, grad_clip=1.0, dtype=dtype),
        algo=AlgoConfig(prompts_per_step=2, allocation="attention", answer_tokens=4),
        gen=GenConfig(group_size=4), resources=ResourcesConfig(cpus_per_learner=0.5),
    ).validate()


@pytest.fixture(scope="module")
def pair(ray_session, tmp_path_factory):
    from learner.group import LearnerGroup

    init = {k: v.clone() for k, v in load_model(tiny_model_config(), seed=0).state_dict().items()}
    trajs = synthetic_trajectories(2, 4, prompt_len=5, seg_len=5, n_segments=3, vocab=49152, seed=5)
    fill_behavior_logp(trajs, load_model(tiny_model_config(), seed=0), 1.0, noise=0.1)
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path_factory.mktemp("ext"))}
    groups = {d: LearnerGroup(_cfg(d), init_state=init, extra_env=env) for d in ("bfloat16", "float32")}
    yield SimpleNamespace(init=init, trajs=trajs, **{d[:4]: g for d, g in groups.items()})
    for g in groups.values():
        g.shutdown()


def test_masters_start_exact_and_logprobs_are_close(pair):
    published = pair.bflo.state_dict()  # the fp32 masters, not the module's bf16 copies
    assert all(published[k].dtype == torch.float32 and torch.equal(published[k], pair.init[k]) for k in pair.init)
    batch = collate(pair.trajs, pad_id=int(pair.trajs[0].stream_ids[0]))
    bf, fp = (stream_logprobs(g.forward_logits(pair.trajs), batch, 1.0) for g in (pair.bflo, pair.floa))
    diff = (bf - fp).abs()[batch.mask.bool()]
    assert 0 < float(diff.max()) < LOGP_MAX and float(diff.mean()) < LOGP_MEAN  # bf16 really ran, and stayed close


def test_one_update_points_the_same_way_in_bf16_and_fp32(pair):
    deltas = {}
    for name, group in (("bf16", pair.bflo), ("fp32", pair.floa)):
        m = group.train_step(pair.trajs)
        assert m["learner/skipped"] == 0
        after = group.state_dict()
        deltas[name] = torch.cat([(after[k] - pair.init[k]).flatten() for k in sorted(pair.init)])
    a, b = deltas["bf16"], deltas["fp32"]
    cosine = float(a @ b / (a.norm() * b.norm()))
    assert float(a.norm()) > 0 and cosine >= COSINE, cosine  # measured 0.9947 (AdamW's first step)


def test_resume_is_bit_exact_in_bf16(pair, tmp_path):
    g = pair.bflo
    g.save_checkpoint(str(tmp_path / "ckpt"), step=1)
    first = [g.train_step(pair.trajs)["learner/loss"] for _ in range(2)]
    after = g.state_dict()
    g.load_checkpoint(str(tmp_path / "ckpt"))
    again = [g.train_step(pair.trajs)["learner/loss"] for _ in range(2)]
    assert again == first
    assert all(torch.equal(after[k], v) for k, v in g.state_dict().items())
    assert not any(math.isnan(x) for x in first)

"""PPO-style updates on two real ZeRO-3 ranks against plain torch: a no-grad pass freezes pi_old and
the segment advantages (attention allocation included), then 2 epochs x 2 mini-batches of AdamW
steps on streams with erased segments, one truncated sample masked out (DAPO overlong filtering). The ratio moves off 1 after the first step, so the clip
acts, and a different clip range gives a different update from then on (never before).
"""
import dataclasses
from types import SimpleNamespace

import pytest
from e3rl.bench.learner import fill_behavior_logp, synthetic_trajectories
from e3rl.config import Config
from e3rl.models import load_model
from learner.updates import plan_updates
from tests.conftest import tiny_model_config
from tests.learner.learner_reference import fp32_learner_config, make_adamw, reference_ppo_step, save_tiny_model
from tests.learner.test_zero3_group import _assert_state_close, _hf

CLIP = 0.02  # tight: the lr 1e-3 steps move token ratios by more than this
WIDE = 10.0  # never binds


@pytest.fixture(scope="module")
def ppo(ray_session, tmp_path_factory, tokenizer):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("tiny_hf_ppo"), tokenizer)
    cfg = fp32_learner_config(model_dir, mini_batch_prompts=1, epochs=2, clip_low=CLIP, clip_high=CLIP, tis_cap=1.2,
                              overlong_filter=True)
    from learner.group import LearnerGroup

    group = LearnerGroup(cfg, extra_env={"TORCH_EXTENSIONS_DIR": str(tmp_path_factory.mktemp("ext"))})
    # 7 sequences (groups of 4 and 3): the ranks' shards and mini-batches are uneven.
    trajs = synthetic_trajectories(2, 4, prompt_len=5, seg_len=5, n_segments=3, vocab=49152, seed=11)[:7]
    assert any(t.segments.erased.any() for t in trajs)  # the stream loss covers erased attempts
    trajs[2].finish_reason = "length"  # overlong filtering: no loss, but still in its group's advantage
    fill_behavior_logp(trajs, load_model(tiny_model_config(), seed=0), cfg.gen.temperature, noise=0.3)
    metrics = group.train_step(trajs)
    yield SimpleNamespace(cfg=cfg, state=group.state_dict(), metrics=metrics, trajs=trajs, model_dir=model_dir)
    group.shutdown()


def _mini_batches(cfg: Config, trajs) -> list[list[int]]:
    """The global mini-batches of the learner's plan: the union of both ranks' micro-batches."""
    lengths = [t.prompt_ids.numel() + t.stream_ids.numel() for t in trajs]  # as the learner plans
    seed = cfg.run.seed * 1_000_003  # policy version 0, nothing skipped
    plans = [plan_updates(lengths, lengths, 2, r, cfg.learner.micro_batch_size, cfg.mini_batches, cfg.algo.epochs, seed)
             for r in range(2)]
    return [sorted(i for p in plans for mb in p[u].micro for i in mb) for u in range(len(plans[0]))]


def _reference(ppo, clip: float, steps: int | None = None) -> dict:
    cfg = dataclasses.replace(ppo.cfg, algo=dataclasses.replace(ppo.cfg.algo, clip_low=clip, clip_high=clip))
    model = _hf(ppo.model_dir, attn="eager")  # eager: the reference reads output_attentions
    mbs = _mini_batches(ppo.cfg, ppo.trajs)[:steps]
    reference_ppo_step(model, make_adamw(model, cfg), ppo.trajs, cfg, mbs)
    return model.state_dict()


def test_mini_batch_epochs_match_plain_torch(ppo):
    mbs = _mini_batches(ppo.cfg, ppo.trajs)
    assert len(mbs) == 4 and sorted(mbs[0] + mbs[1]) == sorted(mbs[2] + mbs[3]) == list(range(7))
    assert mbs[:2] != mbs[2:]  # each epoch reshuffles
    _assert_state_close(ppo.state, _reference(ppo, CLIP))
    m = ppo.metrics
    assert m["learner/updates"] == 4 and m["learner/version"] == 4 and m["learner/skipped"] == 0
    assert m["learner/clip_frac"] > 0 and m["learner/approx_kl"] > 0  # the ratio moved and was clipped
    assert m["learner/freeze_s"] > 0


def test_clip_range_changes_the_update_only_once_the_ratio_moves(ppo):
    first_tight, first_wide = _reference(ppo, CLIP, steps=1), _reference(ppo, WIDE, steps=1)
    _assert_state_close(first_tight, first_wide, atol=0.0, mean_atol=0.0, outliers=0)  # ratio exactly 1: the clip is inert
    tight, loose = _reference(ppo, CLIP, steps=2), _reference(ppo, WIDE, steps=2)
    diff = max(float((tight[k] - loose[k]).abs().max()) for k in tight)
    assert diff > 1e-4  # step 2 sees ratios off 1: the clip range changes the weights
    unclipped = _reference(ppo, WIDE)
    assert max(float((ppo.state[k] - unclipped[k]).abs().max()) for k in unclipped) > 1e-4  # the learner clipped

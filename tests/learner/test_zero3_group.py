"""Two ZeRO-3 workers in Ray (real DeepSpeed, gloo) against a plain-torch reference; weight
publication and HF export against the learner's own logits; checkpoints that resume exactly.

One group for the module (DeepSpeed init + actor start is the expensive part); the tests run in
file order and the first one must see the group's first optimizer step.
"""
import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from e3rl.bench.learner import fill_behavior_logp, synthetic_trajectories
from e3rl.config import ResourcesConfig
from e3rl.models import load_model
from learner import checkpoint as ckpt
from learner.stream_batch import StreamPolicy, collate, policy_forward
from learner.weights import ObjectStoreWeightSync, load_weights
from tests.conftest import tiny_model_config
from tests.learner.learner_reference import fp32_learner_config, make_adamw, reference_step, save_tiny_model

ATOL = 1e-5  # losses and logits, fp32 (measured: loss ~5e-8, grad norm rel ~1e-5)
# Weights after AdamW steps (lr 1e-3): Adam divides by sqrt(v) + 1e-8, so for the rare elements
# whose gradient is ~1e-8 the reduction-order noise of micro-batching and the gloo reduce-scatter
# (~1e-10) moves the update by a visible fraction of lr. Measured over 4 steps with behaviour
# log-probs as pi_old: max 1.35e-5 on <= 35 of 3.2M elements; with pi_old = sg(pi) and TIS: one
# element of 3.2M at 1.15e-4 (0.11 lr), mean 1e-9. So: every element within W_MAX except at most
# W_OUTLIERS, and those within 0.25 lr (a wrong gradient moves elements by ~lr: far outside); the
# mean <= 1e-8 catches any systematic difference.
W_MAX, W_MEAN, W_OUTLIERS, W_OUTLIER_MAX = 2e-5, 1e-8, 4, 2.5e-4


def _assert_state_close(a: dict, b: dict, atol: float = W_MAX, mean_atol: float = W_MEAN,
                        outliers: int = W_OUTLIERS) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    beyond = sum(int(((a[k] - b[k]).abs() > atol).sum()) for k in a)
    mean = sum(float((a[k] - b[k]).abs().sum()) for k in a) / sum(a[k].numel() for k in a)
    assert beyond <= outliers and worst <= max(atol, W_OUTLIER_MAX if outliers else atol) and mean <= mean_atol, \
        (worst, beyond, mean)


@pytest.fixture(scope="module")
def env(ray_session, tmp_path_factory, tokenizer):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("tiny_hf"), tokenizer)
    cfg = fp32_learner_config(model_dir, kl_coef=0.05, tis_cap=1.2)
    ext = tmp_path_factory.mktemp("torch_extensions")
    from learner.group import LearnerGroup

    group = LearnerGroup(cfg, extra_env={"TORCH_EXTENSIONS_DIR": str(ext)})
    trajs = synthetic_trajectories(2, 4, prompt_len=5, seg_len=5, n_segments=3, vocab=49152, seed=7)
    fill_behavior_logp(trajs, load_model(tiny_model_config(), seed=0), cfg.gen.temperature, noise=0.3)
    yield SimpleNamespace(cfg=cfg, group=group, model_dir=model_dir, ext=ext, trajs=trajs)
    group.shutdown()


def _hf(path, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


def test_two_zero3_workers_match_plain_torch(env):
    ref = _hf(env.model_dir, attn="eager")  # eager: the reference reads output_attentions
    _assert_state_close(env.group.state_dict(), ref.state_dict(), atol=0.0, outliers=0)  # ZeRO-3 loaded the real weights
    frozen, opt = _hf(env.model_dir), make_adamw(ref, env.cfg)  # k3 KL to the initial policy
    steps = []
    # Step 1: 8 sequences = 2 ranks x 2 micro-batches of 2. Step 2: 5 sequences (groups of 3 and 2):
    # uneven shards, rank 1 runs a zero-weight dummy micro-batch; KL > 0 and Adam state now matter.
    for batch in (env.trajs, env.trajs[1:6]):
        m = env.group.train_step(batch)
        steps.append(m)
        r = reference_step(ref, opt, batch, env.cfg, frozen)  # one full-batch step
        assert abs(m["learner/loss"] - r["loss"]) < ATOL
        assert m["learner/grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4) and r["grad_norm"] > 1.0  # clipped
        _assert_state_close(env.group.state_dict(), ref.state_dict())
    assert m["learner/ref_kl"] > 0
    assert m["learner/skipped"] == 0 and m["learner/version"] == 2 and m["learner/seqs"] == 5
    assert steps[0]["learner/tokens"] == sum(t.stream_ids.numel() for t in env.trajs)
    first = steps[0]  # behaviour = initial policy + N(0, 0.3) noise: E|noise| = 0.24
    assert 0.15 < first["learner/logp_diff_mean"] < 0.35 and first["learner/logp_diff_max"] > 0.5
    # One optimizer step per batch: pi_old is the step's own forward, so the ratio is exactly 1 and
    # nothing is clipped; the behaviour noise acts only through TIS, min(pi_old / pi_gen, 1.2).
    assert m["learner/clip_frac"] == 0 and m["learner/approx_kl"] == 0 and m["learner/entropy"] > 0
    assert 0.9 < first["learner/tis_weight_mean"] < 1.05 and first["learner/tis_weight_mean"] != 1.0  # E = 0.976


def test_nonfinite_loss_skips_the_step(env):
    version = env.group.train_step(env.trajs)["learner/version"]
    before = env.group.state_dict()
    bad = copy.deepcopy(env.trajs)
    bad[5].behavior_logp[2] = float("nan")  # reaches the loss through the TIS weight
    m = env.group.train_step(bad)
    assert m["learner/skipped"] == 1 and m["learner/nonfinite_loss"] >= 1 and m["learner/version"] == version
    _assert_state_close(env.group.state_dict(), before, atol=0.0, outliers=0)
    assert env.group.train_step(env.trajs)["learner/skipped"] == 0


def test_published_and_exported_weights_reproduce_learner_logits(env, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    learner_logits = env.group.forward_logits(env.trajs)  # [B, S, V], the ZeRO-3 model's own
    batch = collate(env.trajs, pad_id=int(env.trajs[0].stream_ids[0]))
    handle = env.group.publish_weights()
    assert handle.num_bytes > 0 and handle.version >= 1
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(env.model_dir), dtype=torch.float32).eval()
    assert load_weights(fresh, ObjectStoreWeightSync(), handle) == handle.version
    published, ref = dict(ObjectStoreWeightSync().fetch(handle).items()), env.group.state_dict()
    assert set(published) <= set(ref) and all(torch.equal(t, ref[n]) for n, t in published.items())
    exported = _hf(env.group.export_hf(str(tmp_path / "hf")))
    AutoTokenizer.from_pretrained(tmp_path / "hf")
    mask = batch.mask.bool()
    with torch.no_grad():
        for model in (fresh, exported):
            logits = policy_forward(StreamPolicy(model), batch)
            assert float((logits - learner_logits)[mask].abs().max()) < ATOL


def test_save_two_steps_load_reproduces_the_same_two_steps(env, tmp_path):
    root = tmp_path / "ckpt"
    env.group.save_checkpoint(str(root), step=10)
    saved = env.group.state_dict()
    first = [env.group.train_step(env.trajs) for _ in range(2)]
    after_two = env.group.state_dict()
    meta = env.group.load_checkpoint(str(root))
    assert meta["step"] == 10 and meta["version"] == first[0]["learner/version"] - 1
    _assert_state_close(env.group.state_dict(), saved, atol=0.0, outliers=0)
    again = [env.group.train_step(env.trajs) for _ in range(2)]
    _assert_state_close(env.group.state_dict(), after_two, atol=0.0, mean_atol=0.0, outliers=0)  # same ranks, same order: bitwise
    assert [m["learner/loss"] for m in again] == [m["learner/loss"] for m in first]


def test_truncated_checkpoint_falls_back_to_previous(env, tmp_path):
    root = tmp_path / "ckpt"
    env.group.save_checkpoint(str(root), step=1)
    good = env.group.state_dict()
    env.group.train_step(env.trajs)
    newest = Path(env.group.save_checkpoint(str(root), step=2))
    shard = sorted((newest / ckpt.TAG).glob("*optim_states.pt"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a torn copy
    assert ckpt.latest_checkpoint(root) == ckpt.step_dir(root, 1)
    assert env.group.load_checkpoint(str(root))["step"] == 1
    _assert_state_close(env.group.state_dict(), good, atol=0.0, outliers=0)


def test_no_deepspeed_cpp_extension_was_built(env):
    assert not any(env.ext.iterdir()), list(env.ext.iterdir())


def test_unplaceable_group_fails_fast_with_one_line(ray_session, env):
    import time

    from e3rl.config import ConfigError
    from learner.group import LearnerGroup

    total = ray_session.cluster_resources()["CPU"]
    cfg = env.cfg.__class__(**{**env.cfg.__dict__, "resources": ResourcesConfig(cpus_per_learner=total)})
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"learner.num_workers / resources.cpus_per_learner: .*could not place them within 2s") as e:
        LearnerGroup(cfg, placement_timeout_s=2)
    assert time.perf_counter() - t0 < 10 and "\n" not in str(e.value)


def test_weights_stream_from_the_zero3_shards_into_a_generator_bit_for_bit(env):
    """The collective sync end to end on Ray: two ZeRO-3 ranks gather each bucket (a tenth of the
    model) from their shards, rank 0 broadcasts it over the gloo sync group, and a generator actor
    (HF backend) loads it as it arrives: its weights equal the learner's gathered ones bit for bit,
    tied embedding included, and it reports the version.

    First, an epoch that cannot form (a third member never comes): both sides report the failure
    after the join timeout instead of raising, and the next epoch on the same store forms cleanly
    (its rendezvous does not count the failed epoch's arrivals)."""
    import dataclasses

    import ray

    from actors.generator_actor import make_generator_actor
    from e3rl.config import Config, GenConfig, ModelConfig

    env.group.train_step(env.trajs)  # weights that differ from the generator's initial ones
    cfg = Config(model=ModelConfig(path=str(env.model_dir), device="cpu", dtype="float32"),
                 gen=GenConfig(backend="hf"), resources=ResourcesConfig(torch_threads=1))
    gen = make_generator_actor(cfg, num_cpus=0.5)
    try:
        specs = env.group.sync_specs()
        total = sum(torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size() for _, shape, dtype in specs)
        bucket = total // 10
        ray.get(gen.policy_version.remote())  # started: it arrives within the short join timeout below

        lonely = dataclasses.replace(env.group.sync_address(world_size=3, timeout_s=30.0), join_timeout_s=3.0)
        sends = env.group.send_weights(lonely, bucket)
        assert ray.get(gen.receive_weights.remote(lonely, 1, specs, bucket, 40)) == -1
        failed = ray.get(sends)[0]
        assert failed["bytes"] == 0 and "2 of 3 members arrived" in failed["error"], failed

        address = env.group.sync_address(world_size=2, timeout_s=30.0)
        assert address.epoch == lonely.epoch + 1 and address.port == lonely.port
        sends = env.group.send_weights(address, bucket)
        version = ray.get(gen.receive_weights.remote(address, 1, specs, bucket, 41))
        sent = ray.get(sends)[0]
        assert sent["error"] == "" and sent["bytes"] == total and version == 41
        got, ref = ray.get(gen.model_state.remote()), env.group.state_dict()
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    finally:
        ray.kill(gen)


def test_weights_stream_in_the_generators_dtype(env):
    """Generators that run bf16 are sent bf16: half the bytes, and exactly the learner's weights
    rounded the way the generator's own load would round them."""
    import ray

    specs32, specs16 = env.group.sync_specs(), env.group.sync_specs("bfloat16")
    assert [(n, s) for n, s, _ in specs16] == [(n, s) for n, s, _ in specs32]
    assert {d for _, _, d in specs16} == {torch.bfloat16}
    nbytes = lambda specs: sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for _, s, d in specs)
    assert 2 * nbytes(specs16) == nbytes(specs32)

    from learner.sync_group import SyncGroup, plan_buckets

    address = env.group.sync_address(world_size=2, timeout_s=30.0)
    sends = env.group.send_weights(address, nbytes(specs16) // 4, "bfloat16")
    got = {n: t.clone() for n, t in SyncGroup(address, 1, torch.device("cpu")).receive(plan_buckets(specs16, nbytes(specs16) // 4))}
    assert ray.get(sends)[0]["error"] == ""
    ref = env.group.state_dict()
    assert all(torch.equal(got[n], ref[n].to(torch.bfloat16)) for n in got)

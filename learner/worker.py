"""The ZeRO-3 learner: one plain object per data-parallel rank (Ray wraps it in actor.py).

Every rank receives the WHOLE batch (whole groups: outcome advantages need them) and computes the
whole update plan itself (`learner.updates`): `algo.epochs` passes of `mini_batches` optimizer
steps, each rank training its length-balanced shard's part of every mini-batch, all ranks running
the same number of micro-batches (ZeRO-3's collectives must match), padded with zero-weight dummies.
Each micro-batch is ONE forward over prompt + stream (kept and erased tokens) with the stream mask;
the answer rows' attention is captured in that same forward when the allocation is `attention`.

pi_old: with one optimizer step per batch it is the training forward's own log-prob, detached (the
ratio is exactly 1; a separate pass would compute the same numbers). With several, a no-grad pass
before the first step computes pi_old and the token advantages once (`_freeze`); both stay frozen
across mini-batches and epochs, so the ratio moves off 1 and the clip acts. The generator's
log-probs (pi_gen) enter only through truncated importance sampling (`algo.tis_cap`); with
`algo.behaviour_logp: recompute` pi_old stands in for them (an engine that returns other log-probs).

Loss scale: micro-batch losses use GLOBAL denominators (all trained tokens / sequences of the
mini-batch), so their sum over micro-batches and ranks is the mini-batch loss. We call
`engine.backward(loss * world_size, scale_wrt_gas=False)` because DeepSpeed would otherwise divide
by its fixed accumulation steps, and ZeRO averages gradients over ranks (divides by world_size).
We set the accumulation boundary ourselves, so a mini-batch may hold any number of sequences.
A non-finite loss on any rank is turned into NaN gradients; ZeRO-3 then sees a non-finite global
grad norm on every rank and skips that optimizer step (weights untouched); we count it.
"""
from __future__ import annotations

import importlib
import logging
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from e3rl.config import Config
from e3rl.core.loss import LOSSES, LossInputs, LossSettings, behaviour_logprobs, truncated_is_weight
from e3rl.core.trajectory import Trajectory
from e3rl.models import load_model, load_tokenizer, resolve_device
from learner import checkpoint as ckpt
from learner.advantages import AdvantageSpec, batch_token_advantages, outcome_advantages
from learner.ds_config import build_ds_config
from learner.stream_batch import (StreamBatch, StreamPolicy, collate, logprobs_and_entropy,
                                  pad_tokens, policy_forward, split_attention, stream_logprobs)
from learner.precision import learner_dtype
from learner.step_stats import StepSums
from learner.updates import Update, freeze_batches, plan_updates
from learner.sync_group import GroupAddress, PipelinedSender, SyncGroup, empty_buffers, plan_buckets, slot_writer
from learner.weights import (BUCKET_BYTES, ObjectStoreWeightSync, WeightHandle, WeightSync, distinct_tensors,
                             gather_each, gather_flat, gather_state_dict, set_fp32_masters, state_specs)


TRUNCATED = ("length", "stream_cap")
"""Finish reasons of a sample cut by a length limit (what overlong filtering masks)."""


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """A dtype named across Ray ("bfloat16"), or None."""
    return getattr(torch, name) if name else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def skip_shm_comm_build() -> None:
    """Stop DeepSpeed's CPU accelerator from JIT-compiling its shared-memory comm op.

    `deepspeed.comm.torch.TorchBackend.__init__` calls `build_shm_op()`, which runs g++ for
    48-90 s on a cold machine. The op backs only `inference_all_reduce` (tensor-parallel
    inference); ZeRO training communicates through torch.distributed (gloo), and
    `inference_all_reduce` falls back to it when the op is absent. `build_shm_op` returning None
    is DeepSpeed's own "op not available" path, so we take exactly that path.
    """
    # importlib, not `import deepspeed.comm.torch as m`: that resolves to the `torch` attribute
    # of deepspeed.comm, which is the real torch module.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, device: torch.device) -> None:
    """torch.distributed through DeepSpeed: gloo on CPU, NCCL on GPU; rank 0's address as master."""
    import deepspeed

    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    if device.type == "cpu":
        skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)


def resolve_batch(items: Sequence[Any]) -> list[Trajectory]:
    """Trajectories, or object-store refs to lists of them (fetched here, not via the driver)."""
    out: list[Trajectory] = []
    refs = [x for x in items if not isinstance(x, Trajectory)]
    fetched: Any = iter(())
    if refs:
        import ray

        fetched = iter(ray.get(refs))
    for x in items:
        out.extend([x] if isinstance(x, Trajectory) else next(fetched))
    return out


class LearnerWorker:
    """One ZeRO-3 rank. `__init__` is cheap; `setup` joins the process group and builds the engine."""

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = resolve_device(cfg.model.device)
        self.dtype = learner_dtype(cfg.learner.dtype, self.device)  # compute dtype; masters are fp32
        self.bf16 = self.dtype == torch.bfloat16
        self.spec = AdvantageSpec.from_config(cfg)
        self.version = 0
        self.skipped_steps = 0
        self.engine: Any = None
        self.ref_engine: Any = None
        self.capture = None
        self._times: dict[str, float] = {}
        self._hf_ds_config = None  # must outlive a model built under it (transformers holds a weakref)

    # ------------------------------------------------------------------ setup
    def master_address(self) -> tuple[str, int]:
        """This node's IP and a free port (called on rank 0 to rendezvous the group)."""
        try:
            import ray

            ip = ray.util.get_node_ip_address()
        except Exception:
            ip = "127.0.0.1"
        return ip, free_port()

    def setup(self, master_addr: str, master_port: int, init_state: Optional[dict[str, torch.Tensor]] = None,
              seed: Optional[int] = None) -> dict[str, Any]:
        """Join the group and build the engine from config, or from `init_state` (a HF state_dict)."""
        import deepspeed

        t0 = time.perf_counter()
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")  # DS's old c10d names
        if self.device.type == "cuda":
            torch.cuda.set_device(0)  # Ray exposes one GPU per learner actor
        init_distributed(self.rank, self.world_size, master_addr, master_port, self.device)
        ds = build_ds_config(self.cfg, self.world_size, self.device.type)
        seed = self.cfg.run.seed if seed is None else seed
        policy = StreamPolicy(self._build_lm(ds, init_state, seed))
        if self.spec.needs_attention:
            self.capture = policy.capture
        exact = self._fp32_source(policy.lm, init_state)
        self.engine, *_ = deepspeed.initialize(model=policy, model_parameters=list(policy.parameters()), config=ds)
        if exact is not None:
            set_fp32_masters(self.engine.module.lm, exact)
        self._set_mode(self.engine)
        if self.cfg.algo.kl_coef > 0:
            ref = StreamPolicy(self._build_lm(ds, init_state, seed)).requires_grad_(False)
            ref_ds = build_ds_config(self.cfg, self.world_size, self.device.type, with_optimizer=False)
            self.ref_engine, *_ = deepspeed.initialize(model=ref, config=ref_ds)
            self.ref_engine.eval()
        n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in policy.parameters())
        return {"rank": self.rank, "device": str(self.device), "params": n_params, "setup_s": time.perf_counter() - t0,
                "threads": torch.get_num_threads(), "dtype": str(self.dtype).removeprefix("torch.")}

    def _build_lm(self, ds: dict, init_state: Optional[dict], seed: int) -> torch.nn.Module:
        """The HF policy with its real weights.

        Pretrained checkpoints load under `HfDeepSpeedConfig`: transformers builds the model in
        `zero.Init` and streams the shards into partitions (no full copy per rank). Random test
        models and explicit state_dicts are built whole, exactly as generators build them (HF
        init, then the seeded init_std re-init, which writes whole tensors), and
        `deepspeed.initialize` partitions them. Never a bare `zero.Init` around `from_config`:
        that skips HF's weight init.
        """
        m = self.cfg.model
        if m.path == "random" or init_state is not None:
            lm = load_model(m, device=torch.device("cpu"), dtype=torch.float32, seed=seed)
            if init_state is not None:
                lm.load_state_dict(init_state, strict=True)
            return lm.to(self.device)
        if ds["zero_optimization"]["stage"] == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(ds)
        return load_model(m, device=self.device, dtype=torch.float32, seed=seed)

    def _fp32_source(self, lm: torch.nn.Module, init_state: Optional[dict]) -> Optional[dict[str, torch.Tensor]]:
        """Exact fp32 weights for the bf16 run's master copies, where we hold them whole (random
        and explicit state_dicts). A pretrained checkpoint streamed into ZeRO-3 partitions starts
        from its bf16 rounding instead: exact for bf16 checkpoints such as Qwen3's."""
        if not self.bf16 or (self.cfg.model.path != "random" and init_state is None):
            return None
        return {n: p.detach().clone() for n, p in lm.named_parameters()}

    def _set_mode(self, engine: Any) -> None:
        """Eval mode (no dropout: ratios must compare like with like) unless activations are
        checkpointed, which HF only does in train mode."""
        if self.cfg.learner.gradient_checkpointing:
            engine.module.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            engine.train()
        else:
            engine.eval()

    # ------------------------------------------------------------------ training
    def _loss_settings(self, update: Update) -> LossSettings:
        a = self.cfg.algo
        return LossSettings(clip_low=a.clip_low, clip_high=a.clip_high, agg=a.loss_agg, kl_coef=a.kl_coef,
                            norm_len=self.cfg.gen.max_new_tokens, total_tokens=update.total_tokens,
                            total_seqs=update.total_seqs, tau_pos=a.sapo_tau_pos, tau_neg=a.sapo_tau_neg)

    def _collate(self, trajs: Sequence[Trajectory], trained: Sequence[bool]) -> StreamBatch:
        """The padded batch; samples whose loss is masked (overlong filtering) keep a zero mask."""
        pad = int(trajs[0].stream_ids[0]) if trajs[0].stream_ids.numel() else 0  # any real id; masked out
        batch = collate(trajs, pad, self.spec.answer_tokens, self.cfg.learner.pack_tokens)
        batch.mask[~torch.tensor(list(trained), dtype=torch.bool)] = 0.0
        return batch.to(self.device)

    def _trained(self, trajs: Sequence[Trajectory]) -> list[bool]:
        """DAPO overlong filtering: a sample cut by a length limit carries no loss."""
        if not self.cfg.algo.overlong_filter:
            return [True] * len(trajs)
        return [t.finish_reason not in TRUNCATED for t in trajs]

    def _forward(self, batch: StreamBatch, trajs: list[Trajectory], outcome: torch.Tensor, entropy: bool = True
                 ) -> tuple[torch.Tensor, float, list[torch.Tensor]]:
        """One policy forward -> (log-probs [B, S], entropy sum (0 unless asked), per-row token advantages).

        The advantages need this forward only for the attention allocation (captured in it)."""
        if self.capture is not None:
            self.capture.arm(batch.answer_index, batch.sample_row)
        logits = policy_forward(self.engine, batch)  # [B, S, V]
        attn = self.capture.disarm() if self.capture is not None else None
        T = self.cfg.gen.temperature
        logp, ent = logprobs_and_entropy(logits, batch, T) if entropy else (stream_logprobs(logits, batch, T), 0.0)
        adv = batch_token_advantages(trajs, outcome, self.spec, split_attention(attn, batch) if attn is not None else None)
        return logp, ent, adv

    @torch.no_grad()
    def _freeze(self, trajs: list[Trajectory], outcome: torch.Tensor, trained: list[bool],
                lengths: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The no-grad pass before the first of several optimizer steps: pi_old and the token
        advantages (attention allocation included) of this rank's samples, frozen for the step."""
        frozen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        lc = self.cfg.learner
        for idx in freeze_batches(lengths, self.world_size, self.rank, lc.micro_batch_size, lc.micro_batch_tokens):
            rows = idx or [0]  # a dummy forward keeps ZeRO-3's collectives in step
            batch = self._collate([trajs[j] for j in rows], [trained[j] for j in rows])
            logp, _, adv = self._forward(batch, [trajs[j] for j in rows], outcome[rows], entropy=False)
            for k, j in enumerate(idx):
                s = trajs[j].stream_ids.numel()
                frozen[j] = (logp[k, :s].float().cpu(), adv[k])
        return frozen

    def _micro_step(self, trajs: list[Trajectory], idx: list[int], outcome: torch.Tensor, trained: list[bool],
                    settings: LossSettings, frozen: Optional[dict]) -> StepSums:
        """Forward, loss, backward for one micro-batch (idx empty = a zero-weight dummy). -> its sums."""
        t0 = time.perf_counter()
        rows = idx or [0]
        mb = [trajs[j] for j in rows]
        batch = self._collate(mb, [trained[j] and bool(idx) for j in rows])
        width = batch.mask.shape[1]
        if frozen is None:  # one optimizer step per batch: pi_old is this forward's own value
            logp, entropy, adv_rows = self._forward(batch, mb, outcome[rows])
            old = logp.detach()
        else:
            logp, entropy = logprobs_and_entropy(policy_forward(self.engine, batch), batch, self.cfg.gen.temperature)
            old = pad_tokens([frozen[j][0] for j in idx] if idx else [torch.zeros(0)], width).to(self.device)
            adv_rows = [frozen[j][1] for j in idx] if idx else [torch.zeros(0)]
        adv = pad_tokens(adv_rows, width).to(self.device)  # [B, S]
        cap = self.cfg.algo.tis_cap
        behaviour = behaviour_logprobs(self.cfg.algo.behaviour_logp, old, batch.behavior_logp)
        is_weight = truncated_is_weight(old, behaviour, cap, batch.mask) if cap else None
        ref_logp = None
        if self.ref_engine is not None:
            with torch.no_grad():
                ref_logp = stream_logprobs(policy_forward(self.ref_engine, batch), batch, self.cfg.gen.temperature)
        loss, m = LOSSES[self.cfg.algo.loss](LossInputs(logp, old, adv, batch.mask, ref_logp, is_weight), settings)
        if 0 <= self.cfg.run.fault.nan_loss_after <= self.version + self.skipped_steps:
            loss = loss * float("nan")  # fault injection (tests): this and every later optimizer step
        finite = bool(torch.isfinite(loss))
        t1 = time.perf_counter()
        # Non-finite: NaN gradients make every rank's global norm NaN, so ZeRO-3 skips the step.
        self.engine.backward(loss * self.world_size if finite else loss * float("nan"), scale_wrt_gas=False)
        self._times["forward_s"] += t1 - t0
        self._times["backward_s"] += time.perf_counter() - t1
        n = float(batch.mask.sum())
        real = float(batch.row_len.sum()) if idx else 0.0  # tokens forwarded: a dummy's are all padding
        diff = (old - behaviour).abs() * batch.mask  # learner (pi_old) vs generator numerics
        w = is_weight if is_weight is not None else batch.mask
        return StepSums(
            loss=float(loss.detach()) if finite else 0.0, clip_tokens=m["clip_frac"] * n, approx_kl=m["approx_kl"] * n,
            entropy=entropy, logp_diff=float(diff.sum()), tokens=n, nonfinite=float(not finite), ref_kl=m["ref_kl"] * n,
            tis_weight=float((w * batch.mask).sum()), logp_diff_max=float(diff.max()) if finite else 0.0,
            real_tokens=real, padded_tokens=float(batch.input_ids.numel()),
        )

    def train_step(self, trajs: Sequence[Trajectory]) -> dict[str, float]:
        """One training step on the whole batch (every rank gets the same list): `algo.epochs`
        passes of `mini_batches` optimizer steps each. -> metrics (means over the steps)."""
        t0 = time.perf_counter()
        trajs = resolve_batch(trajs)
        if not trajs:
            raise ValueError("train_step: empty batch — pass at least one trajectory")
        self._times = {"forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0, "freeze_s": 0.0}
        outcome = outcome_advantages(trajs, self.spec.estimator)  # [N], whole groups
        trained = self._trained(trajs)
        lengths = [t.prompt_ids.numel() + t.stream_ids.numel() for t in trajs]  # what a forward costs
        stream = [t.stream_ids.numel() if ok else 0 for t, ok in zip(trajs, trained)]  # what carries loss
        lc = self.cfg.learner
        plan = plan_updates(lengths, stream, self.world_size, self.rank, lc.micro_batch_size, self.cfg.mini_batches,
                            self.cfg.algo.epochs, seed=self.cfg.run.seed * 1_000_003 + self.version + self.skipped_steps,
                            micro_batch_tokens=lc.micro_batch_tokens)
        frozen = None
        if len(plan) > 1:
            t1 = time.perf_counter()
            frozen = self._freeze(trajs, outcome, trained, lengths)
            self._times["freeze_s"] = time.perf_counter() - t1
        stats = StepSums()
        applied, trailing_skips, grad_norms = 0, 0, []
        for update in plan:
            settings = self._loss_settings(update)
            for i, idx in enumerate(update.micro):
                self.engine.set_gradient_accumulation_boundary(i == len(update.micro) - 1)
                stats.add(self._micro_step(trajs, idx, outcome, trained, settings, frozen))
            t1 = time.perf_counter()
            self.engine.step()
            self._times["optimizer_s"] += time.perf_counter() - t1
            if self.engine.was_step_applied():
                self.version += 1
                applied, trailing_skips = applied + 1, 0
                gn = self.engine.get_global_grad_norm()
                grad_norms.append(float(gn) if gn is not None else float("nan"))
            else:
                self.skipped_steps += 1
                trailing_skips += 1
        return self._step_metrics(stats, len(trajs), len(plan), applied, trailing_skips, grad_norms,
                                  time.perf_counter() - t0)

    def _step_metrics(self, stats: StepSums, n_seqs: int, n_updates: int, applied: int, trailing_skips: int,
                      grad_norms: list[float], seconds: float) -> dict[str, float]:
        s = stats.all_reduce(self.world_size, self.device)
        n = max(1.0, s.tokens)  # trained tokens over all updates
        return {
            "learner/loss": s.loss / n_updates, "learner/clip_frac": s.clip_tokens / n,
            "learner/approx_kl": s.approx_kl / n, "learner/entropy": s.entropy / n,
            "learner/logp_diff_mean": s.logp_diff / n, "learner/logp_diff_max": s.logp_diff_max,
            "learner/ref_kl": s.ref_kl / n, "learner/tis_weight_mean": s.tis_weight / n,
            "learner/padding_frac": 1.0 - s.real_tokens / max(1.0, s.padded_tokens),
            "learner/tokens_forwarded": s.padded_tokens,  # rows x width of every forward (shared prompts once)
            "learner/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            "learner/nonfinite_loss": s.nonfinite, "learner/updates": float(n_updates),
            "learner/skipped": float(n_updates - applied), "learner/skipped_trailing": float(trailing_skips),
            "learner/skipped_steps": float(self.skipped_steps), "learner/tokens": s.tokens / n_updates,
            "learner/seqs": float(n_seqs), "learner/lr": float(self.engine.get_lr()[0]),
            "learner/version": float(self.version), "learner/step_s": seconds,
            **{f"learner/{k}": v for k, v in self._times.items()},  # rank 0's phases
        }

    # ------------------------------------------------------------------ inspection
    @torch.no_grad()
    def forward_logits(self, trajs: Sequence[Trajectory]) -> Optional[torch.Tensor]:
        """Collective: logits [B, S, V] predicting each stream token (CPU, on rank 0)."""
        logits = policy_forward(self.engine, self._collate(list(trajs), [True] * len(trajs)))
        return logits.float().cpu() if self.rank == 0 else None

    # ------------------------------------------------------------------ weights, checkpoints
    def state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """Collective: the HF state_dict (CPU tensors) on rank 0, None elsewhere."""
        return gather_state_dict(self.engine.module.lm, self.rank, master=self.bf16)

    def publish_weights(self, sync: Optional[WeightSync] = None) -> Optional[WeightHandle]:
        """Collective: gather the policy into flat buffers on rank 0 and publish them once with
        the policy version."""
        policy = gather_flat(self.engine.module.lm, self.rank, master=self.bf16)
        return (sync or ObjectStoreWeightSync()).publish(policy, self.version) if self.rank == 0 else None

    def send_weights(self, address: GroupAddress, bucket_bytes: int = BUCKET_BYTES,
                     cast: Optional[str] = None) -> Optional[dict[str, Any]]:
        """Collective: stream the policy to the sync group bucket by bucket. Every rank gathers
        each bucket from its ZeRO-3 partitions; rank 0 writes it straight into the bucket's buffer
        and broadcasts it while the next one is gathered, so no rank holds more than two buckets
        beyond its shard. `cast`: the generators' dtype (see `state_specs`). A broadcast that
        fails (a generator died or hung) stops rank 0 sending but not gathering: the other ranks'
        collectives must still match. -> on rank 0 {version, bytes, seconds, gather_s, send_s, error}."""
        t0 = time.perf_counter()
        lm = self.engine.module.lm
        named = distinct_tensors(lm)
        plan = plan_buckets(state_specs(lm, self.bf16, _dtype(cast)), bucket_bytes)
        sender, error, gather_s, send_s = None, "", 0.0, 0.0
        if self.rank == 0:
            try:
                sender = PipelinedSender(self._sync_group(address))
            except (RuntimeError, TimeoutError) as e:
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        for bucket in plan:
            flat = empty_buffers(bucket, self.device) if sender is not None and not error else None
            t = time.perf_counter()
            gather_each({s.name: named[s.name] for s in bucket.slots}, self.rank, self.bf16,
                        slot_writer(bucket, flat) if flat is not None else lambda n, x: None)
            gather_s += time.perf_counter() - t
            if flat is not None:
                t = time.perf_counter()
                try:
                    sender.push(flat, bucket.nbytes)
                except RuntimeError as e:
                    error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                send_s += time.perf_counter() - t
            del flat
        if sender is not None and not error:
            t = time.perf_counter()
            try:
                sender.flush()
            except RuntimeError as e:
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            send_s += time.perf_counter() - t
        if self.rank != 0:
            return None
        return {"version": self.version, "bytes": sender.sent if sender else 0, "seconds": time.perf_counter() - t0,
                "gather_s": gather_s, "send_s": send_s, "error": error}

    def policy_version(self) -> int:
        return self.version

    def sync_specs(self, cast: Optional[str] = None) -> list:
        """(name, shape, dtype) of what `send_weights` sends, for receivers to plan the same buckets."""
        return state_specs(self.engine.module.lm, self.bf16, _dtype(cast))

    def _sync_group(self, address: GroupAddress) -> SyncGroup:
        """Rank 0's member of the sync group's current epoch (one store per port, reused by epochs)."""
        g = getattr(self, "_sync", None)
        if g is not None and g.address == address:
            return g
        store = g.store if g is not None and g.address.port == address.port else None
        self._sync = SyncGroup(address, 0, self.device, store=store)
        return self._sync

    def _barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def save_checkpoint(self, root: str, step: int, keep_last: Optional[int] = None,
                        extra: Optional[dict[str, Any]] = None) -> Optional[str]:
        """Collective: atomic DeepSpeed checkpoint under `root`; -> its dir on rank 0.

        `extra`: JSON-safe driver state (data cursor, threshold history, ...) kept in the meta."""
        meta = {**(extra or {}), "step": step, "version": self.version, "skipped_steps": self.skipped_steps}
        keep = keep_last if keep_last is not None else self.cfg.run.keep_last
        d = ckpt.save_engine(self.engine, root, step, meta, keep, self.rank, self._barrier)
        return str(d) if d is not None else None

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Collective: restore a complete checkpoint dir (see checkpoint.latest_checkpoint)."""
        meta = ckpt.load_engine(self.engine, path)
        self.version, self.skipped_steps = int(meta["version"]), int(meta.get("skipped_steps", 0))
        self._set_mode(self.engine)
        return meta

    def export_hf(self, out_dir: str) -> Optional[str]:
        """Collective: HF-format dir (save_pretrained + tokenizer) written by rank 0."""
        state = self.state_dict()
        if self.rank != 0:
            return None
        m = self.cfg.model
        tok = load_tokenizer(m) if (m.tokenizer or m.path != "random") else None
        return str(ckpt.export_hf(self.engine.module.lm, state, Path(out_dir), tok))

"""Plain-torch reference of learner updates: full-batch HF forward (eager attention, all logits),
attention masses from `output_attentions`, the core's loss, clip_grad_norm_, torch AdamW.

Independent of the learner's kept-first layout, stream attention, head gather, attention capture,
sharding, micro-batching and DeepSpeed; it shares only the advantage assembly (pure functions on
trajectories). Its batch is the dense reference layout (`e3rl.bench.dense_reference`): stream
order and the core's [L, L] visibility mask.
"""
from __future__ import annotations

import torch

from pathlib import Path

from e3rl.config import AlgoConfig, Config, GenConfig, LearnerConfig, ModelConfig, ResourcesConfig
from e3rl.core.loss import LOSSES, LossInputs, LossSettings, truncated_is_weight
from e3rl.core.surprisal import token_logprobs
from learner.advantages import AdvantageSpec, batch_token_advantages, outcome_advantages
from e3rl.bench.dense_reference import dense_collate
from learner.stream_batch import pad_tokens


def reference_logits(model: torch.nn.Module, trajs, answer_tokens: int = 16, attentions: bool = False):
    """-> (logits [B, S, V] at predecessors, batch, per-row attention [Q_b, S_b] or None)."""
    b = dense_collate(trajs, pad_id=0, answer_tokens=answer_tokens)
    out = model(input_ids=b.input_ids, attention_mask=b.attn_mask, position_ids=b.position_ids,
                output_attentions=attentions, use_cache=False)
    logits = out.logits.gather(1, b.target_index.unsqueeze(-1).expand(-1, -1, out.logits.shape[-1]))
    attn = None
    if attentions:
        a = torch.stack(out.attentions).float().mean((0, 2)).detach()  # [B, L, L]: layers and heads
        attn = []
        for i, t in enumerate(trajs):
            p, s = t.prompt_ids.numel(), t.stream_ids.numel()
            rows = b.answer_index[i][b.answer_valid[i]]
            attn.append(a[i, rows][:, p : p + s])
    return logits, b, attn


def _settings(cfg: Config, tokens: float, seqs: float) -> LossSettings:
    a = cfg.algo
    return LossSettings(a.clip_low, a.clip_high, a.loss_agg, a.kl_coef, cfg.gen.max_new_tokens, tokens, seqs,
                        tau_pos=a.sapo_tau_pos, tau_neg=a.sapo_tau_neg)


def _is_weight(cfg: Config, old: torch.Tensor, b) -> torch.Tensor | None:
    return truncated_is_weight(old, b.behavior_logp, cfg.algo.tis_cap, b.mask) if cfg.algo.tis_cap else None


def _apply(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, cfg: Config) -> dict:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.learner.grad_clip)
    opt.step()
    return {"loss": float(loss.detach()), "grad_norm": float(norm)}


def reference_step(model: torch.nn.Module, opt: torch.optim.Optimizer, trajs, cfg: Config,
                   frozen: torch.nn.Module | None = None) -> dict:
    """One full-batch on-policy update (pi_old = sg(pi), TIS against the behaviour log-probs when
    algo.tis_cap > 0, k3 KL to `frozen` when algo.kl_coef > 0); -> {'loss', 'grad_norm'}."""
    spec = AdvantageSpec.from_config(cfg)
    logits, b, attn = reference_logits(model, trajs, spec.answer_tokens, attentions=spec.needs_attention)
    logp = token_logprobs(logits, b.stream_ids, cfg.gen.temperature) * b.mask
    ref_logp = None
    if frozen is not None:
        with torch.no_grad():
            ref_logp = token_logprobs(reference_logits(frozen, trajs)[0], b.stream_ids, cfg.gen.temperature) * b.mask
    adv = pad_tokens(batch_token_advantages(trajs, outcome_advantages(trajs, spec.estimator), spec, attn), b.mask.shape[1])
    old = logp.detach()
    settings = _settings(cfg, float(b.mask.sum()), float(len(trajs)))
    loss, _ = LOSSES[cfg.algo.loss](LossInputs(logp, old, adv, b.mask, ref_logp, _is_weight(cfg, old, b)), settings)
    return _apply(model, opt, loss, cfg)


def reference_ppo_step(model: torch.nn.Module, opt: torch.optim.Optimizer, trajs, cfg: Config,
                       mini_batches: list[list[int]]) -> list[dict]:
    """PPO-style: one no-grad full-batch forward freezes pi_old and the token advantages, then one
    AdamW step per mini-batch (indices into trajs) with the mini-batch's own denominators."""
    spec = AdvantageSpec.from_config(cfg)
    with torch.no_grad():
        logits, b, attn = reference_logits(model, trajs, spec.answer_tokens, attentions=spec.needs_attention)
        old_all = token_logprobs(logits, b.stream_ids, cfg.gen.temperature) * b.mask
        adv_rows = batch_token_advantages(trajs, outcome_advantages(trajs, spec.estimator), spec, attn)
    out = []
    for idx in mini_batches:
        mb = [trajs[i] for i in idx]
        logits, mbb, _ = reference_logits(model, mb, spec.answer_tokens)
        if cfg.algo.overlong_filter:  # truncated samples carry no loss (they did count in the advantages)
            mbb.mask[torch.tensor([t.finish_reason in ("length", "stream_cap") for t in mb])] = 0.0
        logp = token_logprobs(logits, mbb.stream_ids, cfg.gen.temperature) * mbb.mask
        width = mbb.mask.shape[1]
        old = pad_tokens([old_all[i, : trajs[i].stream_ids.numel()] for i in idx], width)
        adv = pad_tokens([adv_rows[i] for i in idx], width)
        settings = _settings(cfg, float(mbb.mask.sum()), float((mbb.mask.sum(-1) > 0).sum()))
        loss, _ = LOSSES[cfg.algo.loss](LossInputs(logp, old, adv, mbb.mask, None, _is_weight(cfg, old, mbb)), settings)
        out.append(_apply(model, opt, loss, cfg))
    return out


def make_adamw(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    lc = cfg.learner
    return torch.optim.AdamW(model.parameters(), lr=lc.lr, betas=tuple(lc.betas), eps=1e-8, weight_decay=lc.weight_decay)


def save_tiny_model(model_dir: Path, tokenizer) -> Path:
    """The tests' tiny random model (seed 0) and tokenizer as a HF dir, loaded like a checkpoint."""
    from e3rl.models import load_model
    from tests.conftest import tiny_model_config

    load_model(tiny_model_config(), seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def fp32_learner_config(model_dir: Path, **algo) -> Config:
    """Two ZeRO-3 ranks in fp32 (compared with plain fp32 torch) on the saved tiny model, training
    2 groups x 4 samples with the attention allocation; `algo` adds or overrides algo fields."""
    return Config(
        model=ModelConfig(path=str(model_dir), device="cpu", attn_implementation="sdpa"),
        learner=LearnerConfig(num_workers=2, lr=1e-3, weight_decay=0.01, micro_batch_size=2, grad_clip=1.0,
                              dtype="float32"),
        algo=AlgoConfig(**{"prompts_per_step": 2, "allocation": "attention", "answer_tokens": 4, "alloc_mix": 0.7,
                           **algo}),
        gen=GenConfig(group_size=4, temperature=0.8),
        resources=ResourcesConfig(cpus_per_learner=0.5),
    ).validate()

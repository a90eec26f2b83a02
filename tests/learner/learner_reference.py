"""Plain-torch reference of one learner update: full-batch HF forward (eager attention, all logits),
attention masses from `output_attentions`, the core's loss, clip_grad_norm_, torch AdamW.

Independent of the learner's StreamPolicy head gather, attention capture, sharding, micro-batching
and DeepSpeed; it shares only the collate (checked on its own against separate forwards) and
the advantage assembly (pure functions on trajectories).
"""
from __future__ import annotations

import torch

from e3rl.config import Config
from e3rl.core.loss import LOSSES, LossInputs, LossSettings
from e3rl.core.surprisal import token_logprobs
from learner.advantages import AdvantageSpec, batch_token_advantages, outcome_advantages
from learner.stream_batch import collate, pad_tokens


def reference_logits(model: torch.nn.Module, trajs, answer_tokens: int = 16, attentions: bool = False):
    """-> (logits [B, S, V] at predecessors, batch, per-row attention [Q_b, S_b] or None)."""
    b = collate(trajs, pad_id=0, answer_tokens=answer_tokens)
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


def reference_step(model: torch.nn.Module, opt: torch.optim.Optimizer, trajs, cfg: Config,
                   frozen: torch.nn.Module | None = None) -> dict:
    """One full-batch update (k3 KL to `frozen` when algo.kl_coef > 0); -> {'loss', 'grad_norm'}."""
    spec = AdvantageSpec.from_config(cfg)
    logits, b, attn = reference_logits(model, trajs, spec.answer_tokens, attentions=spec.needs_attention)
    logp = token_logprobs(logits, b.stream_ids, cfg.gen.temperature) * b.mask
    ref_logp = None
    if frozen is not None:
        with torch.no_grad():
            ref_logp = token_logprobs(reference_logits(frozen, trajs)[0], b.stream_ids, cfg.gen.temperature) * b.mask
    adv = pad_tokens(batch_token_advantages(trajs, outcome_advantages(trajs, spec.estimator), spec, attn), b.mask.shape[1])
    a = cfg.algo
    settings = LossSettings(a.clip_low, a.clip_high, a.loss_agg, a.kl_coef, cfg.gen.max_new_tokens)
    loss, _ = LOSSES[a.loss](LossInputs(logp, b.old_logp, adv, b.mask, ref_logp), settings)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.learner.grad_clip)
    opt.step()
    return {"loss": float(loss.detach()), "grad_norm": float(norm)}


def make_adamw(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    lc = cfg.learner
    return torch.optim.AdamW(model.parameters(), lr=lc.lr, betas=tuple(lc.betas), eps=1e-8, weight_decay=lc.weight_decay)

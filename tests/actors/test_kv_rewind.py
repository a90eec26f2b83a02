"""RowCache: rewind by mask, compaction by gather, row selection — checked against fresh forwards."""
from __future__ import annotations

import torch

from actors.kv_rewind import RowCache


def fresh_logits(model, seq):
    ids = torch.tensor([seq])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]


@torch.inference_mode()
def test_rewind_compact_select_match_fresh_forward(tiny_model):
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    mask = torch.tensor([[1] * 5, [0, 0, 0, 1, 1]])
    ids = torch.tensor([prompts[0], [0, 0, 0] + prompts[1]])
    kv = RowCache(mask, capacity=16, config=tiny_model.config)
    tiny_model(input_ids=ids, logits_to_keep=1, **kv.prefill_inputs())
    kv.advance(5)
    seqs = [list(p) for p in prompts]
    cols = []

    def step(tokens):
        out = tiny_model(input_ids=torch.tensor(tokens).unsqueeze(1), **kv.step_inputs())
        cols.append(kv.length)
        kv.advance()
        for s, t in zip(seqs, tokens):
            s.append(t)
        return out.logits[:, -1]

    for t in range(6):
        step([100 + t, 200 + t])
    # erase row 0's last 4 tokens (columns 7..10): its keys stay, but are invisible
    kv.rewind(0, cols[2], position=5 + 2)
    del seqs[0][-4:]
    z = step([300, 301])
    for b in range(2):
        torch.testing.assert_close(z[b], fresh_logits(tiny_model, seqs[b]), atol=1e-4, rtol=0)
    assert kv.free_columns() == 3  # 12 columns; row 0 sees 8, row 1 sees 9 (3 are its pads)
    kv.rewind(1, cols[4] + 0, position=2 + 4)  # row 1 erases its last 3 tokens (incl. 301)
    del seqs[1][-3:]
    assert kv.free_columns() == 12 - 8
    new = kv.compact(torch.tensor([kv.length, 3]))
    assert kv.length == 8 and new.tolist() == [8, 2]  # col 3 was row 1's last pad: maps to its first token
    assert kv.visible().tolist() == [8, 6] and kv.pos.tolist() == [8, 6]
    z = step([400, 401])
    for b in range(2):
        torch.testing.assert_close(z[b], fresh_logits(tiny_model, seqs[b]), atol=1e-4, rtol=0)
    kv.select(torch.tensor([1]))
    seqs = seqs[1:]
    z = step([500])
    torch.testing.assert_close(z[0], fresh_logits(tiny_model, seqs[0]), atol=1e-4, rtol=0)


@torch.inference_mode()
def test_cache_bytes_grow_linearly_with_columns(tiny_model):
    kv = RowCache(torch.ones(2, 3, dtype=torch.long), capacity=8, config=tiny_model.config)
    tiny_model(input_ids=torch.ones(2, 3, dtype=torch.long), **kv.prefill_inputs())
    kv.advance(3)
    sizes = []
    for _ in range(4):
        tiny_model(input_ids=torch.ones(2, 1, dtype=torch.long), **kv.step_inputs())
        kv.advance()
        sizes.append(kv.nbytes())
    steps = {b - a for a, b in zip(sizes, sizes[1:])}
    cfg = tiny_model.config
    assert steps == {2 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4}

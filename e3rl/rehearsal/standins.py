"""What a rehearsal writes when the machine lacks it: a tokenizer with Qwen3's special-token layout
and chat-template features, a tiny random model of the real architecture, and data files in the
real datasets' schemas. Each is written once under the cache (atomically) and reused.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import torch

from e3rl.models import _atomic_dir
from e3rl.rehearsal.plan import StandIns
from e3rl.tasks.base import DEFAULT_INSTRUCTION

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Qwen3's layout: `<|im_end|>` ends a turn (the tokenizer's EOS), `<|endoftext|>` is the pad token
and also an EOS id of the generation config."""
THINK_TOKENS = ("<think>", "</think>")
"""Added but not special, as in Qwen3: decoded responses keep them (the reward reads `</think>`)."""
STAND_IN_VOCAB = 2048

QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
"""Qwen3's chat template, reduced to what a prompt uses: ChatML turns, and `enable_thinking: false`
closing an empty thinking block in the generation prompt (thinking on leaves it to the model)."""


# ---------------------------------------------------------------- data
def _arithmetic(rng: random.Random) -> tuple[str, int]:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(1, 9)
    kind = rng.randrange(3)
    if kind == 0:
        return f"Compute $({a} + {b}) \\times {c}$.", (a + b) * c
    if kind == 1:
        return f"Find the remainder when ${a * b + c}$ is divided by ${a}$.", (a * b + c) % a
    return f"What is the value of ${a}^2 - {b}^2$?", a * a - b * b


def stand_in_rows(schema: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` generated problems in `schema`'s columns (see plan.DATA_SCHEMAS)."""
    rng = random.Random(f"{schema}:{seed}")
    rows = []
    for i in range(n):
        q, ans = _arithmetic(rng)
        if schema == "deepmath":
            rows.append({"question": q, "final_answer": str(ans), "difficulty": float(rng.randint(1, 9)),
                         "topic": "Mathematics -> Algebra -> Prealgebra -> Integers",
                         "r1_solution_1": "...", "r1_solution_2": "...", "r1_solution_3": "..."})
        elif schema == "aime2024":
            rows.append({"id": i, "problem": q, "solution": "...", "answer": str(ans % 1000),
                         "url": "rehearsal", "year": 2024})
        elif schema == "aime2025":
            rows.append({"question": q, "answer": ans % 1000})
        elif schema == "math500":
            rows.append({"problem": q, "solution": "...", "answer": str(ans), "subject": "Prealgebra",
                         "level": rng.randint(1, 5), "unique_id": f"rehearsal/{i}.json"})
        else:
            raise ValueError(f"unknown stand-in schema {schema!r}")
    return rows


def write_data(path: Path, schema: str, n: int) -> Path:
    if path.is_file():
        return path
    rows = stand_in_rows(schema, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- tokenizer
def _corpus() -> list[str]:
    """Text the stand-in BPE is trained on: the generated problems, the instruction, digits, LaTeX."""
    text = [r["question"] for r in stand_in_rows("deepmath", 512)]
    text += [DEFAULT_INSTRUCTION, "\\boxed{}", "Let me think step by step.", "The answer is",
             " ".join(str(i) for i in range(1000)), "+ - \\times \\frac{}{} ^ = ( ) $ . , ?"]
    return text * 4


def build_tokenizer() -> Any:
    """A byte-level BPE (any text encodes) with Qwen3's special tokens, EOS/pad layout and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=STAND_IN_VOCAB, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=QWEN3_STYLE_TEMPLATE, model_max_length=131072)
    tok.add_tokens(list(THINK_TOKENS))
    return tok


# ---------------------------------------------------------------- model
def _survival(model: torch.nn.Module, ids: torch.Tensor, start: int, ends: list[int], chunk: int = 256) -> float:
    """Mean over rows of P(no end token in the response ids[:, start:]), read off one forward:
    the product of each position's 1 - P(end)."""
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        head = model.get_output_embeddings().weight
        log_live = torch.zeros(ids.shape[0])
        for a in range(start - 1, ids.shape[1] - 1, chunk):
            logits = (hidden[:, a:min(a + chunk, ids.shape[1] - 1)] @ head.T).float().log_softmax(-1)
            p_end = logits[..., ends].exp().sum(-1).clamp(max=1 - 1e-7)
            log_live += torch.log1p(-p_end).sum(-1)
    return float(log_live.exp().mean())


def _ids_of(model: torch.nn.Module, prompt: list[int], rows: int, length: int, ends: list[int]) -> torch.Tensor:
    start = torch.tensor([prompt] * rows)
    with torch.no_grad():
        return model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, max_new_tokens=length,
                              min_new_tokens=length, pad_token_id=ends[0], suppress_tokens=ends, top_k=None, top_p=None)


def calibrate_eos(model: torch.nn.Module, prompts: list[list[int]], eos: int, ends: list[int], length: int,
                  survive: float, rows: int = 8, rounds: int = 2, seed: int = 0) -> float:
    """Scale the EOS row of the output embedding so that a share `survive` of responses runs `length`
    tokens without an end token: a random model then ends some responses with EOS and leaves others
    truncated, with no change to either engine.

    By an identity, not a fit: scaling one logit leaves the other tokens' relative probabilities
    alone, so the responses that survive are the model's EOS-suppressed samples, and P(survive) is
    the mean over those samples of the product of 1 - P(end) along them. With tied embeddings the
    prompt's EOS input row moves with the scale, so the samples are drawn again at the scale found
    (`rounds`). Survival differs a lot between rows (a random model wanders into states where EOS
    is likely, or not), hence `rows` samples for each of several prompts. Returns the scale."""
    torch.manual_seed(seed)
    head = model.get_output_embeddings().weight
    row = head[eos].detach().clone()
    scale = 1.0
    for _ in range(rounds):
        samples = [(_ids_of(model, p, rows, length, ends), len(p)) for p in prompts]
        lo, hi = 0.0, math.log(64.0)
        for _ in range(16):
            mid = (lo + hi) / 2
            with torch.no_grad():
                head[eos].copy_(row * math.exp(mid))
            alive = sum(_survival(model, ids, start, ends) for ids, start in samples) / len(samples)
            lo, hi = (mid, hi) if alive > survive else (lo, mid)
        scale = math.exp((lo + hi) / 2)
        with torch.no_grad():
            head[eos].copy_(row * scale)
    return scale


def calibration_prompts(tok: Any, n: int = 8) -> list[list[int]]:
    """Chat-templated stand-in questions with the default instruction: prompts like a rehearsal's."""
    out = []
    for r in stand_in_rows("deepmath", n, seed=1):
        text = tok.apply_chat_template([{"role": "user", "content": f"{r['question']} {DEFAULT_INSTRUCTION}"}],
                                       tokenize=False, add_generation_prompt=True)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def write_model(s: StandIns, seed: int = 0) -> Path:
    """The tiny model dir: config + safetensors + generation config (EOS ids as Qwen3's), with the
    stand-in tokenizer saved beside it when there is no real one."""
    out = s.model_dir
    assert out is not None
    if (out / "config.json").is_file():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(s.tokenizer) if s.tokenizer else build_tokenizer()
    kw = dict(s.arch)
    model_type = kw.pop("model_type")
    kw.pop("architectures", None)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    if not s.tokenizer or "vocab_size" not in kw:
        kw["vocab_size"] = len(tok)
    config = AutoConfig.for_model(model_type, **kw, bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ends = sorted({eos, pad})
    calibrate_eos(model, calibration_prompts(tok), eos, ends, s.eos_tokens, s.eos_survive, seed=seed)
    gen = GenerationConfig(eos_token_id=ends, pad_token_id=pad, bos_token_id=tok.bos_token_id)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        gen.save_pretrained(tmp)
        if not s.tokenizer:
            tok.save_pretrained(tmp)

    return _atomic_dir(out, write)


def write_stand_ins(s: StandIns) -> None:
    for path, (schema, rows) in s.data.items():
        write_data(Path(path), schema, rows)
    if s.model_dir is not None:
        write_model(s)

"""The chunked log-prob/entropy kernel equals the core's reference (values and grads, fp32 and
bf16) and, unlike it, never saves or allocates an fp32 [N, V] tensor."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from e3rl.core.surprisal import token_entropy, token_logprobs
from learner.chunked_logprobs import default_chunk_tokens, token_logprobs_chunked

N, V = 37, 50
TEMPS = (0.0, 1.0, 0.7)


def _inputs(n: int = N, v: int = V, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, v, generator=g)).to(dtype)
    tokens = torch.randint(0, v, (n,), generator=g)
    return logits, tokens


def _upstream(n: int = N, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(n, generator=g)
    up[::3] = 0.0  # masked (pad) rows
    return up


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("temperature", TEMPS)
@pytest.mark.parametrize("chunk", [8, 64])  # 8 does not divide 37; 64 >= N
def test_fp32_forward_matches_reference(temperature, chunk):
    logits, tokens = _inputs()
    logp, ent = token_logprobs_chunked(logits, tokens, temperature, chunk_tokens=chunk, with_entropy=True)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == (N,)
    _close(logp, token_logprobs(logits, tokens, temperature))
    _close(ent, token_entropy(logits, temperature))
    only, none = token_logprobs_chunked(logits, tokens, temperature, chunk_tokens=chunk)
    assert none is None and torch.equal(only, logp)
    assert torch.equal(logits, _inputs()[0]), "the input logits must not be modified"


@pytest.mark.parametrize("temperature", TEMPS)
@pytest.mark.parametrize("chunk", [8, 64])
def test_fp32_grad_matches_reference(temperature, chunk):
    logits, tokens = _inputs()
    up = _upstream()
    ref_in, ours_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    (token_logprobs(ref_in, tokens, temperature) * up).sum().backward()
    logp, ent = token_logprobs_chunked(ours_in, tokens, temperature, chunk_tokens=chunk, with_entropy=True)
    assert not ent.requires_grad, "entropy is a metric: no gradient"
    (logp * up).sum().backward()
    _close(ours_in.grad, ref_in.grad)
    assert torch.all(ours_in.grad[up == 0] == 0), "masked rows get exactly zero grad"


@pytest.mark.parametrize("temperature", TEMPS)
def test_gradcheck_float64(temperature):
    logits, tokens = _inputs(n=7, v=6, dtype=torch.float64)
    logits.requires_grad_()
    fn = lambda x: token_logprobs_chunked(x, tokens, temperature, chunk_tokens=3, with_entropy=True)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("temperature", TEMPS)
def test_bf16_forward_and_grad(temperature):
    logits, tokens = _inputs(dtype=torch.bfloat16)
    up = _upstream()
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    logp, ent = token_logprobs_chunked(ours_in, tokens, temperature, chunk_tokens=8, with_entropy=True)
    assert logp.dtype == ent.dtype == torch.float32
    # same fp32 values in, only the accumulation order differs
    _close(logp, token_logprobs(logits.float(), tokens, temperature))
    _close(ent, token_entropy(logits.float(), temperature))
    (logp * up).sum().backward()
    (token_logprobs(ref_in, tokens, temperature) * up).sum().backward()  # grad arrives as bf16 via .float()
    assert ours_in.grad.dtype == torch.bfloat16 and ref_in.grad.dtype == torch.bfloat16
    # both round an (almost) identical fp32 grad to bf16: at most one bf16 ulp apart
    torch.testing.assert_close(ours_in.grad.float(), ref_in.grad.float(), atol=1e-7, rtol=2 ** -7)
    assert torch.all(ours_in.grad[up == 0] == 0)


def test_batched_shape():
    b, s = 3, 5
    logits, tokens = _inputs(n=b * s)
    logits, tokens = logits.view(b, s, V).requires_grad_(), tokens.view(b, s)
    logp, ent = token_logprobs_chunked(logits, tokens, 0.7, chunk_tokens=4, with_entropy=True)
    assert logp.shape == ent.shape == (b, s)
    _close(logp, token_logprobs(logits.detach(), tokens, 0.7))
    _close(ent, token_entropy(logits.detach(), 0.7))
    logp.sum().backward()
    assert logits.grad.shape == (b, s, V)


def test_empty_input():
    logits = torch.zeros(0, V, requires_grad=True)
    logp, ent = token_logprobs_chunked(logits, torch.zeros(0, dtype=torch.long), 0.7, chunk_tokens=8, with_entropy=True)
    assert logp.shape == ent.shape == (0,)
    logp.sum().backward()
    assert logits.grad.shape == (0, V)


def test_default_chunk_is_about_64mb():
    assert default_chunk_tokens(152064) == 110  # 110 * 152064 * 4 B ~= 64 MiB
    assert default_chunk_tokens(1) >= 1 and default_chunk_tokens(10 ** 9) == 1


# ------------------------------------------------------------------ memory
def _saved_fp32_sizes(fn) -> list[int]:
    """numel of every fp32 tensor autograd saves while building the graph of fn()."""
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.float32:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


@pytest.mark.parametrize("temperature", (1.0, 0.7))
def test_no_fp32_nv_tensor_is_saved(temperature):
    logits, tokens = _inputs(dtype=torch.bfloat16)
    logits.requires_grad_()
    ref = _saved_fp32_sizes(lambda: token_logprobs(logits, tokens, temperature))
    assert N * V in ref, "the reference saves its fp32 log_softmax output (the point of this kernel)"
    ours = _saved_fp32_sizes(lambda: token_logprobs_chunked(logits, tokens, temperature, chunk_tokens=8,
                                                            with_entropy=True))
    assert ours and max(ours) == N, f"only the fp32 logsumexp [N] may be saved, got sizes {ours}"


class _LargestFp32(TorchDispatchMode):
    """Largest fp32 tensor any aten op produces while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("with_entropy", (False, True))
def test_largest_fp32_allocation_is_one_chunk(with_entropy):
    chunk = 8
    logits, tokens = _inputs(dtype=torch.bfloat16)
    ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    with _LargestFp32() as mode:
        logp, _ = token_logprobs_chunked(ours, tokens, 0.7, chunk_tokens=chunk, with_entropy=with_entropy)
        logp.sum().backward()
    assert ours.grad is not None and mode.largest == chunk * V
    with _LargestFp32() as mode:
        token_logprobs(ref, tokens, 0.7).sum().backward()
    assert ref.grad is not None and mode.largest == N * V

"""SWA op (``swa`` baseline): backends against a brute-force dense implementation written here."""

from __future__ import annotations

import random

import pytest
import torch

from ksa_rec.ops.swa import sliding_window_attention
from ksa_rec.utils.jagged import lengths_to_offsets

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


def swa_dense(q, k, v, offsets, window_tokens, scale=None):
    """Per user: full score matrix, mask ``0 <= i - j <= w``, softmax. O(n^2); obviously right."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    outs = [q[:0]]
    for b in range(offsets.numel() - 1):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        i = torch.arange(hi - lo)
        visible = (i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] <= window_tokens)
        scores = torch.einsum("qhd,khd->hqk", q[lo:hi], k[lo:hi]) * scale
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, v[lo:hi]))
    return torch.cat(outs)


def make_inputs(lengths, heads, kv_heads, dtype, seed, D=8):
    gen = torch.Generator().manual_seed(seed)
    offsets = lengths_to_offsets(torch.tensor(lengths, dtype=torch.int64))
    T = int(offsets[-1])
    q = torch.randn(T, heads, D, generator=gen, dtype=dtype).requires_grad_()
    k, v = (torch.randn(T, kv_heads, D, generator=gen, dtype=dtype).requires_grad_() for _ in range(2))
    return (q, k, v), offsets


def forward_backward(fn, inputs, offsets, seed, **kwargs):
    out = fn(*inputs, offsets, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    # same draws for every dtype
    cotangent = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    return out.detach(), torch.autograd.grad((out * cotangent).sum(), inputs)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("window_tokens", [0, 1, 5, 64, 1000])
def test_torch_backend_matches_dense(window_tokens, dtype, seed):
    rng = random.Random(seed)
    lengths = [0, 1, 2, 7, rng.randint(0, 40), rng.randint(150, 400)]
    rng.shuffle(lengths)
    heads, kv_heads = rng.choice([(2, 2), (4, 2), (3, 1)])
    inputs, offsets = make_inputs(lengths, heads, kv_heads, dtype, seed)
    kwargs = dict(window_tokens=window_tokens)
    out, grads = forward_backward(sliding_window_attention, inputs, offsets, seed, **kwargs)
    ref, ref_grads = forward_backward(swa_dense, inputs, offsets, seed, **kwargs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("window_tokens", [0, 3, 100])
def test_flex_backend_forward_matches_dense_on_cpu(window_tokens, dtype):
    inputs, offsets = make_inputs([5, 0, 130, 1, 17], 4, 2, dtype, 0)
    with torch.no_grad():
        out = sliding_window_attention(*inputs, offsets, window_tokens=window_tokens, backend="flex")
        ref = swa_dense(*inputs, offsets, window_tokens)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_long_user_blockwise_matches_dense_and_scale_is_used():
    inputs, offsets = make_inputs([3000], 2, 2, torch.float64, 1, D=16)
    with torch.no_grad():
        out = sliding_window_attention(*inputs, offsets, window_tokens=256, scale=0.2, backend="torch")
        ref = swa_dense(*inputs, offsets, 256, scale=0.2)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])


def test_window_bounds_what_an_event_sees():
    """Event i changes when j in [i - w, i] changes, and only then."""
    inputs, offsets = make_inputs([30], 2, 2, torch.float64, 2)
    w, j = 4, 10
    with torch.no_grad():
        out = sliding_window_attention(*inputs, offsets, window_tokens=w)
        moved = [x.clone() for x in inputs]
        for x in moved:
            x[j] += 1.0
        out2 = sliding_window_attention(*moved, offsets, window_tokens=w)
    changed = (out != out2).flatten(1).any(dim=1)
    assert changed.tolist() == [j <= i <= j + w for i in range(30)]


@pytest.mark.parametrize("lengths", [[], [0, 0]], ids=["B=0", "empty-users"])
def test_no_events(lengths):
    inputs, offsets = make_inputs(lengths, 2, 2, torch.float32, 0)
    out = sliding_window_attention(*inputs, offsets, window_tokens=3)
    assert out.shape == (0, 2, 8)
    out.sum().backward()
    assert inputs[0].grad.shape == (0, 2, 8)


INVALID = [
    ("window-negative", dict(window_tokens=-1), "window_tokens must be >= 0, got -1"),
    ("window-float", dict(window_tokens=2.5), "window_tokens must be an int, got 2.5"),
    ("backend", dict(backend="cuda"), "backend must be None \\(auto\\) or one of \\('torch', 'flex', 'triton'\\)"),
    ("scale", dict(scale=float("inf")), "scale must be a finite float or None"),
    ("offsets", dict(offsets=torch.tensor([0, 4, 9])), "offsets\\[-1\\] = 9 does not match the 10 rows"),
    ("k-heads", dict(k=torch.zeros(10, 3, 8)), "k has 3 heads, which must divide q's 2 heads"),
    ("v-shape", dict(v=torch.zeros(10, 2, 4)), "v must have shape \\(10, 2, 8\\)"),
    ("q-dtype", dict(q=torch.zeros(10, 2, 8, dtype=torch.float16)), "k has dtype torch.float32, but q has"),
]


@pytest.mark.parametrize("changes, match", [(c, m) for _, c, m in INVALID], ids=[i for i, _, _ in INVALID])
def test_invalid_input_is_a_one_line_value_error(changes, match):
    args = dict(q=torch.zeros(10, 2, 8), k=torch.zeros(10, 2, 8), v=torch.zeros(10, 2, 8),
                offsets=torch.tensor([0, 4, 10]), window_tokens=3)
    args.update(changes)
    with pytest.raises(ValueError, match=f"^sliding_window_attention: {match}") as err:
        sliding_window_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("offsets"), **args)
    assert "\n" not in str(err.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_flex_matches_dense():
    inputs, offsets = make_inputs([5, 0, 700, 1, 130], 4, 2, torch.float32, 0, D=32)
    cuda = [x.detach().cuda().requires_grad_() for x in inputs]
    out, grads = forward_backward(sliding_window_attention, cuda, offsets.cuda(), 0, window_tokens=64)
    ref, ref_grads = forward_backward(swa_dense, [x.detach().double().requires_grad_() for x in inputs],
                                      offsets, 0, window_tokens=64)
    for a, b in zip([out, *grads], [ref, *ref_grads]):
        torch.testing.assert_close(a.cpu().double(), b, atol=1e-4, rtol=1e-4)

"""Full causal attention (``ksa_rec.ops.causal``): every path against a per-user float64 oracle, forward and
backward, on odd jagged batches; and the rule that picks the path (``resolve_full_path``).

CPU runs the paths that exist there (dense, padded, the KSA op's full rule on its torch backend); ``-m gpu``
runs varlen flash and the KSA op on Triton at training sizes against the same oracle.
"""

from __future__ import annotations

import pytest
import torch

from ksa_rec.ops.backend import resolve_full_path, triton_import_error, varlen_causal_kwargs
from ksa_rec.ops.causal import causal_attention
from ksa_rec.utils.jagged import lengths_to_offsets

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def _oracle(q, k, v, lengths):
    """Each user on its own: softmax(q k^T / sqrt(D) + causal mask) v in float64, GQA by repeating k/v."""
    q, k, v = (x.double() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (x[start:start + n].transpose(0, 1) for x in (q, k, v))  # [H, n, D]
        scores = qs @ ks.transpose(1, 2) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(outs)


def _inputs(lengths, heads, kv_heads, dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, dim, generator=gen)
    k, v = (torch.randn(total, kv_heads, dim, generator=gen) for _ in range(2))
    grad = torch.randn(total, heads, dim, generator=gen)
    leaves = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
    return leaves, grad.to(device, dtype), lengths_to_offsets(torch.tensor(lengths)).to(device)


def _check(path, lengths, heads=3, kv_heads=3, dim=16, dtype=torch.float64, device=CPU, tol=1e-10):
    (q, k, v), grad, offsets = _inputs(lengths, heads, kv_heads, dim, dtype, device)
    out = causal_attention(q, k, v, offsets, max_len=max(lengths), path=path)
    out.backward(grad)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = _oracle(q64, k64, v64, lengths)
    want.backward(grad.double())
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    for got, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)


ODD = [7, 1, 0, 13, 5]  # an empty user, a single event, lengths that fill no tile


@pytest.mark.parametrize("path", ["padded", "ksa"])
@pytest.mark.parametrize("kv_heads", [3, 1])
def test_jagged_paths_equal_the_oracle(path, kv_heads):
    _check(path, ODD, kv_heads=kv_heads)


@pytest.mark.parametrize("path", ["dense", "padded", "ksa"])
def test_uniform_paths_equal_the_oracle(path):
    _check(path, [6, 6, 6])


def test_dense_path_refuses_a_jagged_batch():
    (q, k, v), _, offsets = _inputs(ODD, 2, 2, 8, torch.float32, CPU)
    with pytest.raises(ValueError, match="path 'dense' needs 5 users of 13 events, got 26 rows"):
        causal_attention(q, k, v, offsets, path="dense")


def test_unknown_path_is_refused():
    (q, k, v), _, offsets = _inputs(ODD, 2, 2, 8, torch.float32, CPU)
    with pytest.raises(ValueError, match="path must be one of dense, varlen, ksa, padded, got 'sparse'"):
        causal_attention(q, k, v, offsets, path="sparse")


def test_the_rule():
    # no padding: the dense kernels on a view, on every device and dtype
    assert resolve_full_path(CPU, torch.float32, 12, 3, 4, 16, True) == "dense"
    assert resolve_full_path(CUDA, torch.bfloat16, 12, 3, 4, 16, True) == "dense"
    # padding on CPU: pad and SDPA
    assert resolve_full_path(CPU, torch.float32, 11, 3, 4, 16, True) == "padded"
    assert resolve_full_path(CPU, torch.bfloat16, 11, 3, 4, 16, True) == "padded"
    # padding on CUDA: the jagged kernels (the KSA op where varlen flash cannot take the inputs)
    ksa = "ksa" if triton_import_error() is None else "padded"  # the KSA op's full rule needs Triton
    half = "varlen" if varlen_causal_kwargs() is not None else ksa
    assert resolve_full_path(CUDA, torch.bfloat16, 11, 3, 4, 16, True) == half
    assert resolve_full_path(CUDA, torch.float16, 11, 3, 4, 64, True) == half
    assert resolve_full_path(CUDA, torch.float32, 11, 3, 4, 16, True) == ksa
    assert resolve_full_path(CUDA, torch.bfloat16, 11, 3, 4, 16, False) == ksa  # GQA
    assert resolve_full_path(CUDA, torch.bfloat16, 11, 3, 4, 12, True) == ksa  # head dim not a multiple of 8
    assert resolve_full_path(CUDA, torch.float32, 11, 3, 4, 256, True) == "padded"  # beyond the KSA kernel's 128
    # the layer's backend: another than Triton keeps the KSA kernel out (varlen is torch's own kernel)
    assert resolve_full_path(CUDA, torch.float32, 11, 3, 4, 16, True, "triton") == ksa
    assert resolve_full_path(CUDA, torch.float32, 11, 3, 4, 16, True, "torch") == "padded"
    assert resolve_full_path(CUDA, torch.float32, 11, 3, 4, 16, True, "flex") == "padded"
    assert resolve_full_path(CUDA, torch.bfloat16, 11, 3, 4, 16, True, "torch") == (
        "varlen" if varlen_causal_kwargs() is not None else "padded")


def test_the_causal_flag_of_this_torch():
    kwargs = varlen_causal_kwargs()
    if kwargs is None:  # torch without the module (before 2.10): then varlen is never chosen
        with pytest.raises(ImportError):
            import torch.nn.attention.varlen  # noqa: F401
    else:
        assert kwargs in ({"is_causal": True}, {"window_size": (-1, 0)})


GPU_LENGTHS = [200, 37, 1, 0, 129, 200, 64, 3, 511]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_on_gpu(dtype):
    if varlen_causal_kwargs() is None:
        pytest.fail(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    _check("varlen", GPU_LENGTHS, heads=4, kv_heads=4, dim=32, dtype=dtype, device=CUDA, tol=3e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-2), (torch.bfloat16, 3e-2)])
def test_ksa_full_rule_on_gpu(dtype, tol):
    _check("ksa", GPU_LENGTHS, heads=4, kv_heads=2, dim=32, dtype=dtype, device=CUDA, tol=tol)


@pytest.mark.gpu
@gpu
def test_the_rule_runs_varlen_for_a_jagged_bf16_batch_on_gpu():
    (q, k, v), _, offsets = _inputs(GPU_LENGTHS, 4, 4, 32, torch.bfloat16, CUDA)
    assert resolve_full_path(q.device, q.dtype, q.shape[0], len(GPU_LENGTHS), max(GPU_LENGTHS), 32, True) == "varlen"
    torch.testing.assert_close(causal_attention(q, k, v, offsets), causal_attention(q, k, v, offsets, path="padded"),
                               atol=3e-2, rtol=3e-2)


@pytest.mark.slow
def test_ksa_path_on_triton_shares_the_callers_block_tables(monkeypatch):
    """The full layers of one pass (the KSA op's full rule on Triton; the interpreter on CPU) build the kernel's
    block tables once, and give the oracle's results."""
    from ksa_rec.ops.ksa import triton_op

    built = []
    original_init = triton_op._Plan.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(triton_op._Plan, "__init__", counting_init)
    (q, k, v), _, offsets = _inputs(ODD, 2, 2, 16, torch.float32, CPU)
    tables = {}
    outs = [causal_attention(q, k, v, offsets, path="ksa", backend="triton", tables=tables) for _ in range(2)]
    assert len(built) == 1
    want = _oracle(q, k, v, ODD)
    for out in outs:
        torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)

"""``ksa_rec.ops.norm``: the fused residual-add + RMSNorm Triton kernel against its torch peer.

CPU: the kernels run under the Triton interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``) on odd row
counts and widths that are not powers of two; CUDA: the same, compiled, plus an autocast training pass of a
whole encoder. Forward and backward (both inputs and the weight) against the reference in float64.
"""

from __future__ import annotations

import os

import pytest
import torch

from ksa_rec.errors import BackendError
from ksa_rec.modules.config import EncoderConfig
from ksa_rec.modules.encoder import SequenceEncoder
from ksa_rec.ops.backend import resolve_fused_backend
from ksa_rec.ops.norm import add_rms_norm, add_rms_norm_reference
from ksa_rec.ops.norm.triton_norm import add_rms_norm_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Float32 math on both sides; bf16 outputs differ by rounding (one bf16 ulp of values up to ~4).
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _case(rows: int, dim: int, x_dtype, residual_dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, dim, generator=g) * 3).to(x_dtype).to(DEVICE).requires_grad_()
    residual = None if residual_dtype is None else torch.randn(rows, dim, generator=g).to(residual_dtype).to(DEVICE)
    weight = (1 + 0.3 * torch.randn(dim, generator=g)).to(DEVICE).requires_grad_()
    if residual is not None:
        residual.requires_grad_()
    return x, residual, weight


def _grads(fn, x, residual, weight, seed):
    s, y = fn(x, weight, 1e-6, residual)
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(y.shape, generator=g).to(y.dtype).to(DEVICE)
    outputs, cotangents = [y], [dy]
    if residual is not None:  # the sum feeds the next residual: its gradient flows back too
        outputs.append(s)
        cotangents.append(torch.randn(s.shape, generator=g).to(s.dtype).to(DEVICE))
    inputs = [x, weight] + ([residual] if residual is not None else [])
    return (s, y), torch.autograd.grad(outputs, inputs, cotangents)


@pytest.mark.parametrize("rows,dim", [(1, 16), (37, 64), (130, 48), (257, 80), (65, 256)])
@pytest.mark.parametrize("x_dtype,residual_dtype", [(torch.float32, None), (torch.float32, torch.float32),
                                                    (torch.float32, torch.bfloat16), (torch.bfloat16, None),
                                                    (torch.bfloat16, torch.bfloat16)])
def test_kernel_matches_the_reference_forward_and_backward(rows, dim, x_dtype, residual_dtype):
    seed = rows * 1000 + dim
    x, residual, weight = _case(rows, dim, x_dtype, residual_dtype, seed)
    (s, y), grads = _grads(add_rms_norm_triton, x, residual, weight, seed)

    def oracle(x, weight, eps, residual):  # the reference in float64, rounded to the dtypes the op returns
        s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        s = (x if residual is None else x + residual).to(s_dtype)
        s64, y64 = add_rms_norm_reference(s.double(), weight.double(), eps)
        return s, y64.to(s_dtype)

    (s_ref, y_ref), grads_ref = _grads(oracle, x, residual, weight, seed)
    tol = TOL[y.dtype]
    assert s.dtype == s_ref.dtype and y.dtype == y_ref.dtype
    # Exact in float32; in bf16 one ulp (the interpreter's float32 -> bf16 cast truncates, CUDA's rounds)
    ulp = 0 if s.dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(s.float(), s_ref.float(), rtol=ulp, atol=0)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)
    for name, got, want in zip(["x", "weight", "residual"], grads, grads_ref):
        assert got.dtype == want.dtype, name
        scale = want.abs().max().item() + 1
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * scale, msg=name)


def test_weight_gradient_is_deterministic():
    x, residual, weight = _case(301, 64, torch.float32, torch.bfloat16, 7)
    first = _grads(add_rms_norm_triton, x, residual, weight, 7)[1]
    again = _grads(add_rms_norm_triton, x, residual, weight, 7)[1]
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_empty_input():
    x, residual, weight = _case(0, 64, torch.float32, torch.float32, 3)
    s, y = add_rms_norm_triton(x, weight, 1e-6, residual)
    assert s.shape == y.shape == (0, 64)
    (s.sum() + y.sum()).backward()
    assert weight.grad is not None and torch.equal(weight.grad, torch.zeros_like(weight))


def test_backend_rule():
    assert resolve_fused_backend(None, torch.device("cpu"), torch.float32, "norm") == "torch"
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert resolve_fused_backend("triton", torch.device("cpu"), torch.float32, "norm") == "triton"
    else:
        with pytest.raises(BackendError, match="norm backend 'triton' needs a CUDA device"):
            resolve_fused_backend("triton", torch.device("cpu"), torch.float32, "norm")
    if torch.cuda.is_available():
        assert resolve_fused_backend(None, torch.device("cuda"), torch.bfloat16, "norm") == "triton"
        assert resolve_fused_backend(None, torch.device("cuda"), torch.float64, "norm") == "torch"
    with pytest.raises(BackendError, match="norm backend must be"):
        resolve_fused_backend("flex", torch.device("cpu"), torch.float32, "norm")
    with pytest.raises(ValueError, match="encoder.norm_backend"):
        EncoderConfig(norm_backend="cuda")


def test_dispatcher_runs_the_requested_peer():
    x, residual, weight = _case(19, 32, torch.float32, torch.float32, 5)
    for backend in ("torch", "triton"):
        s, y = add_rms_norm(x, weight, None, residual, backend=backend)
        s_ref, y_ref = add_rms_norm_reference(x, weight, torch.finfo(torch.float32).eps, residual)
        torch.testing.assert_close(y, y_ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("pattern", ["ksa,full", "sca,swa"])
def test_encoder_trains_the_same_with_either_norm(pattern):
    """A whole encoder (every norm, the fused add in each block) with the kernel equals it with torch's norm:
    outputs and every parameter's gradient."""
    lengths = [13, 1, 29]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(sum(lengths), 32, generator=g).to(DEVICE)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        enc = SequenceEncoder(EncoderConfig(pattern=pattern, dim=32, num_heads=2, dropout=0.0, chunk_size=4, window=2,
                                            norm_backend=backend)).to(DEVICE)
        out = enc(tokens, offsets, positions)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in enc.named_parameters() if p.grad is not None}))
    (out_t, grads_t), (out_k, grads_k) = results
    torch.testing.assert_close(out_k, out_t, rtol=1e-4, atol=1e-4)
    assert grads_t.keys() == grads_k.keys() and any("norm" in n for n in grads_t)
    for name in grads_t:
        torch.testing.assert_close(grads_k[name], grads_t[name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_training_pass_matches_torch_norm_on_cuda():
    """bf16 autocast, the encoder on the default backends (Triton norm) against the torch norm."""
    lengths = [300, 17, 1024]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    tokens = torch.randn(sum(lengths), 64, device="cuda")
    positions = torch.cat([torch.arange(n) for n in lengths]).cuda()
    results = []
    for backend in ("torch", None):
        torch.manual_seed(0)
        enc = SequenceEncoder(EncoderConfig(pattern="ksa*3,full", dim=64, num_heads=4, dropout=0.0,
                                            norm_backend=backend)).cuda()
        with torch.autocast("cuda", torch.bfloat16):
            out = enc(tokens, offsets, positions)
        out.float().square().mean().backward()
        results.append((out.float().detach(), {n: p.grad.float() for n, p in enc.named_parameters()
                                                if p.grad is not None}))
    (out_t, grads_t), (out_k, grads_k) = results
    torch.testing.assert_close(out_k, out_t, rtol=3e-2, atol=3e-2)
    for name in grads_t:
        scale = grads_t[name].abs().max().item() + 1e-6
        torch.testing.assert_close(grads_k[name], grads_t[name], rtol=5e-2, atol=5e-2 * scale, msg=name)

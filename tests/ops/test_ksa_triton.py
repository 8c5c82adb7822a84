"""KSA Triton kernels (``ksa_rec/ops/ksa/triton_op.py``) against the dense oracle ``ksa_dense``.

CPU: the kernels run under the Triton interpreter at small sizes (D=16, 1-2 heads, 16-row tiles via
a test-only ``KsaTritonConfig``); ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything
imports triton (Triton picks interpreter or compiler when a kernel is decorated).
CUDA: the same tests compiled, plus ``-m gpu`` ones at full sizes with the default tiles, bf16 and
fp16 under the 2x rule, and bitwise determinism.

Every case checks forward and backward for all six inputs against ``ksa_dense`` in float64, with
outputs and gradients pre-filled with NaN (``nan_fill``) so an element no program wrote fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ksa_rec.ops.ksa import KsaRule, triton_op
from ksa_rec.ops.ksa.dense import ksa_dense
from ksa_rec.ops.ksa.layout import summary_offsets
from ksa_rec.utils.jagged import lengths_to_offsets

_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if _CUDA else "cpu"

pytestmark = pytest.mark.slow  # the kernels under the Triton interpreter take about a minute


def _small_config(**overrides) -> "triton_op.KsaTritonConfig":
    base = dict(block_m=16, block_n=16, dkdv_block_n=16, dkdv_block_m=16, dq_block_m=16,
                dq_block_n=16, fwd_warps=4, dkdv_warps=4, dq_warps=4, fwd_stages=1, dkdv_stages=1, dq_stages=1,
                nan_fill=True)
    base.update(overrides)
    return triton_op.KsaTritonConfig(**base)


def _inputs(lengths, chunk, sums, heads=2, kv_heads=None, dim=16, seed=0):
    """Random float64 leaves ``(q, k, v, q_sum, k_sum, v_sum)`` and offsets for the given user lengths."""
    kv_heads = heads if kv_heads is None else kv_heads
    gen = torch.Generator().manual_seed(seed)
    offsets = lengths_to_offsets(torch.tensor(lengths, dtype=torch.int64))
    T = int(offsets[-1])
    Ts = int(summary_offsets(offsets, chunk, sums)[-1])
    shapes = [(T, heads), (T, kv_heads), (T, kv_heads), (Ts, heads), (Ts, kv_heads), (Ts, kv_heads)]
    tensors = [torch.randn(r, h, dim, generator=gen, dtype=torch.float64).to(DEVICE) for r, h in shapes]
    return tensors, offsets.to(DEVICE)


def _oracle(tensors, offsets, grads, **kw):
    """ksa_dense (k/v heads repeated for grouped-query attention): outputs and input gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    group = leaves[0].shape[1] // leaves[1].shape[1]
    args = [t.repeat_interleave(group, 1) if i in (1, 2, 4, 5) else t for i, t in enumerate(leaves)]
    out = ksa_dense(*args, offsets, **kw)
    _backward(out, grads)
    return [o.detach() for o in out], [t.grad for t in leaves]


def _rule(chunk_size, window, summary_tokens=1, max_summaries=None, window_unit=None) -> KsaRule:
    return KsaRule(chunk_size, window, summary_tokens, max_summaries, window_unit)


def _kernel(tensors, offsets, grads, dtype, config, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    out = triton_op.ksa_attention_triton(*leaves, offsets, _rule(**kw), config=config)
    _backward(out, [g.to(dtype) for g in grads])
    return [o.detach() for o in out], [t.grad for t in leaves]


def _backward(out, grads):
    loss = sum((o * g).sum() for o, g in zip(out, grads))
    if loss.requires_grad:
        loss.backward()


def _check_fp32(lengths, *, chunk, window, sums, max_summaries=None, config=None, heads=2, kv_heads=None, dim=16,
                seed=0, window_unit=None):
    tensors, offsets = _inputs(lengths, chunk, sums, heads, kv_heads, dim, seed)
    kw = dict(chunk_size=chunk, window=window, summary_tokens=sums, max_summaries=max_summaries,
              window_unit=window_unit)
    gen = torch.Generator().manual_seed(seed + 1)
    grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(DEVICE) for t in (tensors[0], tensors[3])]
    want_out, want_grad = _oracle(tensors, offsets, grads, **kw)
    got_out, got_grad = _kernel(tensors, offsets, grads, torch.float32, config or _small_config(), **kw)
    names = ["out", "out_sum", "dq", "dk", "dv", "dq_sum", "dk_sum", "dv_sum"]
    for name, got, want in zip(names, got_out + got_grad, want_out + want_grad):
        assert got.dtype == torch.float32, name
        assert torch.isfinite(got).all(), f"{name}: non-finite (an element no program wrote?)"
        # fp32 kernel vs float64 oracle: observed errors ~1e-6 at these sizes
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# k = 4, W = 3: empty users, 1, k-1, k, k+1, a multiple of k, non-multiples of the 16-row tile, and
# users longer than (W + 2) * k = 20 (their events see summaries)
MIXED = [0, 1, 3, 4, 5, 12, 37, 45, 0]


@pytest.mark.parametrize("sums", [0, 1, 2])
@pytest.mark.parametrize("window", [0, 1, 3, 100, None])
def test_matches_dense(window, sums):
    # one head keeps the interpreter fast; the other tests use two (head strides, GQA 2:1)
    _check_fp32(MIXED, chunk=4, window=window, sums=sums, heads=1)


@pytest.mark.parametrize("window,sums", [(0, 1), (1, 2), (3, 1)])
def test_max_summaries(window, sums):
    _check_fp32(MIXED, chunk=4, window=window, sums=sums, max_summaries=2)


@pytest.mark.parametrize("window,max_summaries", [(1, None), (0, 3)])
def test_atomic_dq(window, max_summaries):
    _check_fp32(MIXED, chunk=4, window=window, sums=1, max_summaries=max_summaries,
                config=_small_config(deterministic=False))


def test_odd_chunk_and_tiles_not_multiple_of_chunk():
    # k = 3 never divides the 16-row tiles: band edges fall inside tiles
    _check_fp32([2, 3, 17, 40, 29], chunk=3, window=2, sums=1, max_summaries=4)


@pytest.mark.parametrize("chunk", [16, 40])
def test_chunks_as_long_as_or_longer_than_tiles(chunk):
    # a forward / dQ program computes the summary queries of the chunks that END in its 16-row block:
    # k = 16 (one a block), 40 (a chunk across three blocks, neither size divides the other)
    _check_fp32([chunk - 1, chunk + 1, 3 * chunk + 5], chunk=chunk, window=1, sums=2, heads=1)


def test_larger_tiles_than_users():
    # 32-row query tiles with 16-row key tiles (and 32/16 in backward): several chunks per tile
    _check_fp32(MIXED, chunk=4, window=1, sums=2,
                config=_small_config(block_m=32, dkdv_block_n=32, dq_block_m=32))


def test_grouped_query_attention():
    _check_fp32(MIXED, chunk=4, window=1, sums=1, heads=2, kv_heads=1)


def test_padded_head_dim():
    # D = 20 is zero-padded to 32 inside the op; the scale stays 20 ** -0.5
    _check_fp32([9, 30], chunk=4, window=1, sums=1, dim=20)


@pytest.mark.parametrize("sums", [0, 1, 2])
def test_token_window_with_and_without_summaries(sums):
    """The swa kind's rule: events see the last W events (window_unit 1), summaries their own chunk."""
    _check_fp32(MIXED, chunk=4, window=6, sums=sums, max_summaries=0, window_unit=1)


def test_no_complete_chunk_and_empty_batch():
    _check_fp32([1, 3, 2], chunk=4, window=1, sums=1)  # Ts = 0 with S = 1
    tensors, offsets = _inputs([0, 0], 4, 1)
    out, out_s = triton_op.ksa_attention_triton(*[t.float() for t in tensors], offsets, KsaRule(4, 1))
    assert out.shape == (0, 2, 16) and out_s.shape == (0, 2, 16)


def test_strided_inputs():
    """q, k, v as views of one fused projection (row stride 3*H*D), as a model produces them."""
    lengths, chunk, sums = [13, 30], 4, 1
    tensors, offsets = _inputs(lengths, chunk, sums)
    fused = torch.cat(tensors[:3], dim=1)  # [T, 3H, D]
    fused_s = torch.cat(tensors[3:], dim=1)
    views = [*fused.float().split(2, dim=1), *fused_s.float().split(2, dim=1)]
    assert views[0].stride(0) == 3 * 2 * 16
    got = triton_op.ksa_attention_triton(*views, offsets, KsaRule(chunk, 1), config=_small_config())
    want = ksa_dense(*tensors, offsets, chunk_size=chunk, window=1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


def test_calls_over_one_batch_share_block_tables(built_block_plans):
    """The layers of one forward pass pass one ``tables`` dict: the block tables are built once per batch
    and rule, and the results are those of calls that build their own, forward and backward."""
    built = built_block_plans
    tensors, offsets = _inputs(MIXED, 4, 1, seed=3)
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(DEVICE) for t in (tensors[0], tensors[3])]
    rule, config = _rule(4, 3), _small_config()

    def call(tables, offsets):
        leaves = [t.detach().float().requires_grad_() for t in tensors]
        out = triton_op.ksa_attention_triton(*leaves, offsets, rule, config=config, tables=tables)
        _backward(out, [g.float() for g in grads])
        return [o.detach() for o in out] + [t.grad for t in leaves]

    alone = call(None, offsets)
    assert len(built) == 1
    tables = {}
    shared = [call(tables, offsets) for _ in range(3)]  # three layers of one pass
    assert len(built) == 2, "the three calls over one offsets tensor built their tables once"
    assert len(built[1]._built) >= 2  # event and summary tables, kept for the later calls and backward passes
    for got in shared:
        for a, b in zip(got, alone):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    call(tables, offsets.clone())  # same values, another tensor: the dict does not vouch for it
    assert len(built) == 3


def test_rejects_bad_inputs():
    tensors, offsets = _inputs([5, 9], 4, 1)
    f32 = [t.float() for t in tensors]
    with pytest.raises(ValueError, match="head dims up to 128"):
        big = [torch.zeros(t.shape[0], t.shape[1], 160, device=DEVICE) for t in f32]
        triton_op.ksa_attention_triton(*big, offsets, KsaRule(4, 1))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        kv3 = torch.zeros(f32[1].shape[0], 3, 16, device=DEVICE)
        triton_op.ksa_attention_triton(f32[0], kv3, kv3, *f32[3:], offsets, KsaRule(4, 1))
    with pytest.raises(ValueError, match="supports"):
        triton_op.ksa_attention_triton(*tensors, offsets, KsaRule(4, 1))  # float64
    with pytest.raises(ValueError, match="summary_tokens=0 but 3 summary rows"):
        triton_op.ksa_attention_triton(*f32, offsets, KsaRule(4, 1, 0))
    with pytest.raises(ValueError, match="KsaTritonConfig.block_m"):
        triton_op.KsaTritonConfig(block_m=48)


# ---- the compiled path, checked without a GPU ---------------------------------------------------------

_COMPILE_FOR_HOPPER = """
import sys
sys.path.insert(0, "pipelines")
from kernel_registers import compile_for_sm90
from ksa_rec.ops.ksa.triton_fwd import ksa_fwd_kernel, ksa_plan_kernel
from ksa_rec.ops.ksa.triton_bwd import ksa_bwd_dkdv_kernel, ksa_bwd_dq_kernel, ksa_bwd_preprocess_kernel

for sums, has_sum, group in ((1, True, 1), (0, False, 2)):
    common = dict(GROUP=group, CHUNK=8, SUMS=sums, UNIT=8, HEAD_DIM=64, HAS_SUM=has_sum, DOT_PREC=None,
                  INTERPRET=False)
    kernels = [(ksa_fwd_kernel, dict(H=8, BLOCK_M=128, BLOCK_N=64, SUM_ROWS=16, **common))]
    kernels += [(ksa_bwd_dq_kernel, dict(H=8, BLOCK_M=128, BLOCK_N=32, SUM_ROWS=16, EVENT_DQ=event_dq, **common))
                for event_dq in (True, False)]
    kernels += [(ksa_bwd_dkdv_kernel, dict(HK=8 // group, BLOCK_N=128, BLOCK_M=32, ATOMIC_DQ=atomic, **common))
                for atomic in (False, True)]
    for kernel, constexprs in kernels:
        compiled = compile_for_sm90(kernel, constexprs, 8, 3)
        if constexprs.get("EVENT_DQ", True):  # (the atomic mode's dQ launch has only summary rows: no matmul)
            assert "wgmma.mma_async" in compiled.asm["ptx"], kernel.fn.__name__  # the Hopper tensor-core path
compile_for_sm90(ksa_bwd_preprocess_kernel, dict(H=8, HEAD_DIM=64, BLOCK=64), 4, 1)
for kind in (1, 2):
    compile_for_sm90(ksa_plan_kernel, dict(BLOCK=128, CHUNK=8, SUMS=1, UNIT=8, KIND=kind, HAS_SUM=True, TILE=256,
                                           INTERPRET=False), 4, 1)
"""


def test_compiles_for_hopper():
    """The interpreter accepts code the compiler rejects: compile every kernel for sm_90 (no GPU needed,
    triton ships ptxas) in a process without TRITON_INTERPRET, and check that the matmuls use wgmma."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]


# ---- CUDA only: full sizes, default tiles, bf16, determinism ------------------------------------------

GPU_LENGTHS = [0, 1, 7, 8, 9, 64, 333, 1000, 2500, 4097]
gpu = pytest.mark.skipif(not _CUDA, reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("window,sums,max_summaries", [
    (0, 1, None), (1, 2, None), (3, 0, None), (32, 1, None), (32, 1, 5), (None, 1, None), (10_000, 1, None),
])
def test_gpu_fp32_full_size(window, sums, max_summaries):
    _check_fp32(GPU_LENGTHS, chunk=8, window=window, sums=sums, max_summaries=max_summaries,
                config=replace(triton_op.default_config(64, torch.float32), nan_fill=True), heads=4, dim=64)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_low_precision_within_2x_of_torch(dtype, dim, deterministic):
    """Kernel error <= 2 x the error of ksa_dense run in the same dtype (+ a tiny atol), both measured
    against ksa_dense in float64."""
    kw = dict(chunk_size=8, window=32, summary_tokens=1)
    tensors, offsets = _inputs(GPU_LENGTHS, 8, 1, heads=4, dim=dim)
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(DEVICE) for t in (tensors[0], tensors[3])]
    # all three see the same rounded inputs: the errors compared are those of the computation
    tensors = [t.to(dtype).double() for t in tensors]
    grads = [g.to(dtype).double() for g in grads]
    want_out, want_grad = _oracle(tensors, offsets, grads, **kw)
    ref_out, ref_grad = _oracle_in_dtype(tensors, offsets, grads, dtype, **kw)
    config = replace(triton_op.default_config(dim, dtype), deterministic=deterministic, nan_fill=True)
    got_out, got_grad = _kernel(tensors, offsets, grads, dtype, config, **kw)
    names = ["out", "out_sum", "dq", "dk", "dv", "dq_sum", "dk_sum", "dv_sum"]
    for name, got, ref, want in zip(names, got_out + got_grad, ref_out + ref_grad, want_out + want_grad):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        err = (got.double() - want).abs().max().item()
        ref_err = (ref.double() - want).abs().max().item()
        assert err <= 2 * ref_err + 1e-3, f"{name}: kernel error {err:.2e} vs torch {dtype} error {ref_err:.2e}"


def _oracle_in_dtype(tensors, offsets, grads, dtype, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    out = ksa_dense(*leaves, offsets, **kw)
    _backward(out, [g.to(dtype) for g in grads])
    return [o.detach() for o in out], [t.grad for t in leaves]


@pytest.mark.gpu
@gpu
def test_gpu_backward_is_deterministic():
    tensors, offsets = _inputs(GPU_LENGTHS, 8, 1, heads=4, dim=64)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(DEVICE) for t in (tensors[0], tensors[3])]
    kw = dict(chunk_size=8, window=32, summary_tokens=1)
    config = triton_op.default_config(64, torch.bfloat16)
    first = _kernel(tensors, offsets, grads, torch.bfloat16, config, **kw)
    second = _kernel(tensors, offsets, grads, torch.bfloat16, config, **kw)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)

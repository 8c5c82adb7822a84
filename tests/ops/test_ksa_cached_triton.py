"""The Triton kernel of the cached (decode) form of KSA (``triton_cached.py``) against the torch path
of ``ksa_cached_attention`` (``cached.py``, itself checked against the dense oracle in
``test_ksa_cached.py``).

CPU: the kernel runs under the Triton interpreter at small sizes (D=16, 1-2 kv heads); ``tests/conftest.py``
sets ``TRITON_INTERPRET=1`` before anything imports triton.
CUDA: the same tests compiled, plus ``-m gpu`` ones at full size (k=8, W=32, H=8, D=64, histories up
to 10K) in bf16/fp16 under the 2x rule: kernel error <= 2 x the torch path's error in the same dtype,
both against the torch path in float64.

Every case: a random batch of users with odd lengths (0, 1, k-1, k, k+1, long), some stepping no event,
queries = each user's newest events plus the summaries of chunks they complete, a cache that is either
a KSA state (ring of the last (W+1)*k events + summaries) or every token, shuffled; output pre-filled
with NaN.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from ksa_rec.ops.ksa import KsaRule, triton_cached
from ksa_rec.ops.ksa.cached import KeyRows, QueryRows, ksa_cached_attention
from ksa_rec.utils.jagged import lengths_to_offsets

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(lengths, *, k, S, W, M=None, window_tokens=None, heads=2, kv_heads=None, dim=16, cache="state",
           max_new=3, seed=0):
    """Random decode step: ``(q, queries, events, summaries, rule)`` of ``ksa_cached_attention`` in float64.

    User b has ``lengths[b]`` events so far; its newest ``new`` in ``0..max_new`` are queries, plus the
    S summaries of each chunk they complete. ``window_tokens``: a token window of that many events (the
    swa kind). ``cache="state"``: the ring of the last (W+1)*k events (all events for W=None or a token
    window) and every summary; ``"all"``: every event and summary. Cached rows are shuffled (the rule goes
    by index, never by position).
    """
    kv_heads = heads if kv_heads is None else kv_heads
    rule = (KsaRule(k, W, S, M) if window_tokens is None else KsaRule(k, window_tokens, S, 0, window_unit=1))
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    q_idx, q_sum, k_idx, s_idx, q_len, k_len, s_len = [], [], [], [], [], [], []
    for n in lengths:
        ring = n if (cache == "all" or W is None or window_tokens is not None) else (W + 1) * k
        new = rnd.randint(0, min(n, max_new, ring))  # every new token's own key is cached (it sees itself)
        rows = []
        for i in range(n - new, n):
            rows.append((i, False))
            if S and (i + 1) % k == 0:
                rows += [((i // k) * S + j, True) for j in range(S)]
        events = rnd.sample(range(max(0, n - ring), n), min(n, ring))
        sums = rnd.sample(range(S * (n // k)), S * (n // k))
        q_idx += [i for i, _ in rows]
        q_sum += [s for _, s in rows]
        k_idx += events
        s_idx += sums
        q_len.append(len(rows))
        k_len.append(len(events))
        s_len.append(len(sums))

    def rand(rows, h):
        return torch.randn(rows, h, dim, generator=gen, dtype=torch.float64).to(DEVICE)

    def offsets(lens):
        return lengths_to_offsets(torch.tensor(lens, dtype=torch.int64)).to(DEVICE)

    def index(values):
        return torch.tensor(values, dtype=torch.int64).to(DEVICE)

    queries = QueryRows(offsets(q_len), index(q_idx), torch.tensor(q_sum, dtype=torch.bool).to(DEVICE))
    events = KeyRows(offsets(k_len), index(k_idx), rand(len(k_idx), kv_heads), rand(len(k_idx), kv_heads))
    summaries = KeyRows(offsets(s_len), index(s_idx), rand(len(s_idx), kv_heads), rand(len(s_idx), kv_heads))
    return rand(len(q_idx), heads), queries, events, summaries, rule


def _cast(case, dtype):
    """The case with every K/V and the queries in ``dtype`` (identities unchanged)."""
    q, queries, events, summaries, rule = case
    return (q.to(dtype), queries, replace(events, k=events.k.to(dtype), v=events.v.to(dtype)),
            replace(summaries, k=summaries.k.to(dtype), v=summaries.v.to(dtype)), rule)


def _kernel(case, dtype, **config):
    cfg = triton_cached.CachedTritonConfig(nan_fill=True, **config)
    return triton_cached.ksa_cached_attention_triton(*_cast(case, dtype), config=cfg)


def _check_fp32(lengths, **kw):
    config = {key: kw.pop(key) for key in ("block_q", "block_n", "num_splits", "fma_rows") if key in kw}
    case = _batch(lengths, **kw)
    want = ksa_cached_attention(*case, backend="torch")
    got = _kernel(case, torch.float32, **config)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all(), "non-finite output (an element no program wrote?)"
    # fp32 kernel vs float64 torch: observed ~1e-6 at these sizes
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


# k = 4: empty users, 1, k-1, k, k+1 events, and users longer than (W + 2) * k (their events see summaries)
LENGTHS = [0, 1, 3, 4, 5, 23, 61, 0, 40]


# float32 tiles: of as many rows as a user has on average (2-4 here) without tl.dot, or 16 rows through tl.dot
TILES = {"fma": {"fma_rows": 8}, "dot": {"block_q": 16}}


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("window,S", [(0, 1), (1, 1), (1, 2), (None, 1), (1, 0), (None, 0)])
def test_matches_torch(window, S, tile):
    _check_fp32(LENGTHS, k=4, S=S, W=window, heads=1, seed=3, **TILES[tile])


@pytest.mark.parametrize("max_new,block_q,block_n", [(1, None, None), (1, 2, 16), (3, 4, 32), (3, 8, None)])
def test_float32_tiles_without_dot(max_new, block_q, block_n):
    """Streaming-step shapes (one new event a user, so 1 + S rows): tiles of 2-8 rows, several key tiles."""
    config = {key: val for key, val in (("block_q", block_q), ("block_n", block_n)) if val is not None}
    if block_q is None:  # the default plan must pick a tile without tl.dot here, or this would test tl.dot again
        q, queries, events, summaries, _ = _batch(LENGTHS, k=4, S=1, W=2, heads=2, max_new=max_new, seed=12)
        users = queries.offsets.numel() - 1
        planned = triton_cached.plan_launch(users, 2, 1, q.shape[0], events.k.shape[0], 16, torch.float32,
                                            q.device, triton_cached.CachedTritonConfig())
        assert planned[0] < 16, planned
    _check_fp32(LENGTHS, k=4, S=1, W=2, heads=2, max_new=max_new, seed=12, **config)


def test_plan_launch_tiles():
    """Float32 with few rows a user: a tile of exactly those rows (at least 2) and a key tile cut to the product
    bound; half precision, more rows, or fma_rows=0: 16..64 rows through tl.dot."""
    cfg, cpu = triton_cached.CachedTritonConfig(), torch.device("cpu")

    def plan(rows, dtype=torch.float32, group=1, head_dim=64, config=cfg):
        return triton_cached.plan_launch(100, 4, group, rows * 100, 10_000, head_dim, dtype, cpu, config)[:2]

    assert plan(1) == (2, 64)  # 2 x 64 (head dim) x 64 keys = the 8,192-element product tile
    assert plan(2, head_dim=16) == (2, 128)  # the configured key tile already fits
    assert plan(3, head_dim=16) == (16, 128)  # more rows than fma_rows (2 by default): tl.dot
    assert plan(2, dtype=torch.bfloat16) == (16, 128)
    assert plan(2, config=triton_cached.CachedTritonConfig(fma_rows=0)) == (16, 128)
    up_to_8 = triton_cached.CachedTritonConfig(fma_rows=8)
    assert plan(3, head_dim=16, config=up_to_8) == (4, 128)
    assert plan(8, head_dim=16, config=up_to_8) == (8, 64)
    assert plan(2, group=4, head_dim=16, config=up_to_8) == (8, 64)
    assert plan(16, config=up_to_8) == (16, 128)
    with pytest.raises(ValueError, match="grouped heads"):
        plan(1, group=4, config=triton_cached.CachedTritonConfig(block_q=2))


@pytest.mark.parametrize("cache", ["state", "all"])
def test_max_summaries(cache):
    _check_fp32(LENGTHS, k=4, S=1, W=1, M=2, cache=cache, seed=5)


@pytest.mark.parametrize("S", [0, 1])
def test_token_window(S):
    _check_fp32(LENGTHS, k=4, S=S, W=None, window_tokens=5, cache="all", seed=6)


def test_grouped_query_attention_and_key_splits():
    # GQA 2:1 with the key range of each user cut into 3 splits (partials merged by the combine kernel)
    _check_fp32(LENGTHS, k=4, S=2, W=1, heads=2, kv_heads=1, num_splits=3, block_n=16, seed=7)


def test_several_query_blocks_per_user():
    # up to 20 new events a user against 16-row tiles: the program loops over query blocks
    _check_fp32([30, 45, 2], k=4, S=1, W=1, heads=1, max_new=20, block_q=16, seed=8)


def test_padded_head_dim():
    _check_fp32([9, 30], k=4, S=1, W=1, dim=20, seed=9)


def test_dispatch():
    case = _batch([9, 30], k=4, S=1, W=1, seed=10)
    want = ksa_cached_attention(*case)  # auto: float64 -> torch everywhere
    got = ksa_cached_attention(*_cast(case, torch.float32), backend="triton")
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    # flex has no cached form: its step runs the torch path
    assert torch.equal(ksa_cached_attention(*case, backend="flex"), ksa_cached_attention(*case, backend="torch"))


def test_rejects_bad_inputs():
    case = _batch([9, 30], k=4, S=1, W=1, seed=11)
    with pytest.raises(ValueError, match="supports"):
        triton_cached.ksa_cached_attention_triton(*case)  # float64
    q, queries, events, summaries, rule = _cast(case, torch.float32)
    three = lambda rows: torch.zeros(rows.k.shape[0], 3, 16, device=DEVICE)  # noqa: E731
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        triton_cached.ksa_cached_attention_triton(q, queries, replace(events, k=three(events), v=three(events)),
                                                  replace(summaries, k=three(summaries), v=three(summaries)), rule)
    with pytest.raises(ValueError, match="power of two"):
        triton_cached.CachedTritonConfig(block_n=48)
    with pytest.raises(ValueError, match="block_q must be a power of two >= 2"):
        triton_cached.CachedTritonConfig(block_q=1)
    with pytest.raises(ValueError, match="fma_rows"):
        triton_cached.CachedTritonConfig(fma_rows=-1)


# ---- CUDA only: full sizes, bf16 / fp16 ----------------------------------------------------------------

GPU_LENGTHS = [0, 1, 7, 8, 9, 64, 333, 1000, 2500, 10_000, 4097]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window,S,M,window_tokens,kv_heads,splits", [
    (32, 1, None, None, 8, None), (32, 1, None, None, 2, 4), (32, 1, 5, None, 8, None), (None, 1, None, None, 8, 3),
    (None, 0, None, 256, 4, None), (None, 1, None, 256, 8, None), (0, 2, None, None, 8, 2),
])
def test_gpu_low_precision_within_2x_of_torch(dtype, window, S, M, window_tokens, kv_heads, splits):
    case = _batch(GPU_LENGTHS, k=8, S=S, W=window, M=M, window_tokens=window_tokens, heads=8,
                  kv_heads=kv_heads, dim=64, max_new=9, seed=21)
    # the three see the same rounded inputs: the errors compared are those of the computation
    case = _cast(_cast(case, dtype), torch.float64)
    want = ksa_cached_attention(*case, backend="torch")
    ref = ksa_cached_attention(*_cast(case, dtype), backend="torch")
    got = _kernel(case, dtype, num_splits=splits)
    assert got.dtype == dtype and torch.isfinite(got).all()
    err = (got.double() - want).abs().max().item()
    ref_err = (ref.double() - want).abs().max().item()
    assert err <= 2 * ref_err + 1e-3, f"kernel error {err:.2e} vs torch {dtype} error {ref_err:.2e}"


@pytest.mark.gpu
@gpu
def test_gpu_fp32_and_auto_dispatch():
    case = _batch(GPU_LENGTHS, k=8, S=1, W=32, heads=8, kv_heads=2, dim=64, cache="all", seed=22)
    want = ksa_cached_attention(*case)  # float64: torch path even on CUDA
    got = ksa_cached_attention(*_cast(case, torch.float32))  # auto: triton
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("max_new,config", [(9, {}), (1, {"fma_rows": 8})])  # 16-row tl.dot tiles; 4-row FMA ones
def test_gpu_fp32_within_2x_of_torch_fp32(max_new, config):
    """float32 tiles (FMAs, ``ieee``) keep float32's error: within 2x the torch path's in float32."""
    case = _batch(GPU_LENGTHS, k=8, S=1, W=32, heads=8, kv_heads=2, dim=64, max_new=max_new, seed=23)
    want = ksa_cached_attention(*case, backend="torch")  # float64
    ref = ksa_cached_attention(*_cast(case, torch.float32), backend="torch")
    got = _kernel(case, torch.float32, **config)
    err = (got.double() - want).abs().max().item()
    ref_err = (ref.double() - want).abs().max().item()
    assert err <= 2 * ref_err + 1e-6, f"kernel error {err:.2e} vs torch float32 error {ref_err:.2e}"

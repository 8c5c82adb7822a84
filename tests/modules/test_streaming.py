"""The streaming contract: feeding histories event by event, or in arbitrary pieces, through the step
path gives the same event states as one full forward pass, for every attention kind and hybrids."""

import collections
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ksa_rec.modules.config import EncoderConfig
from ksa_rec.modules.encoder import SequenceEncoder
from ksa_rec.utils.jagged import lengths_to_offsets

PATTERNS = ["full,full", "ksa,ksa", "ksa*3,full", "sca,full", "swa,ksa", "sca", "swa", "ksa,sca,swa,full", "hstu,full",
            "hstu*2", "mka,full", "fastmka,mka", "mka,swa,sca"]
# Every pattern with summaries again with chunk-seeded summaries (KSA.md section 11).
CHUNK_PATTERNS = ["ksa,ksa", "ksa*3,full", "swa,ksa", "ksa,sca,swa,full", "sca,ksa", "full,ksa"]


def _encoder(pattern, **kw):
    torch.manual_seed(0)
    settings = dict(dim=16, num_heads=2, dropout=0.0, chunk_size=4, window=2, attention_backend="torch",
                    time_gap_buckets=0, mka=dict(local_window=6, block_size=4, max_blocks=3, fast_window=5))
    return SequenceEncoder(EncoderConfig(pattern=pattern, **{**settings, **kw})).double().eval()


def _histories(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(n, 16, generator=g, dtype=torch.float64) for n in lengths],
            [torch.randn(n, 16, generator=g, dtype=torch.float64) for n in lengths])


def _full_pass(enc, tokens, times):
    lengths = [t.shape[0] for t in tokens]
    device = tokens[0].device
    offsets = lengths_to_offsets(torch.tensor(lengths)).to(device)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    return enc(torch.cat(tokens), offsets, positions, torch.cat(times))


def _streamed(enc, tokens, times, pieces):
    """``pieces[b]``: list of piece sizes for user b; all users step together, round by round."""
    B = len(tokens)
    caches = enc.empty_states(B, tokens[0].dtype, tokens[0].device)
    done = [0] * B
    outputs = [[] for _ in range(B)]
    rounds = max(len(p) for p in pieces)
    for r in range(rounds):
        sizes = [p[r] if r < len(p) else 0 for p in pieces]
        new = [tokens[b][done[b]:done[b] + sizes[b]] for b in range(B)]
        new_t = [times[b][done[b]:done[b] + sizes[b]] for b in range(B)]
        device = tokens[0].device
        out, caches = enc.step(torch.cat(new), lengths_to_offsets(torch.tensor(sizes)).to(device),
                               torch.tensor(done, device=device), torch.cat(new_t), caches)
        for b, chunk in enumerate(out.split(sizes)):
            outputs[b].append(chunk)
            done[b] += sizes[b]
    return torch.cat([torch.cat(o) for o in outputs]), caches


def _random_pieces(n, rnd):
    pieces = []
    while n:
        size = min(n, rnd.choice([1, 2, 3, 5, 8, 13]))
        pieces.append(size)
        n -= size
    return pieces


@pytest.mark.parametrize("pattern", PATTERNS)
def test_event_by_event_equals_full_pass(pattern):
    lengths = [23, 1, 0, 9]
    enc = _encoder(pattern)
    tokens, times = _histories(lengths)
    full = _full_pass(enc, tokens, times)
    streamed, _ = _streamed(enc, tokens, times, [[1] * n for n in lengths])
    torch.testing.assert_close(streamed, full, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_random_pieces_equal_full_pass(pattern, seed):
    rnd = random.Random(seed)
    lengths = [rnd.randint(0, 40) for _ in range(4)]
    enc = _encoder(pattern, summary_tokens=rnd.choice([1, 2]), max_summaries=rnd.choice([None, 1]))
    tokens, times = _histories(lengths, seed)
    full = _full_pass(enc, tokens, times)
    streamed, _ = _streamed(enc, tokens, times, [_random_pieces(n, rnd) for n in lengths])
    torch.testing.assert_close(streamed, full, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("pattern", CHUNK_PATTERNS)
def test_chunk_seeded_summaries_stream_like_the_full_pass(pattern, seed):
    """With summary_init: chunk a summary pools its chunk's event inputs: the step keeps the open chunk's
    inputs in the state, builds the summary when the chunk completes, and equals the full pass."""
    rnd = random.Random(seed)
    lengths = [rnd.randint(0, 40) for _ in range(4)]
    enc = _encoder(pattern, summary_init="chunk", summary_tokens=rnd.choice([1, 2, 4]),
                   max_summaries=rnd.choice([None, 1]))
    tokens, times = _histories(lengths, seed)
    full = _full_pass(enc, tokens, times)
    streamed, states = _streamed(enc, tokens, times, [_random_pieces(n, rnd) for n in lengths])
    torch.testing.assert_close(streamed, full, atol=1e-10, rtol=1e-10)
    open_chunk = states[-1]  # the open chunk's inputs: n % k rows a user, the newest events' tokens
    for b, n in enumerate(lengths):
        kept = open_chunk.user(b)["x"]
        assert kept.shape[0] == n % 4 and torch.equal(kept, tokens[b][n - n % 4:])


@pytest.mark.parametrize(("summary_init", "summary_qkv"), [("slot", "shared"), ("chunk", "shared"), ("chunk", "delta")])
@pytest.mark.parametrize("pattern", ["ksa,ksa", "ksa*3,full", "swa,ksa"])
def test_summary_projection_modes_stream_like_the_full_pass(pattern, summary_init, summary_qkv):
    """summary_qkv: shared sends both streams through the events' projection, delta the summaries through it plus
    their correction, in the step as in the full pass."""
    rnd = random.Random(11)
    lengths = [rnd.randint(0, 40) for _ in range(4)]
    enc = _encoder(pattern, summary_init=summary_init, summary_qkv=summary_qkv, summary_tokens=2)
    if summary_qkv == "delta":  # away from its zero start, so that the correction is exercised
        with torch.no_grad():
            for block in enc.blocks:
                block.attn.qkv_sum.weight.normal_(std=0.3)
    tokens, times = _histories(lengths, 11)
    full = _full_pass(enc, tokens, times)
    streamed, _ = _streamed(enc, tokens, times, [_random_pieces(n, rnd) for n in lengths])
    torch.testing.assert_close(streamed, full, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("pattern", ["full,full", "ksa,ksa", "sca,full", "hstu,full", "mka,full"])
def test_gated_residuals_and_swiglu_stream_like_the_full_pass(pattern):
    """The gates and the SwiGLU block are per token, so the step computes them as the full pass does."""
    rnd = random.Random(7)
    lengths = [rnd.randint(0, 40) for _ in range(4)]
    enc = _encoder(pattern, residual_gates=True, ffn_activation="swiglu", summary_init="chunk")
    tokens, times = _histories(lengths, 7)
    full = _full_pass(enc, tokens, times)
    streamed, _ = _streamed(enc, tokens, times, [_random_pieces(n, rnd) for n in lengths])
    torch.testing.assert_close(streamed, full, atol=1e-10, rtol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("summary_init", ["slot", "chunk"])
@pytest.mark.parametrize("pattern", ["ksa*3,full", "ksa,ksa", "full,full", "sca,full", "swa,ksa", "full,ksa"])
def test_cuda_step_with_default_backends_equals_full_pass(pattern, summary_init):
    """On CUDA with the backends a user gets (Triton training and decode kernels, SDPA, the growing cache
    of full layers) at the serving sizes' k = 8, W = 32: streamed in random pieces = one full pass."""
    rnd = random.Random(0)
    torch.manual_seed(0)
    enc = SequenceEncoder(EncoderConfig(pattern=pattern, dim=64, num_heads=4, dropout=0.0, chunk_size=8, window=32,
                                        summary_init=summary_init, time_gap_buckets=0)).cuda().eval()
    lengths = [700, 1, 0, 333, 64]
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randn(n, 64, generator=g).cuda() for n in lengths]
    times = [torch.randn(n, 64, generator=g).cuda() for n in lengths]
    with torch.inference_mode():
        full = _full_pass(enc, tokens, times)
        streamed, _ = _streamed(enc, tokens, times, [_random_pieces(n, rnd) for n in lengths])
    torch.testing.assert_close(streamed, full, atol=2e-3, rtol=2e-3)


def test_ksa_state_is_bounded_by_the_ring_and_the_summaries():
    enc = _encoder("ksa,full", window=2)
    tokens, times = _histories([61])
    _, caches = _streamed(enc, tokens, times, [[1] * 61])
    ksa, full = caches
    # ksa: the open chunk (61 // 4 = 15, events 60) plus W = 2 chunks before it (events 52..59), and the
    # 15 summaries of the complete chunks; full: every event, no summaries.
    assert ksa.idx.tolist() == list(range(52, 61))
    assert ksa.sidx.tolist() == list(range(15))
    assert full.idx.tolist() == list(range(61)) and full.sidx.numel() == 0


@pytest.mark.parametrize("pattern", PATTERNS)
def test_one_user_in_pieces_equals_full_pass(pattern):
    """One user takes the unpadded path (no gathers, kept rows as views of the step's key table)."""
    rnd = random.Random(1)
    enc = _encoder(pattern, summary_tokens=2, max_summaries=1)
    tokens, times = _histories([37], seed=1)
    full = _full_pass(enc, tokens, times)
    streamed, _ = _streamed(enc, tokens, times, [_random_pieces(37, rnd)])
    torch.testing.assert_close(streamed, full, atol=1e-10, rtol=1e-10)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _ops_of_one_step(pattern, batch):
    """Aten ops of one step (one new event per user, one of them completing a chunk) from caches stacked
    from per-user tensors, as the serving engine does."""
    enc = _encoder(pattern)
    tokens, times = _histories([24] * batch)
    _, caches = _streamed(enc, tokens, times, [[20, 3]] * batch)
    caches = enc.stack_states([[cache.user(b) for cache in caches] for b in range(batch)])
    step = torch.cat([t[23:] for t in tokens]), torch.cat([t[23:] for t in times])
    with _CountOps() as counter:
        enc.step(step[0], lengths_to_offsets(torch.ones(batch, dtype=torch.long)), torch.full((batch,), 23),
                 step[1], caches)
    return counter.ops


@pytest.mark.parametrize("kind", ["ksa", "full", "sca", "swa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_layers_that_keep_the_same_rows_plan_the_step_once(kind, batch):
    """What a step reads and keeps, and the attention mask, are built once per step for all layers that
    keep the same rows: more layers add no device syncs (nonzero) and a bounded number of ops each."""
    two, four = _ops_of_one_step(f"{kind}*2", batch), _ops_of_one_step(f"{kind}*4", batch)
    for sync in ("aten.nonzero", "aten._local_scalar_dense"):
        assert two[sync] == four[sync]
    assert (sum(four.values()) - sum(two.values())) / 2 <= 80


def test_step_and_stack_share_index_tensors_between_layers():
    enc = _encoder("ksa,ksa,full")
    tokens, times = _histories([13, 6])
    _, caches = _streamed(enc, tokens, times, [[5, 8], [6]])
    assert caches[0].idx is caches[1].idx and caches[0].sidx is caches[1].sidx
    assert caches[2].idx is not caches[0].idx
    stacked = enc.stack_states([[cache.user(b) for cache in caches] for b in range(2)], "cpu")
    assert stacked[0].offsets is stacked[1].offsets and stacked[0].s_offsets is stacked[1].s_offsets
    assert stacked[2].idx.tolist() == caches[2].idx.tolist()

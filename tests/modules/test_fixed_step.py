"""The fixed-capacity streaming step (``SequenceEncoder.fixed_step``, ``ksa_rec.ops.ksa.fixed``): one event per user
a step, in buffers a CUDA graph can capture, gives the same event states as one full forward pass, from any
starting state, for every kind that has it; and its state converts to and from the jagged one losslessly."""

import pytest
import torch

from ksa_rec.modules.config import EncoderConfig
from ksa_rec.modules.encoder import SequenceEncoder
from ksa_rec.utils.jagged import lengths_to_offsets

PATTERNS = ["full,full", "ksa,ksa", "ksa*3,full", "sca,full", "swa,ksa", "sca", "swa", "ksa,sca,swa,full"]
# chunk-seeded summaries (KSA.md section 11), several summary tokens a chunk, a bounded summary count
VARIANTS = [("ksa,ksa", dict(summary_init="chunk")), ("ksa*3,full", dict(summary_init="chunk")),
            ("swa,ksa", dict(summary_init="chunk", summary_tokens=2)), ("ksa,full", dict(summary_tokens=2)),
            ("ksa,ksa", dict(max_summaries=1)), ("ksa,sca", dict(max_summaries=2, summary_init="chunk")),
            ("ksa,ksa", dict(window=0)), ("ksa,full", dict(residual_gates=True, ffn_activation="swiglu")),
            ("ksa,ksa", dict(summary_init="chunk", summary_qkv="shared")),
            ("ksa,sca", dict(summary_init="chunk", summary_qkv="delta"))]


def _encoder(pattern, **kw):
    torch.manual_seed(0)
    settings = dict(dim=16, num_heads=2, dropout=0.0, chunk_size=4, window=2, attention_backend="torch",
                    time_gap_buckets=0)
    return SequenceEncoder(EncoderConfig(pattern=pattern, **{**settings, **kw})).double().eval()


def _full_pass(enc, tokens, times):
    lengths = [t.shape[0] for t in tokens]
    offsets = lengths_to_offsets(torch.tensor(lengths))
    positions = torch.cat([torch.arange(n) for n in lengths])
    return enc(torch.cat(tokens), offsets, positions, torch.cat(times)).split(lengths)


def _jagged_prefix(enc, tokens, times, counts):
    """The jagged state after each user's first ``counts[b]`` events, fed in one step."""
    states = enc.empty_states(len(counts), next(enc.parameters()).dtype, "cpu")
    _, states = enc.step(torch.cat([t[:n] for t, n in zip(tokens, counts)]), lengths_to_offsets(torch.tensor(counts)),
                         torch.zeros(len(counts), dtype=torch.int64), torch.cat([t[:n] for t, n in zip(times, counts)]),
                         states)
    return states


def _check(enc, counts, steps, capacity=64, stepper=None, tol=1e-10, out=None, seed=1):
    """``stepper`` (default ``enc``): the encoder whose fixed step runs, with ``enc``'s weights; ``out``: a fixed
    state to load the users into (``fixed_state_of_users(..., out=)``). Returns the fixed state."""
    stepper = stepper or enc
    dtype = next(enc.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    total = [n + steps for n in counts]
    tokens = [torch.randn(n, 16, generator=g, dtype=dtype) for n in total]
    times = [torch.randn(n, 16, generator=g, dtype=dtype) for n in total]
    full = _full_pass(enc, tokens, times)
    prefix = _jagged_prefix(enc, tokens, times, counts)
    fixed = (stepper.fixed_state(prefix, torch.tensor(counts), capacity) if out is None else
             stepper.fixed_state_of_users([[s.user(b) for s in prefix] for b in range(len(counts))],
                                          torch.tensor(counts), capacity, out=out))
    for s in range(steps):
        rows = [n + s for n in counts]
        out = stepper.fixed_step(torch.stack([t[i] for t, i in zip(tokens, rows)]),
                                 torch.stack([t[i] for t, i in zip(times, rows)]), fixed)
        torch.testing.assert_close(out, torch.stack([f[i] for f, i in zip(full, rows)]), atol=tol, rtol=tol)
    assert fixed.event_count.tolist() == total
    if stepper is not enc:
        return fixed
    # back to the jagged state: one more event per user continues the history exactly
    states = enc.unfixed_states(fixed)
    more = [torch.randn(1, 16, generator=g, dtype=torch.float64) for _ in counts]
    more_t = [torch.randn(1, 16, generator=g, dtype=torch.float64) for _ in counts]
    longer = _full_pass(enc, [torch.cat([t, m]) for t, m in zip(tokens, more)],
                        [torch.cat([t, m]) for t, m in zip(times, more_t)])
    out, _ = enc.step(torch.cat(more), lengths_to_offsets(torch.ones(len(counts), dtype=torch.int64)),
                      torch.tensor(total), torch.cat(more_t), states)
    torch.testing.assert_close(out, torch.stack([f[-1] for f in longer]), atol=1e-10, rtol=1e-10)
    return fixed


@pytest.mark.parametrize("pattern", PATTERNS)
def test_fixed_step_equals_full_pass(pattern):
    # users starting empty, mid-chunk and past the window, stepping over several chunk boundaries
    _check(_encoder(pattern), counts=[0, 5, 23], steps=19)


@pytest.mark.parametrize("pattern,settings", VARIANTS, ids=[f"{p}-{s}" for p, s in VARIANTS])
def test_fixed_step_equals_full_pass_variants(pattern, settings):
    _check(_encoder(pattern, **settings), counts=[0, 3, 17], steps=22)


# These run the kernel on CPU tensors, so only where tests/conftest.py turned the interpreter on; on a CUDA
# machine the compiled kernel over the same buffers is checked by test_graph_replays_equal_the_full_pass[triton]
# and the bf16 test.
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(),
                                      reason="interpreter test on CPU tensors; on CUDA the -m gpu tests cover it")


# The decode kernel (Triton, here under TRITON_INTERPRET=1) over the fixed buffers: every stream layout the fixed
# step has (no summaries; summaries read by every layer, a bounded M; two slots a chunk; a full layer in a summary
# stack; chunk-seeded summaries), rings rewritten several times, users at different points of their chunks.
TRITON_CASES = [("full,sca", {}), ("ksa*3,full", dict(summary_init="chunk")), ("swa,ksa", dict(summary_tokens=2)),
                ("ksa,ksa", dict(max_summaries=1))]


@interpreter_only
@pytest.mark.parametrize("pattern,settings", TRITON_CASES, ids=[f"{p}-{s}" for p, s in TRITON_CASES])
def test_fixed_step_on_the_decode_kernel_equals_the_full_pass(pattern, settings, monkeypatch):
    pytest.importorskip("triton")
    import ksa_rec.ops.ksa.fixed as fixed

    def no_torch_path(*args, **kwargs):
        raise AssertionError("the fixed step took its torch path, not the decode kernel")

    reference = _encoder(pattern, **settings).float()
    monkeypatch.setattr(fixed, "_attend_torch", no_torch_path)  # the reference's full pass never calls it
    kernel = SequenceEncoder(EncoderConfig(**{**reference.cfg.__dict__, "attention_backend": "triton"})).eval()
    kernel.load_state_dict(reference.state_dict())
    _check(reference, [0, 5, 23], 19, stepper=kernel, tol=2e-5)


@pytest.mark.parametrize("pattern,settings", [("ksa,ksa", dict(summary_init="chunk")), ("swa,full", {}),
                                              ("ksa,sca", dict(max_summaries=1, summary_tokens=2))])
def test_a_reused_fixed_state_forgets_its_previous_users(pattern, settings):
    """What ``--step graphed`` does with its staging buffers: other users loaded into a state that served some
    before (their rows, open chunks and counts left behind) step as if the state were new."""
    enc = _encoder(pattern, **settings)
    used = _check(enc, [23, 5, 14], 11)
    _check(enc, [2, 30, 0], 13, out=used, seed=2)


def test_a_capacity_that_is_not_a_whole_number_of_chunks():
    # the last chunk below the capacity is open: its summary rows must exist all the same
    _check(_encoder("ksa,full"), counts=[3, 10], steps=12, capacity=23)


def test_ring_rows_wrap_many_times():
    # histories many times the ring (W + 1 chunks = 12 rows): each row rewritten ~5 times
    _check(_encoder("ksa,swa"), counts=[40, 1], steps=30, capacity=128)


def test_state_bytes_do_not_depend_on_the_history_for_bounded_kinds():
    enc = _encoder("ksa,sca", max_summaries=2)
    small = enc.empty_fixed_state(2, 64, torch.float32, "cpu").num_bytes
    assert enc.empty_fixed_state(2, 4096, torch.float32, "cpu").num_bytes == small
    full = _encoder("ksa,full")
    assert full.empty_fixed_state(2, 4096, torch.float32, "cpu").num_bytes > full.empty_fixed_state(
        2, 64, torch.float32, "cpu").num_bytes


def test_capacity_is_checked_when_a_state_is_fixed():
    enc = _encoder("ksa,full")
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randn(20, 16, generator=g, dtype=torch.float64)]
    states = _jagged_prefix(enc, tokens, tokens, [20])
    with pytest.raises(ValueError, match="a user has 20 events, capacity is 20"):
        enc.fixed_state(states, torch.tensor([20]), 20)


@pytest.mark.parametrize("pattern", ["mka,full", "hstu,full"])
def test_kinds_without_a_fixed_step_say_so(pattern):
    enc = _encoder(pattern, mka=dict(local_window=6, block_size=4, max_blocks=3, fast_window=5))
    with pytest.raises(NotImplementedError, match="no fixed-capacity step"):
        enc.empty_fixed_state(1, 64, torch.float32, "cpu")


def test_a_step_graph_needs_a_cuda_state():
    from ksa_rec.modules.step_graphs import StepGraph

    enc = _encoder("ksa,full")
    with pytest.raises(ValueError, match="CUDA graphs need a state on a CUDA device"):
        StepGraph(enc, enc.empty_fixed_state(2, 64, torch.float64, "cpu"), torch.float64, with_time=True)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_histories(enc, lengths):
    """Random float32 event inputs and time parts of users with ``lengths`` events on the GPU, and the full pass's
    states of every event."""
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randn(n, 16, generator=g).cuda() for n in lengths]
    times = [torch.randn(n, 16, generator=g).cuda() for n in lengths]
    with torch.no_grad():
        full = enc(torch.cat(tokens), lengths_to_offsets(torch.tensor(lengths)).cuda(),
                   torch.cat([torch.arange(n) for n in lengths]).cuda(), torch.cat(times)).split(lengths)
    return tokens, times, full


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("pattern,settings", [("ksa*3,full", {}), ("ksa,ksa", dict(summary_init="chunk")),
                                              ("swa,ksa", dict(summary_tokens=2)), ("full,sca", {})])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graph_replays_equal_the_full_pass(pattern, settings, backend):
    from ksa_rec.modules.step_graphs import StepGraph

    enc = _encoder(pattern, **settings, attention_backend=backend).float().cuda()
    counts, steps = [0, 5, 23], 21
    tokens, times, full = _cuda_histories(enc, [n + steps for n in counts])
    with torch.no_grad():
        states = enc.empty_states(3, torch.float32, "cuda")
        _, states = enc.step(torch.cat([t[:n] for t, n in zip(tokens, counts)]),
                             lengths_to_offsets(torch.tensor(counts)).cuda(), torch.zeros(3, dtype=torch.int64,
                                                                                          device="cuda"),
                             torch.cat([t[:n] for t, n in zip(times, counts)]), states)
    fixed = enc.fixed_state(states, torch.tensor(counts), capacity=64)
    graph = StepGraph(enc, fixed, torch.float32, with_time=True)
    assert fixed.event_count.tolist() == counts  # the capture's warm-up steps were undone
    for s in range(steps):
        rows = [n + s for n in counts]
        out = graph(torch.stack([t[i] for t, i in zip(tokens, rows)]), torch.stack([t[i] for t, i in zip(times, rows)]))
        torch.testing.assert_close(out, torch.stack([f[i] for f, i in zip(full, rows)]), atol=2e-5, rtol=2e-5)
    assert graph.steps_left == 64 - 1 - (23 + steps)


def _half_buffers_follow_the_full_pass(dtype, device, tol):
    """Fixed buffers in a 16-bit ``dtype`` under a float32 model: the kernel computes in that dtype with float32
    accumulation, so every event's output follows the float32 full pass to the dtype's rounding."""
    enc = _encoder("ksa*3,full", summary_init="chunk", attention_backend="triton").float().to(device)
    lengths = [21, 26, 44]
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randn(n, 16, generator=g).to(device) for n in lengths]
    times = [torch.randn(n, 16, generator=g).to(device) for n in lengths]
    with torch.no_grad():
        full = enc(torch.cat(tokens), lengths_to_offsets(torch.tensor(lengths)).to(device),
                   torch.cat([torch.arange(n) for n in lengths]).to(device), torch.cat(times)).split(lengths)
        fixed = enc.empty_fixed_state(3, 64, dtype, device)
        for s in range(21):  # every user from its first event, one a step
            out = enc.fixed_step(torch.stack([t[s] for t in tokens]), torch.stack([t[s] for t in times]), fixed)
            torch.testing.assert_close(out, torch.stack([f[s] for f in full]), atol=tol, rtol=tol)
    assert fixed.layers[0].k.dtype == dtype


@interpreter_only
def test_fp16_buffers_on_the_decode_kernel_follow_the_full_pass():
    # the interpreter has no bf16 (NumPy): fp16 takes the same cast path here; bf16 is tested on the GPU
    pytest.importorskip("triton")
    _half_buffers_follow_the_full_pass(torch.float16, "cpu", 5e-3)


@pytest.mark.gpu
@needs_cuda
def test_bf16_buffers_on_the_decode_kernel_follow_the_full_pass():
    _half_buffers_follow_the_full_pass(torch.bfloat16, "cuda", 5e-2)


def test_a_fixed_state_copies_another_in_place_and_refuses_another_shape():
    enc = _encoder("ksa,full", summary_init="chunk")
    source = _check(enc, [0, 5, 23], 7)  # a state with users at different points of their chunks
    target = enc.empty_fixed_state(3, 64, torch.float64, "cpu")
    before = [t.data_ptr() for t in target.tensors]
    assert target.copy_(source) is target
    assert [t.data_ptr() for t in target.tensors] == before  # the same buffers, as a captured graph needs
    assert all(torch.equal(a, b) for a, b in zip(target.tensors, source.tensors, strict=True))
    for users, capacity in ((3, 128), (2, 64)):
        other = enc.empty_fixed_state(users, capacity, torch.float64, "cpu")
        with pytest.raises(ValueError, match="FixedState.copy_: this state holds"):
            other.copy_(source)

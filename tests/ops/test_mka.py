"""MKA ops: the chunked EMA scan, the block bank and FastMKA's sources against plain loops and hand-built cases."""

from __future__ import annotations

import pytest
import torch

from ksa_rec.ops.mka.recurrence import fastmka_sources_recurrence
from ksa_rec.ops.mka.reference import bank_attention, block_running_mean, ema_scan, fastmka_sources
from ksa_rec.ops.mka.streaming import bank_slots, ring_index
from ksa_rec.utils.jagged import lengths_to_offsets

TIGHT = dict(atol=1e-11, rtol=1e-10)


def ema_loop(values, log_decay, num0, den0):
    """``num_t = beta num_{t-1} + x_t``, ``den_t = beta den_{t-1} + 1``, one step at a time."""
    beta = log_decay.exp()
    num, den, nums, dens = num0, den0, [], []
    for t in range(values.shape[1]):
        num = beta[None, :, :, None] * num + values[:, t, :, None, :]
        den = beta[None] * den + 1
        nums.append(num)
        dens.append(den)
    return torch.stack(nums, 1), torch.stack(dens, 1)


def assert_scan_matches_loop(inputs: tuple, chunk: int, g: torch.Generator) -> None:
    """``ema_scan`` equals the plain step loop, forward and backward (random cotangents)."""
    got = ema_scan(*inputs, chunk=chunk)
    want = ema_loop(*inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TIGHT)
    cot = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in want]
    grads_got = torch.autograd.grad(sum((a * c).sum() for a, c in zip(got, cot)), inputs)
    grads_want = torch.autograd.grad(sum((a * c).sum() for a, c in zip(want, cot)), inputs)
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_ema_scan_matches_the_step_loop_forward_and_backward(chunk, with_state):
    g = torch.Generator().manual_seed(chunk)
    B, L, G, S, F = 3, 21, 2, 3, 5
    values = torch.randn(B, L, G, F, generator=g, dtype=torch.float64, requires_grad=True)
    log_decay = torch.nn.functional.logsigmoid(torch.randn(G, S, generator=g, dtype=torch.float64)).requires_grad_()
    num0 = (torch.randn(B, G, S, F, generator=g, dtype=torch.float64) if with_state
            else torch.zeros(B, G, S, F, dtype=torch.float64)).requires_grad_()
    den0 = (torch.rand(B, G, S, generator=g, dtype=torch.float64) * 5 if with_state
            else torch.zeros(B, G, S, dtype=torch.float64)).requires_grad_()
    assert_scan_matches_loop((values, log_decay, num0, den0), chunk, g)


def test_ema_scan_stays_finite_at_extreme_decays():
    # beta ~ 1e-13 and beta ~ 1 - 1e-7: a closed form through beta^-t would overflow or cancel.
    values = torch.randn(1, 300, 1, 4, dtype=torch.float64)
    log_decay = torch.tensor([[-30.0, -1e-7, -0.7]], dtype=torch.float64)
    zeros = (torch.zeros(1, 1, 3, 4, dtype=torch.float64), torch.zeros(1, 1, 3, dtype=torch.float64))
    got = ema_scan(values, log_decay, chunk=64)
    want = ema_loop(values, log_decay, *zeros)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("chunk", [2, 5])
def test_ema_scan_carries_state_across_several_chunk_levels(chunk):
    # 700 steps in chunks of 2 or 5: the chunk carries are themselves scanned over 3-4 levels.
    g = torch.Generator().manual_seed(chunk)
    B, L, G, S, F = 2, 700, 2, 3, 3
    values = torch.randn(B, L, G, F, generator=g, dtype=torch.float64, requires_grad=True)
    decays = torch.tensor([[0.3, 0.9, 0.999], [0.6, 0.97, 1 - 1e-6]], dtype=torch.float64)
    log_decay = decays.log().requires_grad_()
    num0 = torch.randn(B, G, S, F, generator=g, dtype=torch.float64, requires_grad=True)
    den0 = (torch.rand(B, G, S, generator=g, dtype=torch.float64) * 5).requires_grad_()
    assert_scan_matches_loop((values, log_decay, num0, den0), chunk, g)


def test_ema_scan_stays_finite_over_long_spans_in_float32():
    # 3,000 steps: beta^lag underflows to 0 in the upper carry levels; forward and backward stay finite
    # and match the step loop run in float64.
    g = torch.Generator().manual_seed(0)
    values = torch.randn(1, 3000, 1, 4, generator=g, dtype=torch.float64)
    log_decay = torch.tensor([[-30.0, -0.7, -0.01, -1e-7]], dtype=torch.float64)
    zeros = (torch.zeros(1, 1, 4, 4, dtype=torch.float64), torch.zeros(1, 1, 4, dtype=torch.float64))
    x32, decay32 = values.float().requires_grad_(), log_decay.float().requires_grad_()
    got = ema_scan(x32, decay32, chunk=8)
    want = ema_loop(values, log_decay, *zeros)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.float(), atol=1e-4, rtol=1e-5)
    (got[0].sum() + got[1].sum()).backward()
    assert torch.isfinite(x32.grad).all() and torch.isfinite(decay32.grad).all()


def test_ema_scan_of_nothing():
    num, den = ema_scan(torch.zeros(2, 0, 1, 3), torch.full((1, 2), -0.1))
    assert num.shape == (2, 0, 1, 2, 3) and den.shape == (2, 0, 1, 2)


def hand_built_bank(start: int, length: int, max_blocks: int = 2):
    """One user, W1 = 8, C3 = 4, keys all zero (uniform attention), value of event p = p."""
    positions = torch.arange(start, start + length)
    offsets = torch.tensor([0, length])
    q = torch.randn(length, 1, 2, dtype=torch.float64)
    k = torch.zeros(length, 1, 2, dtype=torch.float64)
    v = positions.to(torch.float64)[:, None, None].expand(length, 1, 2).clone()
    out, has = bank_attention(q, k, v, offsets, positions, local_window=8, block_size=4, max_blocks=max_blocks,
                              scale=1.0)
    return {int(p): (bool(h), float(o[0, 0])) for p, h, o in zip(positions, has, out)}


@pytest.mark.parametrize("start", [0, 8, 40])
def test_a_block_becomes_visible_when_its_last_event_leaves_the_window(start):
    seen = hand_built_bank(start, 30)
    # Block 0 of the user = events start..start+3. At p = start+10 the L1 window (8 events) is
    # start+3..start+10, so event start+3 is still raw there and the block stays hidden.
    assert seen[start + 10] == (False, 0.0)
    # At p = start+11 its last event has left the window (the window is start+4..start+11): the block is
    # now seen, only through its mean, so no event is counted twice.
    assert seen[start + 11] == (True, start + 1.5)
    assert seen[start + 14] == (True, start + 1.5)
    # Block 1 appears at start+15 (uniform attention over two block means).
    assert seen[start + 15] == (True, start + 3.5)
    # Block 2 appears at start+19 and the cap M3 = 2 drops block 0, the oldest.
    assert seen[start + 18] == (True, start + 3.5)
    assert seen[start + 19] == (True, start + 7.5)


def test_a_partial_first_block_is_the_mean_of_its_present_events():
    seen = hand_built_bank(6, 20)  # block 1 holds only events 6 and 7
    assert seen[14] == (False, 0.0)
    assert seen[15] == (True, 6.5)


def test_max_blocks_zero_disables_the_bank():
    assert all(not has for has, _ in hand_built_bank(0, 40, max_blocks=0).values())


def test_bank_slots_cover_every_block_a_piece_still_sees():
    # Brute force over small settings: simulate the bank ring after a piece [p0, p0 + P) and check that
    # every block any of its queries sees is still held.
    for W1, C3, M3, P in [(1, 1, 1, 1), (8, 4, 3, 1), (8, 4, 3, 5), (5, 3, 2, 7), (3, 8, 2, 20), (130, 32, 4, 64)]:
        size = bank_slots(W1, C3, M3, P)
        for p0 in range(0, 4 * C3 + W1 + P):
            last = p0 + P - 1
            ids, valid = ring_index(torch.tensor([last // C3]), torch.tensor([0]), torch.tensor([True]), size)
            held = set(ids[valid].tolist())
            for p in range(p0, last + 1):
                hi = (p - W1 + 1) // C3 - 1
                needed = set(range(max(0, hi - M3 + 1), hi + 1))
                assert needed <= held, (W1, C3, M3, P, p0, p)


@pytest.mark.parametrize("max_len", [None, 14, 21])
def test_block_running_mean_matches_a_loop(max_len):
    """``max_len`` (the longest user or more: a block count bound instead of a host read) changes nothing."""
    lengths, starts = [0, 1, 5, 9, 14], [0, 3, 8, 2, 0]
    offsets = lengths_to_offsets(torch.tensor(lengths))
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])
    x = torch.randn(int(offsets[-1]), 3, dtype=torch.float64)
    got = block_running_mean(x, offsets, positions, block_size=4, max_len=max_len)
    for t in range(x.shape[0]):
        user = int(torch.searchsorted(offsets, t, right=True)) - 1
        same = [j for j in range(int(offsets[user]), t + 1) if positions[j] // 4 == positions[t] // 4]
        torch.testing.assert_close(got[t], x[same].mean(0), **TIGHT)


def test_fastmka_sources_match_the_recurrence_forward_and_backward():
    g = torch.Generator().manual_seed(3)
    lengths, starts = [0, 1, 4, 5, 11, 23], [0, 0, 4, 8, 3, 12]
    offsets = lengths_to_offsets(torch.tensor(lengths))
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])
    total = int(offsets[-1])
    x = torch.randn(total, 6, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(total, 3, generator=g, dtype=torch.float64, requires_grad=True)
    log_decay = torch.nn.functional.logsigmoid(torch.randn(3, generator=g, dtype=torch.float64)).requires_grad_()
    got = fastmka_sources(x, logits, log_decay, offsets, positions, max(lengths), block_size=4, chunk=5)
    want = fastmka_sources_recurrence(x, logits, log_decay, offsets, positions, block_size=4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TIGHT)
    cot = torch.randn(total, 6, generator=g, dtype=torch.float64)
    grads_got = torch.autograd.grad((got[0] * cot).sum(), (x, logits, log_decay))
    grads_want = torch.autograd.grad((want[0] * cot).sum(), (x, logits, log_decay))
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, **TIGHT)


def bank_brute_force(q, k, v, offsets, positions, *, local_window, block_size, max_blocks, scale):
    """Per user: every block's mean, a dense [n, blocks] visibility mask from the rule, softmax."""
    outs, flags = [], []
    for b in range(offsets.numel() - 1):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        block = positions[lo:hi] // block_size
        ids = torch.unique(block)
        means_k = torch.stack([k[lo:hi][block == g].mean(0) for g in ids]) if hi > lo else k[:0]
        means_v = torch.stack([v[lo:hi][block == g].mean(0) for g in ids]) if hi > lo else v[:0]
        newest = (positions[lo:hi, None] - local_window + 1) // block_size - 1
        visible = (ids[None] <= newest) & (ids[None] > newest - max_blocks)
        scores = torch.einsum("nhd,ghd->hng", q[lo:hi], means_k) * scale
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num()
        outs.append(torch.einsum("hng,ghd->nhd", probs, means_v))
        flags.append(visible.any(-1))
    return torch.cat(outs), torch.cat(flags)


@pytest.mark.parametrize("local_window, block_size, max_blocks", [
    (8, 4, 3), (1, 1, 5), (3, 5, 2), (20, 4, 1), (8, 4, 500), (128, 32, 256), (5, 2, 40),
])
@pytest.mark.parametrize("max_len", [None, 333, 350])
def test_bank_attention_matches_brute_force_across_many_tiles(local_window, block_size, max_blocks, max_len):
    """``max_len`` (the longest user or more: the block count from it, no host read) gives the same results."""
    g = torch.Generator().manual_seed(local_window * 1000 + block_size)
    lengths, starts = [0, 1, 9, 150, 333, 64], [0, 4, 1, 0, 8 * block_size + 3, 3]
    offsets = lengths_to_offsets(torch.tensor(lengths))
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])
    q, k, v = (torch.randn(int(offsets[-1]), 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    settings = dict(local_window=local_window, block_size=block_size, max_blocks=max_blocks, scale=0.7)
    got, has = bank_attention(q, k, v, offsets, positions, **settings, max_len=max_len)
    want, want_has = bank_brute_force(q, k, v, offsets, positions, **settings)
    assert torch.equal(has, want_has)
    torch.testing.assert_close(got, want, **TIGHT)
    cot = torch.randn(got.shape, generator=g, dtype=torch.float64)
    grads_got = torch.autograd.grad((got * cot).sum(), (q, k, v))
    grads_want = torch.autograd.grad((want * cot).sum(), (q, k, v))
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, **TIGHT)

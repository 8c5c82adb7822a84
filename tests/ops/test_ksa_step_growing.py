"""Full layers' growing cache (``step.GrowingCache``): many steps of random jagged batches give bitwise the
outputs and kept rows of the packed ``LayerCache`` path (CPU, same dtype, same reduction order), and the
dense oracle over the whole histories; appends are in place while a slot has room and slots double when
full; per-user tensors round-trip through ``user(b)`` / ``stack``."""

import random

import pytest
import torch

from ksa_rec.ops.ksa import KsaRule
from ksa_rec.ops.ksa.dense import ksa_dense
from ksa_rec.ops.ksa.step import (
    MIN_CAPACITY,
    GrowingCache,
    LayerCache,
    StepTokens,
    ksa_step_attention,
    share_layouts,
)
from ksa_rec.utils.jagged import lengths_to_offsets

H, D, K = 2, 8, 4


def _tokens(counts, new, S):
    """``StepTokens`` of a step where user b had ``counts[b]`` events and gets ``new[b]`` (as the encoder
    builds them), and per user its query rows: [(is_summary, identity)] in stream order per user."""
    positions = [i for c, t in zip(counts, new) for i in range(c, c + t)]
    sums = [[(i // K) * S + j for i in range(c, c + t) if (i + 1) % K == 0 for j in range(S)]
            for c, t in zip(counts, new)]
    tokens = StepTokens.build(lengths_to_offsets(torch.tensor(new)), torch.tensor(positions, dtype=torch.int64),
                              lengths_to_offsets(torch.tensor([len(s) for s in sums])),
                              torch.tensor([r for s in sums for r in s], dtype=torch.int64),
                              torch.tensor([c + t for c, t in zip(counts, new)]))
    return tokens, sums


class _Histories:
    """Random per-token q/k/v of whole histories (events and summaries), sliced into steps."""

    def __init__(self, lengths, S, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        self.S = S
        self.ev = [torch.randn(3, n, H, D, generator=g, dtype=torch.float64).to(dtype) for n in lengths]
        self.sm = [torch.randn(3, S * (n // K), H, D, generator=g, dtype=torch.float64).to(dtype) for n in lengths]

    def step(self, counts, new, sums):
        """q, k, v ``[Tn + Tsn, H, D]``: the step's events (user order), then its summaries."""
        ev = torch.cat([self.ev[b][:, c:c + t] for b, (c, t) in enumerate(zip(counts, new))], dim=1)
        sm = torch.cat([self.sm[b][:, s] for b, s in enumerate(sums)], dim=1) if any(sums) else ev[:, :0]
        return torch.cat([ev, sm], dim=1)

    def dense(self, rule):
        lengths = [e.shape[1] for e in self.ev]
        ev, sm = (torch.cat(x, dim=1) for x in (self.ev, self.sm))
        return ksa_dense(*ev, *sm, lengths_to_offsets(torch.tensor(lengths)), chunk_size=K, window=None,
                         summary_tokens=rule.summary_tokens)


def _schedule(lengths, rnd):
    """Per round, new events per user: some users join late (no events for a few rounds), then steps of
    1..6 events (or none) until their history is used up."""
    done, joins, rounds = [0] * len(lengths), [rnd.randint(0, 4) for _ in lengths], []
    r = 0
    while any(d < n for d, n in zip(done, lengths)):
        new = [0 if r < j else min(n - d, rnd.choice([0, 1, 1, 2, 3, 6])) for d, n, j in zip(done, lengths, joins)]
        rounds.append(new)
        done = [d + t for d, t in zip(done, new)]
        r += 1
    return rounds


def _assert_same_rows(grown, packed, users):
    for b in range(users):
        got, want = grown.user(b), packed.user(b)
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), (b, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("S", [0, 1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_many_steps_match_the_packed_path_bitwise_and_the_dense_oracle(seed, S, dtype):
    rnd = random.Random(seed)
    users = rnd.choice([1, 3, 7])
    lengths = [rnd.choice([0, 1, 3, 4, 5, 17, 40, 70]) for _ in range(users)]
    rule = KsaRule(K, None, S)
    hist = _Histories(lengths, S, dtype, seed)
    grown = GrowingCache.empty(users, H, D, dtype, "cpu")
    packed = LayerCache.empty(users, H, D, dtype, "cpu")
    counts = [0] * users
    outs = [{} for _ in range(users)]  # per user: (is_summary, identity) -> output row
    for new in _schedule(lengths, rnd):
        tokens, sums = _tokens(counts, new, S)
        q, k, v = hist.step(counts, new, sums)
        out_g, grown = ksa_step_attention(q, k, v, tokens, rule, grown, backend="torch")
        out_p, packed = ksa_step_attention(q, k, v, tokens, rule, packed, backend="torch")
        assert torch.equal(out_g, out_p)
        _assert_same_rows(grown, packed, users)
        assert grown.num_bytes == packed.num_bytes
        n = sum(new)
        ev_rows, sm_rows = out_g[:n].split(new), out_g[n:].split([len(s) for s in sums])
        for b in range(users):
            outs[b].update({(False, counts[b] + j): row for j, row in enumerate(ev_rows[b])})
            outs[b].update({(True, r): row for r, row in zip(sums[b], sm_rows[b])})
        counts = [c + t for c, t in zip(counts, new)]
    ref, ref_sum = hist.dense(rule)
    ev_off, sm_off = lengths_to_offsets(torch.tensor(lengths)), [0]
    for n in lengths:
        sm_off.append(sm_off[-1] + S * (n // K))
    for b, n in enumerate(lengths):
        assert len(outs[b]) == n + S * (n // K)
        if not n:
            continue
        got = torch.stack([outs[b][(False, i)] for i in range(n)] + [outs[b][(True, r)] for r in range(S * (n // K))])
        want = torch.cat([ref[ev_off[b]:ev_off[b + 1]], ref_sum[sm_off[b]:sm_off[b + 1]]])
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got, want.to(dtype), atol=tol, rtol=tol)


def test_appends_in_place_and_doubles_a_full_slot():
    rule = KsaRule(K, None, 1)
    users = 3
    hist = _Histories([200] * users, 1, torch.float32, 0)
    cache = GrowingCache.empty(users, H, D, torch.float32, "cpu")
    assert cache.slots.capacity.tolist() == [MIN_CAPACITY] * users
    counts, moves = [0] * users, 0
    for step in range(60):
        new = [1, 3, step % 2]
        tokens, sums = _tokens(counts, new, 1)
        ptr, capacity = cache.k_pool.data_ptr(), cache.slots.capacity.clone()
        _, cache = ksa_step_attention(*hist.step(counts, new, sums), tokens, rule, cache, backend="torch")
        counts = [c + t for c, t in zip(counts, new)]
        fits = all(c <= cap for c, cap in zip(counts, capacity.tolist()))
        assert (cache.k_pool.data_ptr() == ptr) == fits
        assert (cache.v_pool.data_ptr() == ptr) is False  # own pools
        if fits:
            assert torch.equal(cache.slots.capacity, capacity)
        else:  # only the full slots grow, each to double (powers of two)
            moves += 1
            for c, old, now in zip(counts, capacity.tolist(), cache.slots.capacity.tolist()):
                assert now == (old if c <= old else 2 * old)
        assert cache.slots.lengths.tolist() == counts
    # 60, 180 and 30 rows: slots 16 -> 64 (2 doublings), 16 -> 256 (4), 16 -> 32 (1), never in the same step
    assert cache.slots.capacity.tolist() == [64, 256, 32] and moves == 7


def test_a_held_state_never_changes_and_stepping_it_again_copies():
    rule = KsaRule(K, None, 1)
    hist = _Histories([30, 30], 1, torch.float64, 1)
    cache = GrowingCache.empty(2, H, D, torch.float64, "cpu")
    tokens, sums = _tokens([0, 0], [5, 2], 1)
    _, first = ksa_step_attention(*hist.step([0, 0], [5, 2], sums), tokens, rule, cache, backend="torch")
    kept = [{k: t.clone() for k, t in first.user(b).items()} for b in range(2)]
    tokens, sums = _tokens([5, 2], [2, 3], 1)
    out_a, second = ksa_step_attention(*hist.step([5, 2], [2, 3], sums), tokens, rule, first, backend="torch")
    assert second.k_pool.data_ptr() == first.k_pool.data_ptr()  # in place
    for b in range(2):  # the state the caller still holds reads as before
        assert all(torch.equal(first.user(b)[k], t) for k, t in kept[b].items())
    # Stepping the older state again (other events): copied first, so `second` keeps its rows.
    tokens, sums = _tokens([5, 2], [1, 1], 1)
    before = [{k: t.clone() for k, t in second.user(b).items()} for b in range(2)]
    _, branch = ksa_step_attention(*hist.step([5, 2], [1, 1], sums), tokens, rule, first, backend="torch")
    assert branch.k_pool.data_ptr() != first.k_pool.data_ptr()
    for b in range(2):
        assert all(torch.equal(second.user(b)[k], t) for k, t in before[b].items())
    packed = LayerCache.stack([first.user(b) for b in range(2)])
    _, expected = ksa_step_attention(*hist.step([5, 2], [1, 1], sums), tokens, rule, packed, backend="torch")
    _assert_same_rows(branch, expected, 2)


def test_stack_and_user_round_trip():
    rule = KsaRule(K, None, 1)
    lengths = [9, 0, 33, 1]
    hist = _Histories(lengths, 1, torch.float32, 2)
    tokens, sums = _tokens([0] * 4, lengths, 1)
    _, cache = ksa_step_attention(*hist.step([0] * 4, lengths, sums), tokens, rule,
                                  GrowingCache.empty(4, H, D, torch.float32, "cpu"), backend="torch")
    users = [cache.user(b) for b in range(4)]
    for b, u in enumerate(users):  # only the used rows, no spare capacity
        assert u["k"].shape == (lengths[b], H, D) and u["idx"].tolist() == list(range(lengths[b]))
        assert u["sk"].shape == (0, H, D) and u["sidx"].shape == (0,) and u["sidx"].dtype == torch.int64
    again = GrowingCache.stack(users)
    _assert_same_rows(again, LayerCache.stack(users), 4)
    assert again.num_bytes == LayerCache.stack(users).num_bytes == cache.num_bytes
    assert again.capacity_bytes > again.num_bytes
    assert again.slots.capacity.tolist() == [16, 16, 64, 16]  # powers of two above each length
    assert torch.equal(again.idx, cache.idx) and torch.equal(again.offsets, lengths_to_offsets(torch.tensor(lengths)))
    assert again.to("cpu") is not None and again.to("cpu").slots is again.slots  # not moved: same slots
    a, b, c = share_layouts([GrowingCache.stack(users), GrowingCache.stack(users), GrowingCache.stack(users[:2])])
    assert a.slots is b.slots and c.slots is not a.slots


@pytest.mark.parametrize("S", [0, 1])
def test_triton_reads_the_pool_with_its_spare_rows(S):
    """The Triton path reads each user's whole slot: spare rows (identity UNUSED, zeros) are never seen.
    CPU: under the Triton interpreter (tests/conftest.py)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rule = KsaRule(K, None, S)
    lengths = [13, 0, 6, 21]
    hist = _Histories(lengths, S, torch.float32, 3)
    grown = GrowingCache.empty(4, H, D, torch.float32, device)
    packed = LayerCache.empty(4, H, D, torch.float32, device)
    counts, rnd = [0] * 4, random.Random(3)
    for new in _schedule(lengths, rnd):
        tokens, sums = _tokens(counts, new, S)
        q, k, v = (t.to(device) for t in hist.step(counts, new, sums))
        tokens = StepTokens.build(*(t.to(device) for t in (tokens.offsets, tokens.positions, tokens.sum_offsets,
                                                             tokens.sum_ids, tokens.next_index)))
        out_t, grown = ksa_step_attention(q, k, v, tokens, rule, grown, backend="triton")
        out_p, packed = ksa_step_attention(q, k, v, tokens, rule, packed, backend="torch")
        torch.testing.assert_close(out_t, out_p, atol=1e-5, rtol=1e-5)  # another kernel: fp32 rounding
        counts = [c + t for c, t in zip(counts, new)]
    _assert_same_rows(grown.to("cpu"), packed.to("cpu"), 4)


def test_layers_sharing_slots_grow_them_once_whatever_their_rules():
    """Two full layers holding the same rows (shared slots) in one step, under two rules: the rows are
    appended once, and each layer's output is the packed path's under its own rule."""
    hist = _Histories([12, 7], 1, torch.float64, 4)
    first, second = share_layouts([GrowingCache.empty(2, H, D, torch.float64, "cpu") for _ in range(2)])
    assert first.slots is second.slots
    packed = LayerCache.empty(2, H, D, torch.float64, "cpu")
    counts = [0, 0]
    for new in ([5, 3], [4, 4], [3, 0]):
        tokens, sums = _tokens(counts, new, 1)
        q, k, v = hist.step(counts, new, sums)
        outs = []
        for rule in (KsaRule(K, None, 1), KsaRule(K, None, 1, max_summaries=0)):
            out_p, _ = ksa_step_attention(q, k, v, tokens, rule, packed, backend="torch")
            outs.append(out_p)
        out_a, first = ksa_step_attention(q, k, v, tokens, KsaRule(K, None, 1), first, backend="torch")
        out_b, second = ksa_step_attention(q, k, v, tokens, KsaRule(K, None, 1, max_summaries=0), second,
                                           backend="torch")
        _, packed = ksa_step_attention(q, k, v, tokens, KsaRule(K, None, 1), packed, backend="torch")
        assert first.slots is second.slots and torch.equal(out_a, outs[0]) and torch.equal(out_b, outs[1])
        counts = [c + t for c, t in zip(counts, new)]
        _assert_same_rows(first, packed, 2)
        _assert_same_rows(second, packed, 2)

"""MKA / FastMKA layers: parallel forward against the per-event recurrence (values and gradients of inputs
and every parameter), streaming ``step`` against ``forward``, state round trips, causality, isolation."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from ksa_rec.modules.mka import FastMkaAttention, FastMkaState, MkaAttention, MkaConfig, MkaState
from ksa_rec.ops.mka.recurrence import fastmka_sources_recurrence, mka_recurrence, window_attention_recurrence
from ksa_rec.ops.rope import RotaryEmbedding, apply_rotary
from ksa_rec.utils.jagged import lengths_to_offsets

TIGHT = dict(atol=1e-11, rtol=1e-10)
DIM, HEADS = 8, 2
# Small W1 / C3 / M3 so that short histories hit every edge: window full, blocks visible, bank cap.
SMALL = dict(local_window=8, session_slots=3, decay_init=(0.5, 0.9, 0.99), block_size=4, max_blocks=3,
             fast_window=6, scan_chunk=7, step_piece=5)
# Lengths 0, 1, around W1 = 8, around multiples of C3 = 4, and > W1 + several blocks; some users start at
# a multiple of C3 > 0 (truncated histories), one at a position inside a block.
LENGTHS = [0, 1, 7, 8, 9, 12, 13, 19, 30, 41]
STARTS = [0, 0, 8, 0, 4, 20, 5, 0, 12, 0]
KINDS = {"mka": MkaAttention, "fastmka": FastMkaAttention}


def make_layer(kind: str, seed: int = 0, **overrides):
    """A float64 layer with every parameter randomised (the router's last layer starts at zero weight)."""
    torch.manual_seed(seed)
    layer = KINDS[kind](DIM, HEADS, MkaConfig(**{**SMALL, **overrides})).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return layer


def make_batch(lengths=LENGTHS, starts=STARTS, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    offsets = lengths_to_offsets(torch.tensor(lengths, dtype=torch.int64))
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)]).long()
    x = torch.randn(int(offsets[-1]), DIM, generator=g, dtype=torch.float64)
    cos, sin = RotaryEmbedding(DIM // HEADS).tables(positions, torch.float64)
    return x, offsets, positions, cos, sin


def mka_by_recurrence(layer: MkaAttention, x, offsets, positions, cos, sin):
    cfg = layer.cfg
    q, k, v = F.linear(x, layer.qkv.weight).view(x.shape[0], 3, HEADS, DIM // HEADS).unbind(1)
    out, _ = mka_recurrence(q, k, v, cos, sin, layer.router(x), F.logsigmoid(layer.decay_logit), offsets, positions,
                            local_window=cfg.local_window, block_size=cfg.block_size, max_blocks=cfg.max_blocks,
                            mask_empty_bank=cfg.mask_empty_bank)
    return F.linear(out.flatten(1), layer.out.weight)


def fastmka_by_definition(layer: FastMkaAttention, x, offsets, positions, cos, sin):
    """Fused sources by the per-event loop, then K/V projected from them and plain windowed attention."""
    fused, _ = fastmka_sources_recurrence(x, layer.router(x), F.logsigmoid(layer.decay_logit), offsets, positions,
                                          block_size=layer.cfg.block_size)
    shape = (x.shape[0], HEADS, DIM // HEADS)
    q = apply_rotary(F.linear(x, layer.q_proj.weight).view(shape), cos, sin)
    k, v = F.linear(fused, layer.kv_proj.weight).view(x.shape[0], 2, *shape[1:]).unbind(1)
    out = window_attention_recurrence(q, apply_rotary(k, cos, sin), v, offsets, positions,
                                      window=layer.cfg.fast_window)
    return F.linear(out.flatten(1), layer.out.weight)


ORACLES = {"mka": mka_by_recurrence, "fastmka": fastmka_by_definition}


def assert_values_and_grads_match(layer, oracle, x, offsets, positions, cos, sin):
    x = x.clone().requires_grad_()
    params = dict(layer.named_parameters())
    got = layer(x, offsets, positions, cos, sin)
    want = oracle(layer, x, offsets, positions, cos, sin)
    torch.testing.assert_close(got, want, **TIGHT)
    cot = torch.randn(got.shape, generator=torch.Generator().manual_seed(7), dtype=got.dtype)
    inputs = [x, *params.values()]
    grads_got = torch.autograd.grad((got * cot).sum(), inputs)
    grads_want = torch.autograd.grad((want * cot).sum(), inputs)
    for name, a, b in zip(["x", *params], grads_got, grads_want):
        assert b.abs().sum() > 0, f"{name}: the oracle's gradient is zero, the test would be vacuous"
        torch.testing.assert_close(a, b, **TIGHT, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("mask_empty_bank", [True, False])
def test_mka_forward_and_backward_match_the_recurrence(mask_empty_bank):
    layer = make_layer("mka", mask_empty_bank=mask_empty_bank)
    assert_values_and_grads_match(layer, mka_by_recurrence, *make_batch())


@pytest.mark.parametrize("fast_window", [6, None])
def test_fastmka_forward_and_backward_match_its_fused_source_definition(fast_window):
    layer = make_layer("fastmka", fast_window=fast_window)
    assert_values_and_grads_match(layer, fastmka_by_definition, *make_batch())


def test_mka_matches_the_recurrence_with_a_window_smaller_than_a_block():
    layer = make_layer("mka", local_window=3, block_size=5, max_blocks=2)
    assert_values_and_grads_match(layer, mka_by_recurrence, *make_batch())


def feed(layer, batch, pieces_per_user):
    """Run ``step`` over the batch, user b's events split into ``pieces_per_user[b]`` (a list of sizes)."""
    x, offsets, positions, cos, sin = batch
    users = offsets.numel() - 1
    state = layer.init_state(users, x.device, x.dtype)
    out = torch.full_like(x, float("nan"))  # an event never written fails the comparison
    done = [0] * users
    for call in range(max(len(p) for p in pieces_per_user)):
        sizes = [p[call] if call < len(p) else 0 for p in pieces_per_user]
        rows = torch.tensor([int(offsets[b]) + done[b] + i for b in range(users) for i in range(sizes[b])],
                            dtype=torch.int64)
        y, state = layer.step(x[rows], lengths_to_offsets(torch.tensor(sizes)), positions[rows], cos[rows],
                              sin[rows], state)
        out[rows] = y
        done = [d + s for d, s in zip(done, sizes)]
    return out, state


def random_pieces(lengths, seed):
    rng = random.Random(seed)
    pieces = []
    for n in lengths:
        sizes = []
        while n > 0:
            size = rng.choice([0, 1, 2, 3, 6, 11, 40])
            sizes.append(min(size, n))
            n -= sizes[-1]
        pieces.append(sizes + [0] * rng.randint(0, 2))
    return pieces


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("step_piece", [1, 5, 64])
@pytest.mark.parametrize("split", ["events", "random", "whole"])
def test_step_in_pieces_equals_forward(kind, step_piece, split):
    layer = make_layer(kind, step_piece=step_piece)
    batch = make_batch()
    want = layer(*batch)
    pieces = {"events": [[1] * n for n in LENGTHS], "random": random_pieces(LENGTHS, step_piece),
              "whole": [[n] for n in LENGTHS]}[split]
    got, state = feed(layer, batch, pieces)
    torch.testing.assert_close(got, want, **TIGHT)
    assert state.count.tolist() == LENGTHS
    assert [int(s) for s, n in zip(state.start, LENGTHS) if n] == [s for s, n in zip(STARTS, LENGTHS) if n]


@pytest.mark.parametrize("kind", KINDS)
def test_step_equals_forward_with_the_default_config(kind):
    torch.manual_seed(0)
    layer = KINDS[kind](DIM, HEADS, MkaConfig()).double()
    lengths, starts = [300, 0, 40], [64, 0, 0]
    batch = make_batch(lengths, starts)
    want = layer(*batch)
    got, _ = feed(layer, batch, [[1] * 5 + [100, 3, 192], [], [40]])
    torch.testing.assert_close(got, want, **TIGHT)


@pytest.mark.parametrize("kind", KINDS)
def test_state_survives_select_cat_and_serialisation(kind):
    layer = make_layer(kind)
    x, offsets, positions, cos, sin = batch = make_batch()
    want = layer(*batch)
    users = len(LENGTHS)
    first = [n // 2 for n in LENGTHS]
    rows1 = torch.tensor([int(offsets[b]) + i for b in range(users) for i in range(first[b])], dtype=torch.int64)
    rows2 = torch.tensor([int(offsets[b]) + i for b in range(users) for i in range(first[b], LENGTHS[b])],
                         dtype=torch.int64)
    state = layer.init_state(users, x.device, x.dtype)
    y1, state = layer.step(x[rows1], lengths_to_offsets(torch.tensor(first)), positions[rows1], cos[rows1],
                           sin[rows1], state)
    # Split the users, store each one alone, reload them in reverse and put the batch back in order.
    kind_cls = type(state)
    alone = [kind_cls.from_tensors({k: v.clone() for k, v in state.select(torch.tensor([b])).to_tensors().items()})
             for b in range(users)]
    reversed_batch = kind_cls.cat(alone[::-1])
    state = reversed_batch.select(torch.arange(users - 1, -1, -1))
    second = [n - f for n, f in zip(LENGTHS, first)]
    y2, _ = layer.step(x[rows2], lengths_to_offsets(torch.tensor(second)), positions[rows2], cos[rows2],
                       sin[rows2], state)
    got = torch.full_like(want, float("nan"))
    got[rows1], got[rows2] = y1, y2
    torch.testing.assert_close(got, want, **TIGHT)


@pytest.mark.parametrize("kind", KINDS)
def test_changing_an_event_never_changes_earlier_outputs(kind):
    layer = make_layer(kind)
    x, offsets, positions, cos, sin = make_batch([41], [12])
    base = layer(x, offsets, positions, cos, sin)
    for j in (0, 3, 4, 8, 17, 40):
        changed = x.clone()
        changed[j] += 1.0
        out = layer(changed, offsets, positions, cos, sin)
        assert torch.equal(out[:j], base[:j]), f"event {j} leaked into the past"
        assert not torch.allclose(out[j], base[j])


@pytest.mark.parametrize("kind", KINDS)
def test_users_never_see_each_other(kind):
    layer = make_layer(kind)
    x, offsets, positions, cos, sin = make_batch()
    together = layer(x, offsets, positions, cos, sin)
    for b, n in enumerate(LENGTHS):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        alone = layer(x[lo:hi], torch.tensor([0, n]), positions[lo:hi], cos[lo:hi], sin[lo:hi])
        torch.testing.assert_close(together[lo:hi], alone, **TIGHT)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batches(kind):
    layer = make_layer(kind)
    x, offsets, positions, cos, sin = make_batch([0, 0], [0, 0])
    assert layer(x, offsets, positions, cos, sin).shape == (0, DIM)
    state = layer.init_state(2, x.device, x.dtype)
    y, after = layer.step(x, offsets, positions, cos, sin, state)
    assert y.shape == (0, DIM) and after is state
    y, after = layer.step(x[:0], torch.tensor([0]), positions, cos, sin, layer.init_state(0, x.device, x.dtype))
    assert y.shape == (0, DIM) and after.batch == 0


def test_router_starts_at_its_prior_and_logs_its_mean():
    layer = MkaAttention(DIM, HEADS, MkaConfig(**SMALL)).double()
    x, offsets, positions, cos, sin = make_batch([20], [0])
    layer(x, offsets, positions, cos, sin)
    # Events 0..10 see no block (W1 = 8, C3 = 4): the router renormalises over L1 and L2.
    mean = (11 * torch.tensor([0.75, 0.25, 0.0]) + 9 * torch.tensor([0.6, 0.2, 0.2])) / 20
    torch.testing.assert_close(layer.last_router_mean, mean.double())
    layer(x[:0], offsets[:1] * 0, positions[:0], cos[:0], sin[:0])
    assert layer.last_router_mean is None


def test_decays_start_at_decay_init_and_learn():
    layer = MkaAttention(DIM, HEADS, MkaConfig(**SMALL)).double()
    torch.testing.assert_close(torch.sigmoid(layer.decay_logit), torch.tensor([[0.5, 0.9, 0.99]] * HEADS).double())
    assert layer.decay_logit.requires_grad
    assert FastMkaAttention(DIM, HEADS, MkaConfig(**SMALL)).decay_logit.shape == (3,)


@pytest.mark.parametrize("field, value, message", [
    ("local_window", 0, "mka.local_window"),
    ("decay_init", (0.5, 1.0, 0.9, 0.9), "mka.decay_init"),
    ("decay_init", (0.5, 0.9), "mka.decay_init"),
    ("router_init", (0.6, 0.4), "mka.router_init"),
    ("router_init", (0.6, 0.4, 0.0), "mka.router_init"),
    ("fast_window", 0, "mka.fast_window"),
    ("max_blocks", -1, "mka.max_blocks"),
    ("block_size", True, "mka.block_size"),
    ("router_hidden_ratio", 0.0, "mka.router_hidden_ratio"),
    ("window_backend", "cuda", "mka.window_backend"),
])
def test_bad_config_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message) as err:
        MkaConfig(**{field: value})
    assert "\n" not in str(err.value)


def test_config_accepts_lists_from_yaml():
    cfg = MkaConfig(decay_init=[0.5, 0.6], session_slots=2, router_init=[1, 1, 1])
    assert cfg.decay_init == (0.5, 0.6) and cfg.router_init == (1.0, 1.0, 1.0)


def test_bad_states_and_inputs_fail_with_one_line():
    layer = make_layer("mka")
    x, offsets, positions, cos, sin = make_batch([5, 3], [0, 4])
    state = layer.init_state(2, x.device, x.dtype)
    tensors = state.to_tensors()
    with pytest.raises(ValueError, match="missing"):
        MkaState.from_tensors({k: v for k, v in tensors.items() if k != "ema_den"})
    with pytest.raises(ValueError, match="ema_den"):
        MkaState.from_tensors({**tensors, "ema_den": tensors["ema_den"][:, :, :2]})
    with pytest.raises(ValueError, match="bank_count"):
        MkaState.from_tensors({**tensors, "bank_count": tensors["bank_count"].double()})
    other = MkaAttention(DIM, HEADS, MkaConfig(**{**SMALL, "local_window": 9}))
    with pytest.raises(ValueError, match="ring_kv"):
        layer.step(x, offsets, positions, cos, sin, other.init_state(2, x.device, x.dtype))
    with pytest.raises(ValueError, match="FastMkaState"):
        layer.step(x, offsets, positions, cos, sin, make_layer("fastmka").init_state(2, x.device, x.dtype))
    _, state = layer.step(x, offsets, positions, cos, sin, state)
    with pytest.raises(ValueError, match="continue"):
        layer.step(x, offsets, positions, cos, sin, state)  # the same events again
    with pytest.raises(ValueError, match="consecutive"):
        layer(x, offsets, positions.flip(0), cos, sin)
    with pytest.raises(ValueError, match="fast_window"):
        make_layer("fastmka", fast_window=None).init_state(1, x.device, x.dtype)
    with pytest.raises(ValueError, match="cat"):
        FastMkaState.cat([])


@pytest.mark.parametrize("kind, heads, dim, bytes_per_user", [
    # Defaults W1 = Wf = 128, S2 = 4, C3 = 32, M3 = 256, step_piece = 64 -> bank N = 263 slots; float32.
    ("mka", 2, 64, 4 * (128 * 2 * 64 + 2 * 4 * 64 + 2 * 4 + 263 * 2 * 64) + 8 * (2 + 263)),
    ("fastmka", 2, 64, 4 * (128 * 2 * 64 + 4 * 64 + 4 + 64) + 8 * 3),
])
def test_state_size_is_fixed_per_user(kind, heads, dim, bytes_per_user):
    layer = KINDS[kind](dim, heads, MkaConfig())
    assert layer.init_state(3, "cpu", torch.float32).nbytes_per_user() == bytes_per_user

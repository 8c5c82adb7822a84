"""Encoder-level properties for every attention kind and for hybrid patterns."""

import pytest
import torch

from ksa_rec.modules.config import EncoderConfig
from ksa_rec.modules.encoder import SequenceEncoder
from ksa_rec.ops.causal import causal_attention
from ksa_rec.ops.ksa import KsaRule, ksa_attention
from ksa_rec.ops.ksa.dense import ksa_dense

PATTERNS = ["full,full", "ksa,ksa", "ksa*3,full", "sca,full", "swa,ksa", "sca", "swa", "mka,full", "fastmka,mka"]
LENGTHS = [37, 0, 1, 4, 13, 26]


def _encoder(pattern: str, **kw) -> SequenceEncoder:
    torch.manual_seed(0)
    settings = dict(dim=16, num_heads=2, dropout=0.0, chunk_size=4, window=2, attention_backend="torch",
                    mka=dict(local_window=6, block_size=4, max_blocks=3, fast_window=5))
    cfg = EncoderConfig(pattern=pattern, **{**settings, **kw})
    return SequenceEncoder(cfg).double().eval()


def _inputs(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    tokens = torch.randn(int(offsets[-1]), 16, generator=g, dtype=torch.float64)
    positions = torch.cat([torch.arange(n) for n in lengths]) if sum(lengths) else torch.zeros(0, dtype=torch.long)
    return tokens, offsets, positions


@pytest.mark.parametrize("pattern", PATTERNS)
def test_causal_at_every_event(pattern):
    enc = _encoder(pattern)
    tokens, offsets, positions = _inputs([37])
    base = enc(tokens, offsets, positions)
    for j in (3, 4, 17, 36):  # inside chunks and at chunk starts
        changed = tokens.clone()
        changed[j] += 1.0
        out = enc(changed, offsets, positions)
        assert torch.allclose(out[:j], base[:j], atol=1e-12), f"event {j} leaked into the past"
        assert not torch.allclose(out[j], base[j])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_users_never_see_each_other(pattern):
    enc = _encoder(pattern)
    tokens, offsets, positions = _inputs(LENGTHS)
    together = enc(tokens, offsets, positions)
    for b, n in enumerate(LENGTHS):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        alone = enc(tokens[lo:hi], torch.tensor([0, n]), positions[lo:hi])
        assert torch.allclose(together[lo:hi], alone, atol=1e-10)


def test_full_layers_ignore_the_summary_stream():
    # A full layer's events see no summaries, so adding a summary stream (forced by a ksa layer that
    # sees everything: window larger than any history) must not change event outputs.
    tokens, offsets, positions = _inputs(LENGTHS)
    full = _encoder("full,full")
    ksa_as_full = _encoder("ksa,full", window=1000)
    ksa_as_full.load_state_dict(full.state_dict(), strict=False)
    assert torch.allclose(full(tokens, offsets, positions), ksa_as_full(tokens, offsets, positions), atol=1e-10)


def test_causal_sdpa_equals_ksa_op_without_window():
    g = torch.Generator().manual_seed(3)
    offsets = torch.tensor([0, 5, 5, 22, 23])
    q, k, v = (torch.randn(23, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    empty = q.new_zeros(0, 2, 8)
    via_sdpa = causal_attention(q, k, v, offsets)
    via_ksa, _ = ksa_attention(q, k, v, empty, empty, empty, offsets, KsaRule(4, None, 0), backend="torch")
    assert torch.allclose(via_sdpa, via_ksa, atol=1e-12)


def test_summaries_carry_information_beyond_the_window():
    # An old event (far outside the window) changes the newest event's output only through summaries:
    # ksa sees it, sca and swa must not.
    tokens, offsets, positions = _inputs([40])
    changed = tokens.clone()
    changed[1] += 3.0
    for pattern, sees in [("ksa,ksa", True), ("sca,sca", False), ("swa,swa", False)]:
        enc = _encoder(pattern)
        moved = not torch.allclose(enc(tokens, offsets, positions)[-1], enc(changed, offsets, positions)[-1])
        assert moved == sees, pattern


@pytest.mark.parametrize("pattern", ["ksa*3,full", "sca,ksa"])
def test_backends_agree(pattern):
    # Flex runs forward-only on CPU; the encoder must give the same outputs through either backend.
    tokens, offsets, positions = _inputs(LENGTHS)
    enc = _encoder(pattern).float()
    out_torch = enc(tokens.float(), offsets, positions)
    enc.cfg.attention_backend = "flex"
    with torch.no_grad():
        out_flex = enc(tokens.float(), offsets, positions)
    assert torch.allclose(out_torch, out_flex, atol=1e-4)


@pytest.mark.parametrize("pattern", ["ksa*3,full", "swa,sca", "mka,fastmka"])
def test_runs_under_bf16_autocast(pattern):
    # Projections return bf16 under autocast while RoPE tables are float32: q, k and v must still reach
    # the attention op in one dtype (this broke bf16-mixed training once).
    tokens, offsets, positions = _inputs(LENGTHS)
    enc = _encoder(pattern).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(tokens.float(), offsets, positions)
    assert out.shape == tokens.shape and torch.isfinite(out).all()


def _first_summary_inputs(enc, tokens, offsets, positions):
    """The summary stream entering the first layer (what its summary keys are made from)."""
    captured = {}
    # the layer's input is the stream: the events, then the summaries
    hook = enc.blocks[0].attn.register_forward_hook(
        lambda mod, args, out: captured.update(xs=args[0][args[1].num_events:]))
    try:
        enc(tokens, offsets, positions)
    finally:
        hook.remove()
    return captured["xs"]


@pytest.mark.parametrize("summary_init", ["slot", "chunk"])
def test_first_layer_summaries_carry_their_chunk_only_when_chunk_seeded(summary_init):
    enc = _encoder("ksa,ksa", summary_init=summary_init)
    tokens, offsets, positions = _inputs([21])  # chunks 0..4 complete (k = 4), event 20 open
    base = _first_summary_inputs(enc, tokens, offsets, positions)
    changed = tokens.clone()
    changed[9] += 1.0  # an event of chunk 2
    moved = _first_summary_inputs(enc, changed, offsets, positions)
    differs = [not torch.equal(moved[c], base[c]) for c in range(5)]
    assert differs == ([c == 2 for c in range(5)] if summary_init == "chunk" else [False] * 5)


def _dense_ksa_attention(q, k, v, q_sum, k_sum, v_sum, offsets, rule, *, scale=None, backend=None, check_offsets=True,
                         tables=None):
    """ksa_attention computed by the dense oracle (heads repeated for GQA)."""
    rep = q.shape[1] // k.shape[1]
    k, v, k_sum, v_sum = (x.repeat_interleave(rep, dim=1) for x in (k, v, k_sum, v_sum))
    return ksa_dense(q, k, v, q_sum, k_sum, v_sum, offsets, chunk_size=rule.chunk_size, window=rule.window,
                     summary_tokens=rule.summary_tokens, max_summaries=rule.max_summaries,
                     window_unit=rule.window_unit, scale=scale)


def _outputs_and_grads(enc, tokens, offsets, positions):
    out = enc(tokens, offsets, positions)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    params = [p for _, p in sorted(enc.named_parameters())]
    return out.detach(), torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("backend", ["torch", "triton", "flex"])
@pytest.mark.parametrize("pattern", ["ksa,ksa", "swa,ksa", "full,ksa"])
def test_chunk_seeded_summaries_match_the_dense_oracle_on_every_backend(pattern, backend, monkeypatch):
    """Forward and every parameter's gradient (the pooling map's included) against the same encoder with
    the attention computed by the dense oracle. Triton runs under the interpreter here; Flex has no CPU
    backward, so it is checked forward only."""
    tokens, offsets, positions = _inputs([23, 0, 9, 16])
    enc = _encoder(pattern, summary_init="chunk", summary_tokens=2, attention_backend=backend)
    dtype = torch.float32 if backend == "triton" else torch.float64  # the kernels compute in fp32 at most
    enc, tokens = enc.to(dtype), tokens.to(dtype)
    if backend == "flex":
        with torch.no_grad():
            got = enc(tokens, offsets, positions)
    else:
        got, got_grads = _outputs_and_grads(enc, tokens, offsets, positions)
    monkeypatch.setattr("ksa_rec.modules.attention.ksa_attention", _dense_ksa_attention)
    want, want_grads = _outputs_and_grads(enc.double(), tokens.double(), offsets, positions)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got.double(), want, **tol)
    if backend != "flex":
        assert torch.count_nonzero(want_grads[[n for n, _ in sorted(enc.named_parameters())].index(
            "summary_pool.weight")]) > 0
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g.double(), w, **tol)


@pytest.mark.parametrize("summary_init", ["slot", "chunk"])
@pytest.mark.parametrize("pattern", ["ksa,ksa", "swa,ksa", "ksa*3,full"])
def test_shared_summary_projection_is_the_own_one_tied_to_the_events(pattern, summary_init):
    """summary_qkv: shared = an encoder with its own summary projections set equal to the events' (and, chunk-seeded,
    its pooling map set to the identity, where shared starts it), forward and in each tied weight's gradient."""
    tokens, offsets, positions = _inputs(LENGTHS)
    shared = _encoder(pattern, summary_init=summary_init, summary_qkv="shared")
    own = _encoder(pattern, summary_init=summary_init)
    assert all(block.attn.qkv_sum is None for block in shared.blocks)
    tied = dict(shared.state_dict())
    for i in range(len(own.blocks)):
        tied[f"blocks.{i}.attn.qkv_sum.weight"] = tied[f"blocks.{i}.attn.qkv.weight"]
    if summary_init == "chunk":
        torch.testing.assert_close(shared.summary_pool.weight, torch.eye(16, dtype=torch.float64), atol=0, rtol=0)
    own.load_state_dict(tied)
    got, got_grads = _outputs_and_grads(shared, tokens, offsets, positions)
    want, want_grads = _outputs_and_grads(own, tokens, offsets, positions)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    want_by_name = dict(zip([n for n, _ in sorted(own.named_parameters())], want_grads))
    for name, grad in zip([n for n, _ in sorted(shared.named_parameters())], got_grads):
        expected = want_by_name[name]
        if name.endswith("attn.qkv.weight"):  # the shared projection gets both streams' gradients
            expected = expected + want_by_name[name.replace("attn.qkv.", "attn.qkv_sum.")]
        torch.testing.assert_close(grad, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("pattern", ["ksa,ksa", "swa,ksa"])
def test_delta_summary_projection_is_the_events_plus_its_correction(pattern):
    """summary_qkv: delta = own summary projections holding the events' weight plus the correction: equal to shared
    at initialisation (the correction starts at zero), and to own with the summed weight once it has moved."""
    tokens, offsets, positions = _inputs(LENGTHS)
    delta = _encoder(pattern, summary_init="chunk", summary_qkv="delta")
    shared = _encoder(pattern, summary_init="chunk", summary_qkv="shared")
    assert all(torch.count_nonzero(block.attn.qkv_sum.weight) == 0 for block in delta.blocks)
    shared.load_state_dict({n: v for n, v in delta.state_dict().items() if "qkv_sum" not in n})
    torch.testing.assert_close(delta(tokens, offsets, positions), shared(tokens, offsets, positions), atol=0, rtol=0)
    with torch.no_grad():
        for block in delta.blocks:
            block.attn.qkv_sum.weight.normal_()
    own = _encoder(pattern, summary_init="chunk")
    summed = dict(delta.state_dict())
    for i in range(len(delta.blocks)):
        summed[f"blocks.{i}.attn.qkv_sum.weight"] = summed[f"blocks.{i}.attn.qkv.weight"] + summed[
            f"blocks.{i}.attn.qkv_sum.weight"]
    own.load_state_dict(summed)
    moved = delta(tokens, offsets, positions)
    assert not torch.allclose(moved, shared(tokens, offsets, positions))
    torch.testing.assert_close(moved, own(tokens, offsets, positions), atol=1e-12, rtol=1e-12)


def test_unknown_summary_qkv_names_the_field():
    with pytest.raises(ValueError, match="encoder.summary_qkv"):
        EncoderConfig(summary_qkv="tied")


def test_chunk_seeding_is_unused_without_a_summary_stream():
    """Like window for a full-only pattern: a config default that patterns without ksa layers do not use."""
    tokens, offsets, positions = _inputs(LENGTHS)
    torch.testing.assert_close(_encoder("sca,full", summary_init="chunk")(tokens, offsets, positions),
                               _encoder("sca,full")(tokens, offsets, positions), atol=0, rtol=0)


@pytest.mark.parametrize("pattern", ["full,full", "ksa,full"])
def test_event_mask_zeroes_whole_input_tokens_in_training_only(pattern):
    tokens, offsets, positions = _inputs(LENGTHS)
    enc = _encoder(pattern, event_mask=0.5, summary_init="chunk")
    plain = _encoder(pattern, summary_init="chunk")
    # Evaluation (and so streaming and scoring) never masks.
    torch.testing.assert_close(enc(tokens, offsets, positions), plain(tokens, offsets, positions), atol=0, rtol=0)
    enc.train()
    torch.manual_seed(7)
    masked = enc(tokens, offsets, positions)
    torch.manual_seed(7)
    keep = torch.rand(tokens.shape[0], 1) >= 0.5
    assert 0 < int(keep.sum()) < tokens.shape[0]
    # dropout is 0, so training differs from evaluation only by the zeroed events
    torch.testing.assert_close(masked, plain(tokens * keep, offsets, positions), atol=1e-12, rtol=0)


def test_event_mask_out_of_range_names_the_field():
    with pytest.raises(ValueError, match="encoder.event_mask"):
        EncoderConfig(event_mask=1.0)


@pytest.mark.parametrize(("settings", "field"), [({"hstu": {"max_distance": 0}}, "encoder.hstu.max_distance"),
                                                 ({"hstu": {"normalizer": 0.0}}, "encoder.hstu.normalizer"),
                                                 ({"pattern": "hstu,ksa"}, "encoder.pattern")])
def test_bad_hstu_settings_name_the_field(settings, field):
    """hstu settings come as the YAML's dict; a bad one, or hstu beside a kind that reads summaries, is refused."""
    with pytest.raises(ValueError, match=field):
        EncoderConfig(**settings)


@pytest.mark.slow
def test_layers_of_one_pass_share_the_kernels_block_tables(monkeypatch):
    """`ksa*3,full` on Triton (the interpreter on CPU): one set of block tables per rule for the whole
    forward and backward pass (the KSA rule and the full-with-summaries rule), not one per layer and pass;
    results equal the torch backend's."""
    from ksa_rec.ops.ksa import triton_op

    built = []
    original_init = triton_op._Plan.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self.__class__)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(triton_op._Plan, "__init__", counting_init)
    tokens, offsets, positions = _inputs(LENGTHS)
    on_triton = _encoder("ksa*3,full", attention_backend="triton").float()
    x = tokens.float().requires_grad_()
    out = on_triton(x, offsets, positions)
    out.sum().backward()
    assert len(built) == 2
    want = _encoder("ksa*3,full").float()(tokens.float(), offsets, positions)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def _ligr(pattern: str, gate_bias: float, **kw) -> SequenceEncoder:
    """An encoder with gated residuals whose gates are the constant ``sigmoid(gate_bias)``."""
    enc = _encoder(pattern, residual_gates=True, **kw)
    with torch.no_grad():
        for block in enc.blocks:
            for gate in (block.attn_gate, block.ffn_gate):
                gate.weight.zero_()
                gate.bias.fill_(gate_bias)
    return enc


@pytest.mark.parametrize("pattern", ["full,full", "ksa,ksa", "sca,full"])
def test_residual_gates_scale_each_branch_by_their_sigmoid(pattern):
    """Closed gates leave the stream as it came in (every block is the identity); open gates give the plain
    encoder with the same weights; a gate of 1/2 halves both branches, like the plain block with each branch's
    output layer halved."""
    tokens, offsets, positions = _inputs(LENGTHS)
    plain = _encoder(pattern)
    closed, open_ = _ligr(pattern, -80.0), _ligr(pattern, 80.0)
    for gated in (closed, open_):
        missing = gated.load_state_dict(plain.state_dict(), strict=False).missing_keys
        assert missing and all("_gate." in key for key in missing)
    torch.testing.assert_close(closed(tokens, offsets, positions), closed.final_norm(tokens), atol=1e-12, rtol=0)
    torch.testing.assert_close(open_(tokens, offsets, positions), plain(tokens, offsets, positions),
                               atol=1e-12, rtol=0)
    half = _ligr(pattern, 0.0)
    half.load_state_dict(plain.state_dict(), strict=False)
    halved = _encoder(pattern)
    halved.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for block in halved.blocks:
            block.attn.out.weight.mul_(0.5)  # (no bias)
            block.ffn[3].weight.mul_(0.5)
            block.ffn[3].bias.mul_(0.5)
    torch.testing.assert_close(half(tokens, offsets, positions), halved(tokens, offsets, positions),
                               atol=1e-12, rtol=0)


def test_each_gate_reads_the_stream_its_branch_joins():
    """With learned (non-constant) gates: the attention branch is gated by the block's input, the feed-forward
    branch by the stream after the attention add, as LiGR layers do. Every path (forward, step, fixed step) goes
    through ``residual_and_ffn``."""
    block = _encoder("full,full", residual_gates=True).blocks[0]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for gate in (block.attn_gate, block.ffn_gate):
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g, dtype=torch.float64))
            gate.bias.copy_(torch.randn(gate.bias.shape, generator=g, dtype=torch.float64))
    h, a = (torch.randn(7, 16, generator=g, dtype=torch.float64) for _ in range(2))
    mid = h + torch.sigmoid(block.attn_gate(h)) * a
    want = mid + torch.sigmoid(block.ffn_gate(mid)) * block.ffn(block.ffn_norm(mid))
    torch.testing.assert_close(block.residual_and_ffn(h, a), want)


def test_swiglu_feed_forward_is_silu_gate_times_value():
    enc = _encoder("full,full", ffn_activation="swiglu", ffn_mult=3)
    ffn = enc.blocks[0].ffn
    x = torch.randn(5, 16, dtype=torch.float64)
    a, b = ffn.inner.weight[:48], ffn.inner.weight[48:]
    ba, bb = ffn.inner.bias[:48], ffn.inner.bias[48:]
    expected = (torch.nn.functional.silu(x @ a.T + ba) * (x @ b.T + bb)) @ ffn.out.weight.T + ffn.out.bias
    torch.testing.assert_close(ffn(x), expected)
    assert ffn.inner.weight.shape == (96, 16)  # hidden width ffn_mult * dim, for the gate and the value


@pytest.mark.parametrize("pattern", ["full,full", "ksa,ksa", "mka,full"])
def test_gated_swiglu_encoder_stays_causal(pattern):
    enc = _encoder(pattern, residual_gates=True, ffn_activation="swiglu")
    tokens, offsets, positions = _inputs([37])
    base = enc(tokens, offsets, positions)
    for j in (4, 17):
        changed = tokens.clone()
        changed[j] += 1.0
        out = enc(changed, offsets, positions)
        assert torch.allclose(out[:j], base[:j], atol=1e-12) and not torch.allclose(out[j], base[j])


def test_unknown_ffn_activation_names_the_field():
    with pytest.raises(ValueError, match="encoder.ffn_activation"):
        EncoderConfig(ffn_activation="relu")

"""``model.encoder.cuda_graphs``: the encoder's training pass replayed from CUDA graphs per repeating layout.

On CPU every pass is eager (and equal to a model without graphs); on CUDA a graphed model trains exactly as
its eager twin: same losses, gradients and weights step after step, under fp32 and bf16 autocast, with
dropout drawing new masks each replay, with gradient accumulation, and across layouts (a layout seen once
stays eager, a repeated one is captured)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from ksa_rec.modules.config import EncoderConfig
from ksa_rec.modules.encoder import SequenceEncoder
from ksa_rec.modules.graphs import MAX_GRAPHS, EncoderGraphs
from ksa_rec.modules.mka import MkaConfig
from ksa_rec.utils.jagged import lengths_to_offsets, positions_in_segment

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _twins(pattern: str, device, dropout: float = 0.0, **kw) -> tuple[SequenceEncoder, SequenceEncoder]:
    """An eager encoder and a graphed one with the same weights."""
    torch.manual_seed(0)
    cfg = dict(dim=32, num_heads=2, pattern=pattern, dropout=dropout, chunk_size=4, window=2, **kw)
    eager = SequenceEncoder(EncoderConfig(**cfg)).to(device)
    graphed = SequenceEncoder(EncoderConfig(**cfg, cuda_graphs=True)).to(device)
    graphed.load_state_dict(eager.state_dict())
    return eager, graphed


def _batch(lengths, device, first_position: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    offsets = lengths_to_offsets(torch.tensor(lengths))
    positions = positions_in_segment(offsets) + first_position
    tokens = torch.randn(int(offsets[-1]), 32, generator=g)
    times = torch.randn(int(offsets[-1]), 32, generator=g)
    return (tokens.to(device).requires_grad_(), offsets.to(device), positions.to(device), times.to(device),
            max(lengths))


def _loss(enc, tokens, offsets, positions, times, max_len):
    out = enc(tokens, offsets, positions, times, max_len)
    return (out.float() ** 2).mean() + out.float()[:, 0].sum() * 1e-2


def test_on_cpu_every_pass_is_eager_and_equals_the_model_without_graphs():
    eager, graphed = _twins("ksa,full", "cpu", summary_init="chunk")
    for _ in range(3):  # a repeated layout: on CUDA the second pass would capture it
        batch = _batch([9, 4, 12], "cpu")
        loss_e, loss_g = _loss(eager, *batch), _loss(graphed, *batch)
        loss_e.backward()
        loss_g.backward()
        assert torch.equal(loss_e, loss_g)
    for (name, pe), pg in zip(eager.named_parameters(), graphed.parameters()):
        assert torch.equal(pe.grad, pg.grad), name
    assert (graphed.graphs.captures, graphed.graphs.replays, graphed.graphs.eager) == (0, 0, 3)
    assert eager.graphs is None


def test_graphs_are_not_state_and_copies_start_without_any():
    _, graphed = _twins("ksa,ksa", "cpu")
    graphed.graphs.eager = 5
    assert not any("graph" in key for key in graphed.state_dict())
    for clone in (copy.deepcopy(graphed), pickle.loads(pickle.dumps(graphed))):
        assert isinstance(clone.graphs, EncoderGraphs) and clone.graphs is not graphed.graphs
        assert clone.graphs.eager == 0


def test_the_captured_pass_runs_on_parameter_aliases():
    """What a capture runs (CPU-checkable): the encoder's pass over a plan, on leaves that share the parameters'
    storage, so gradients reach the aliases, never the parameters' own gradient nodes, and updates of the
    parameters in place reach the pass."""
    from ksa_rec.modules.graphs import _Run

    _, graphed = _twins("ksa,full", "cpu", summary_init="chunk")
    tokens, offsets, positions, times, max_len = _batch([9, 4, 12], "cpu")
    plan = graphed.plan(offsets, tokens.shape[0], max_len)
    named = [(n, p) for n, p in graphed.named_parameters() if p.requires_grad]
    aliases = {f"encoder.{n}": p.detach().requires_grad_() for n, p in named}
    out = torch.func.functional_call(_Run(graphed, plan), aliases, (tokens, positions, times))
    torch.testing.assert_close(out, graphed.run(tokens, positions, times, plan))
    out.square().sum().backward()
    assert all(p.grad is None for _, p in named)
    assert all(a.grad is not None for a in aliases.values())
    with torch.no_grad():
        graphed.final_norm.weight.mul_(2.0)
    again = torch.func.functional_call(_Run(graphed, plan), aliases, (tokens, positions, times))
    torch.testing.assert_close(again, 2.0 * out.detach())


def test_evaluation_and_no_grad_passes_bypass_the_graphs():
    _, graphed = _twins("full,full", "cpu")
    batch = _batch([5, 7], "cpu")
    graphed.eval()
    graphed(*batch)
    graphed.train()
    with torch.no_grad():
        graphed(*batch)
    assert graphed.graphs.eager == 0  # never consulted


def _train_twins(eager, graphed, batches, steps_per_batch: int, autocast: bool, accumulate: int = 1):
    """Train both with AdamW over ``batches`` (each ``steps_per_batch`` times); compare losses and weights."""
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-2)
    opt_g = torch.optim.AdamW(graphed.parameters(), lr=1e-2)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast else torch.enable_grad
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-5)
    for batch in batches:
        for _ in range(steps_per_batch):
            for _ in range(accumulate):
                for enc in (eager, graphed):
                    tokens = batch[0].detach().clone().requires_grad_()
                    with ctx():
                        loss = _loss(enc, tokens, *batch[1:])
                    loss.backward()
                    enc._last = (loss.detach(), tokens.grad)
                torch.testing.assert_close(graphed._last[0], eager._last[0], **tol)
                torch.testing.assert_close(graphed._last[1], eager._last[1], **tol)
            for (name, pe), pg in zip(eager.named_parameters(), graphed.parameters()):
                torch.testing.assert_close(pg.grad, pe.grad, **tol, msg=lambda m, n=name: f"{n}: {m}")
            opt_e.step()
            opt_g.step()
            opt_e.zero_grad(set_to_none=True)
            opt_g.zero_grad(set_to_none=True)
    for (name, pe), pg in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(pg, pe, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("pattern, summary_init", [("ksa,full", "chunk"), ("ksa,ksa", "slot"), ("full,full", "slot"),
                                                   ("sca,swa", "slot"), ("mka,fastmka", "slot")])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_graphed_training_equals_eager_training(pattern, summary_init, autocast):
    eager, graphed = _twins(pattern, "cuda", summary_init=summary_init)
    lengths = [13, 4, 22, 9]
    # positions change between batches of one layout: they are inputs of the graph, not part of its plan
    batches = [_batch(lengths, "cuda", first_position=4 * i, seed=i) for i in range(3)]
    _train_twins(eager, graphed, batches, steps_per_batch=2, autocast=autocast)
    assert graphed.graphs.disabled is None
    assert (graphed.graphs.eager, graphed.graphs.captures, graphed.graphs.replays) == (1, 1, 5)


@pytest.mark.gpu
@needs_cuda
def test_gradient_accumulation_sums_each_replay():
    eager, graphed = _twins("ksa,full", "cuda", summary_init="chunk")
    batches = [_batch([8, 17, 3], "cuda", seed=i) for i in range(3)]
    _train_twins(eager, graphed, batches, steps_per_batch=1, autocast=False, accumulate=3)
    assert graphed.graphs.replays == 8


@pytest.mark.gpu
@needs_cuda
def test_layouts_are_captured_when_they_repeat_and_the_least_recent_dropped():
    eager, graphed = _twins("ksa,full", "cuda")
    layouts = [[5 + i, 9, 12] for i in range(MAX_GRAPHS + 1)]
    batches = [_batch(layout, "cuda", seed=i) for i, layout in enumerate(layouts)]
    once = [_batch([30, 2], "cuda")]  # seen once: eager, never captured
    # every layout twice (eager, then captured), then the first again: dropped as the least recent, captured anew
    _train_twins(eager, graphed, once + batches + batches + batches[:1], steps_per_batch=1, autocast=False)
    graphs = graphed.graphs
    assert (graphs.eager, graphs.captures, graphs.replays) == (1 + len(batches), len(batches) + 1, len(batches) + 1)
    assert len(graphs._graphs) == MAX_GRAPHS


@pytest.mark.gpu
@needs_cuda
def test_a_pass_that_cannot_be_captured_falls_back_to_eager_with_one_warning(monkeypatch):
    eager, graphed = _twins("sca,full", "cuda")
    attn = graphed.blocks[0].attn
    forward = attn.forward

    def reads_the_device(h, layout):  # as a layer that sized its work from the data would
        if bool(h.isnan().any()):
            raise AssertionError("unreachable")
        return forward(h, layout)

    monkeypatch.setattr(attn, "forward", reads_the_device)
    batches = [_batch([13, 4, 22], "cuda", seed=i) for i in range(2)]
    with pytest.warns(UserWarning, match="encoder.cuda_graphs: the pass cannot be captured, training runs eagerly") \
            as caught:
        _train_twins(eager, graphed, batches, steps_per_batch=2, autocast=False)
    assert len([w for w in caught if "cuda_graphs" in str(w.message)]) == 1
    assert graphed.graphs.disabled and (graphed.graphs.captures, graphed.graphs.eager) == (0, 4)


def test_the_host_read_counter_sees_each_kind_of_host_read(host_reads):
    """The counter the test below relies on: a pass it found clean is clean, not unwatched."""
    x = torch.arange(6.0)
    for read in (lambda: int(x.sum()), lambda: bool((x > 2).any()), lambda: x[x > 2],
                 lambda: torch.repeat_interleave(torch.tensor([1, 2]))):
        with host_reads() as reads:
            read()
        assert reads.found, read


@pytest.mark.parametrize("pattern", ["ksa,full", "ksa,ksa", "full,full", "sca,swa", "mka,fastmka", "mka,full",
                                     "hstu,hstu"])
def test_every_kinds_training_pass_reads_nothing_back_to_the_host(pattern, host_reads):
    """What makes a pass capturable, checked without a GPU too: the planned pass (``run``), forward and backward,
    on the kernels CUDA runs (Triton: compiled on a CUDA machine, interpreted on a CPU one) takes no value back to
    the host. ``mka`` layers used to (the longest user, the block count, boolean masks), so graphs turned off for
    them."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # conftest interprets Triton only without CUDA
    enc = SequenceEncoder(EncoderConfig(dim=32, num_heads=2, pattern=pattern, chunk_size=4, window=2,
                                        attention_backend="triton",
                                        summary_init="chunk" if "ksa" in pattern else "slot",
                                        mka=MkaConfig(local_window=6, fast_window=6, block_size=4,
                                                      window_backend="triton"))).to(device)
    tokens, offsets, positions, times, max_len = _batch([9, 4, 12], device, first_position=3)
    plan = enc.plan(offsets, tokens.shape[0], max_len)
    with host_reads() as reads:
        enc.run(tokens, positions, times, plan).sum().backward()
    assert reads.found == []


@pytest.mark.gpu
@needs_cuda
def test_dropout_draws_new_masks_at_every_replay():
    _, graphed = _twins("ksa,full", "cuda", dropout=0.3, summary_init="chunk")
    batch = _batch([12, 7], "cuda")
    outs = []
    for _ in range(4):
        # the last pass's output (and so its parameters' gradient nodes) is still alive during the next pass,
        # the capture included, as a caller that keeps its last loss would have it
        out = graphed(*batch)
        out.sum().backward()
        outs.append(out.detach())
    assert graphed.graphs.replays == 3
    # new masks each replay, and each replay's output its own copy (the graph's buffer is rewritten)
    assert not torch.equal(outs[2], outs[3]) and not torch.equal(outs[1], outs[2])

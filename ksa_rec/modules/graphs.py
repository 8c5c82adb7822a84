"""CUDA graphs of the encoder's training pass, one per repeating batch layout (``model.encoder.cuda_graphs``).

Why: at recommender widths a training step is bound by the host. At dim 64 the device is busy a quarter to a
third of a step's wall time, launching ~800 small kernels a step for ``ksa*4`` (docs/results/training-speed.md).
A captured forward and backward replays each with one launch.

What is captured: ``SequenceEncoder.run`` over a ``PassPlan`` reads nothing back to the host, so for one
layout (``offsets``) everything but its inputs is fixed. At each pass the event tokens, their positions and
their time part are copied into the graph's input buffers; the plan (summary rows, the attention op's block
tables) stays with the graph. A layout is captured the second time it is seen (a one-off layout would pay a
capture, about four eager passes, for nothing), and at most ``MAX_GRAPHS`` layouts are kept, the least
recently used dropped. So graphs pay where layouts repeat: fixed-length training windows over long
histories, uniform batches. On batches of varied lengths every pass stays eager, at the cost of one read of
``offsets`` (an eager pass reads them anyway, to check them).

Only training passes with gradients on CUDA go through here; evaluation, scoring, streaming and the CPU
run eagerly. Every layer kind's planned pass is free of host reads (``mka`` / ``fastmka`` too, since they size
their scans and block banks from the plan's ``max_len``; a CPU test counts the reads of each). A pass that reads
the device back to the host cannot be captured: the first
warm-up pass refuses such reads, and graphs turn off for that encoder with one warning naming the op; every
pass then runs eagerly (``disabled`` keeps the reason). This check comes before any capture because a capture
that fails half-way leaves the CUDA generator in capture mode, and the process's next eager dropout then fails
("Offset increment outside graph capture"); a capture failing for another reason still would.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ksa_rec.modules.encoder import PassPlan, SequenceEncoder

MAX_GRAPHS = 4
"""Layouts kept captured per encoder (each holds its own activation memory)."""
_REMEMBERED = 256
"""Layouts remembered as seen once (a layout seen again gets captured)."""
_WARMUP = 3
"""Eager passes on a side stream before capture (lazy initialisation, autotuning, allocator warm-up)."""


class EncoderGraphs:
    """The captured passes of one encoder, by layout. ``captures``, ``replays`` and ``eager`` count passes."""

    def __init__(self) -> None:
        self._graphs: OrderedDict[tuple, _CapturedPass] = OrderedDict()
        self._seen: OrderedDict[tuple, None] = OrderedDict()
        self.disabled: str | None = None
        self.captures = self.replays = self.eager = 0

    def __reduce__(self):
        # Graphs belong to the parameters they were captured with: a copy of the model starts without any.
        return (EncoderGraphs, ())

    def __call__(self, encoder: SequenceEncoder, tokens: Tensor, offsets: Tensor, positions: Tensor,
                 time_part: Tensor | None, max_len: int | None) -> Tensor | None:
        """The encoder's training pass through a graph, or None where this pass runs eagerly."""
        if self.disabled is not None or not tokens.is_cuda:
            self.eager += 1
            return None
        key = _layout_key(tokens, offsets, positions, time_part)
        captured = self._graphs.get(key)
        if captured is None:
            if key not in self._seen:
                self._seen[key] = None
                if len(self._seen) > _REMEMBERED:
                    self._seen.popitem(last=False)
                self.eager += 1
                return None
            try:
                captured = _CapturedPass(encoder, encoder.plan(offsets, tokens.shape[0], max_len), tokens, positions,
                                         time_part)
            except Exception as err:  # noqa: BLE001 -- any capture failure falls back to the eager pass
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                self.disabled = f"{type(err).__name__}: {first}"
                warnings.warn(f"encoder.cuda_graphs: the pass cannot be captured, training runs eagerly "
                              f"({self.disabled})", stacklevel=3)
                self.eager += 1
                return None
            self.captures += 1
            self._graphs[key] = captured
            if len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        self.replays += 1
        inputs = (tokens, positions) if time_part is None else (tokens, positions, time_part)
        return _Replay.apply(captured, *inputs, *captured.params)


def _layout_key(tokens: Tensor, offsets: Tensor, positions: Tensor, time_part: Tensor | None) -> tuple:
    """What a captured pass is valid for: the layout (one host read of ``offsets``), the inputs' dtypes and
    whether they need gradients, and the autocast setting the kernels were captured under."""
    autocast = torch.is_autocast_enabled("cuda")
    return (offsets.cpu().numpy().tobytes(), tokens.shape[1], tokens.dtype, tokens.requires_grad, positions.dtype,
            None if time_part is None else (time_part.dtype, time_part.requires_grad),
            autocast, torch.get_autocast_dtype("cuda") if autocast else None)


class _CapturedPass:
    """One layout's forward and backward graphs with their static buffers: inputs (copied in at each pass),
    output, output gradient (copied in at backward) and input / parameter gradients."""

    def __init__(self, encoder: SequenceEncoder, plan: PassPlan, tokens: Tensor, positions: Tensor,
                 time_part: Tensor | None):
        # The graphs read the plan's tensors (summary rows, the op's block tables) by address: kept alive here.
        self.plan = plan
        named = [(name, p) for name, p in encoder.named_parameters() if p.requires_grad]
        self.params = tuple(p for _, p in named)
        # The passes run on aliases of the parameters: the same storage (so the graphs read the optimizer's
        # in-place updates), but leaves of their own. A parameter's gradient node belongs to the stream it was
        # made on, and the caller's last eager pass may keep it alive (its output or loss not yet freed): a
        # capture that reached it would wait on the default stream, which fails the capture.
        aliases = {f"encoder.{name}": p.detach().requires_grad_() for name, p in named}
        self.inputs = tuple(_static(t) for t in (tokens, positions, time_part) if t is not None)
        differentiable = [t for t in self.inputs if t.requires_grad] + list(aliases.values())
        runner = _Run(encoder, plan)

        def run() -> Tensor:
            return torch.func.functional_call(runner, aliases, self.inputs)

        def grads(out: Tensor, grad_out: Tensor) -> tuple[Tensor | None, ...]:
            return torch.autograd.grad(out, differentiable, grad_out, allow_unused=True)

        autocast = (torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
                    if torch.is_autocast_enabled("cuda") else contextlib.nullcontext())
        with autocast:
            torch.cuda.synchronize()
            side = side_stream(tokens.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for i in range(_WARMUP):
                    # The first pass refuses any op that waits on the device (a host read): such a pass cannot be
                    # captured, and a capture that fails half-way can leave the CUDA generator mid-capture.
                    with no_host_reads() if i == 0 else contextlib.nullcontext():
                        out = run()
                        grads(out, torch.ones_like(out))
                    # no warm-up graph may outlive its pass: its parameters' gradient nodes would keep the
                    # side stream into the capture
                    del out
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            self.forward = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.forward, capture_error_mode="thread_local"):
                self.out = run()
            self.grad_out = torch.empty_like(self.out)
            self.backward = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.backward, pool=self.forward.pool(), capture_error_mode="thread_local"):
                computed = grads(self.out, self.grad_out)
        # The capture's autograd graph is done with; kept (through the output) it would keep the parameters'
        # gradient nodes of the capture stream alive, and every later backward would sync with that stream
        # (torch's "AccumulateGrad node's stream does not match" warning).
        self.out = self.out.detach()
        # Per input (then parameter) the gradient buffer or None. Handed to autograd as they are, not as
        # detached views: referenced here too, they are copied into ``.grad``, never adopted as it (an adopted
        # buffer would be overwritten by the next replay and double-counted under gradient accumulation).
        by_input = iter(computed)
        self.grads = tuple(next(by_input) if t.requires_grad else None for t in self.inputs) + tuple(
            next(by_input) for _ in self.params)


class _Run(torch.nn.Module):
    """``encoder.run`` over one plan as a module's forward, so that ``torch.func.functional_call`` can run it on
    other tensors in place of the encoder's parameters (named ``encoder.<name>``)."""

    def __init__(self, encoder: SequenceEncoder, plan: PassPlan):
        super().__init__()
        self.encoder, self.plan = encoder, plan

    def forward(self, tokens: Tensor, positions: Tensor, time_part: Tensor | None = None) -> Tensor:
        return self.encoder.run(tokens, positions, time_part, self.plan)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One warm-up stream per device: the CUDA libraries keep workspaces per stream, so a new stream per capture
    would add one every time."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


@contextlib.contextmanager
def no_host_reads():
    """Any op that waits on the device (a host read) raises inside this block: run a warm-up pass in it before a
    capture, because such a pass cannot be captured and a capture that fails half-way can leave the CUDA
    generator mid-capture."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _static(t: Tensor) -> Tensor:
    return t.detach().clone().requires_grad_(t.requires_grad)


class _Replay(torch.autograd.Function):
    """A captured pass as one autograd node: inputs and parameters in, the encoder's output out."""

    @staticmethod
    def forward(ctx, captured: _CapturedPass, *args: Tensor) -> Tensor:
        for static, given in zip(captured.inputs, args):
            static.copy_(given)
        captured.forward.replay()
        ctx.captured = captured
        # A copy: the static output is rewritten by the next pass of this layout.
        return captured.out.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        captured = ctx.captured
        captured.grad_out.copy_(grad)
        captured.backward.replay()
        return (None, *captured.grads)


__all__ = ["MAX_GRAPHS", "EncoderGraphs", "no_host_reads", "side_stream"]

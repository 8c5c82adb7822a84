"""A CUDA graph of the streaming step: one replay per step of a fixed batch of users (issue 17's online step).

Why: a serving step at recommender widths is bound by the host. The jagged step (``SequenceEncoder.step``)
plans its rows on the host and launches ~60 small kernels a layer, so batch-1 latency sits at 3-4 ms on an
H100 whatever the history (docs/results/serving.md). ``SequenceEncoder.fixed_step`` does the same work in
buffers whose shapes depend only on the batch and a capacity, with no host reads, so it can be captured once
per ``FixedState`` and replayed.

A ``StepGraph`` belongs to one ``FixedState`` (its tensors are the graph's; a step updates them in place) and
to one batch size: callers pad a smaller batch of users to a captured size (a bucket), or keep one graph per
size they serve; ``load`` puts other users of that size and capacity in its buffers (``serving.fixed_steps``).
Capturing runs a few eager steps first (lazy initialisation, autotuning), so it saves the
state's tensors and puts them back afterwards: the state is as it was before the capture. The warm-up and the
stream it runs on are the training graphs' (``ksa_rec.modules.graphs``): the first step refuses host reads.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ksa_rec.modules.graphs import no_host_reads, side_stream

if TYPE_CHECKING:
    from ksa_rec.modules.encoder import FixedState, SequenceEncoder

_WARMUP = 3
"""Eager steps on a side stream before the capture."""


class StepGraph:
    """``encoder.fixed_step`` over ``state`` as one CUDA graph. Call it with the new events' ``tokens [B, dim]``
    (and ``time_part [B, dim]`` when the model has time features): returns the events' states ``[B, dim]`` (a
    buffer the next call overwrites) and advances ``state`` by one event per user."""

    def __init__(self, encoder: SequenceEncoder, state: FixedState, dtype: torch.dtype, with_time: bool):
        device = state.event_count.device
        if device.type != "cuda":
            raise ValueError(f"StepGraph: CUDA graphs need a state on a CUDA device, this one is on {device}")
        if encoder.training:
            raise ValueError("StepGraph: put the encoder in eval mode first (a step has no dropout)")
        batch = state.event_count.shape[0]
        self.state = state
        self.steps_left = state.capacity - 1 - int(state.event_count.max()) if batch else 0
        """Steps this state has room for (every step adds one event to every user); a call past it raises."""
        if self.steps_left < _WARMUP:
            raise ValueError(f"StepGraph: the state has room for {self.steps_left} more events, the capture needs "
                             f"{_WARMUP}; build it with a larger capacity")
        self.tokens = torch.zeros(batch, encoder.cfg.dim, dtype=dtype, device=device)
        self.time_part = torch.zeros_like(self.tokens) if with_time else None
        saved = [t.clone() for t in state.tensors]
        side = side_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(side):
            for i in range(_WARMUP):
                with no_host_reads() if i == 0 else contextlib.nullcontext():
                    encoder.fixed_step(self.tokens, self.time_part, state)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.out = encoder.fixed_step(self.tokens, self.time_part, state)
        for tensor, copy in zip(state.tensors, saved):
            tensor.copy_(copy)

    def load(self, source: FixedState) -> None:
        """Put ``source``'s users (same batch size and capacity, any device) in the buffers the graph reads: how
        one graph serves micro-batch after micro-batch of different users."""
        self.state.copy_(source)
        counts = source.event_count
        self.steps_left = self.state.capacity - 1 - (int(counts.max()) if counts.numel() else 0)

    def __call__(self, tokens: Tensor, time_part: Tensor | None = None) -> Tensor:
        if self.steps_left <= 0:
            raise ValueError("StepGraph: the state is full (its capacity is reached); move it to a larger one")
        self.tokens.copy_(tokens)
        if self.time_part is not None:
            self.time_part.copy_(time_part)
        self.graph.replay()
        self.steps_left -= 1
        return self.out


__all__ = ["StepGraph"]

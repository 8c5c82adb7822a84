"""The engine's step in fixed-capacity buffers (``--step graphed``): micro-batches of one event per user through
``SequenceEncoder.fixed_step``, on CUDA replayed from a CUDA graph per (users, capacity) bucket.

Why: a GPU step at recommender widths is bound by the host (``docs/results/serving.md``: the jagged step plans its
rows on the host, ~60 small kernels a layer); the graphed step removes that. Stored states stay the jagged per-user
form (``UserState.layers``), so stores, blobs and ``stream`` are unchanged: each micro-batch's states are laid out
in fixed buffers on the host, copied into the bucket's graph, stepped, and copied back.

Buckets: users padded up to the next power of two (padding users are empty and their rows discarded), capacity
the next power of two above the longest history of the micro-batch (at least ``MIN_CAPACITY``). A bucket's graph
is captured on first use and kept, least recently used first out beyond ``max_graphs``. The eager form (no graph)
runs the same conversion and step on any device: the CPU tests compare it with the jagged step.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from ksa_rec.errors import ConfigError
from ksa_rec.models.seqrec import SeqRecModel
from ksa_rec.modules.attention import AttentionLayer

MIN_CAPACITY = 256
"""Smallest capacity bucket: a capture needs a few steps of room, and short histories share one graph."""


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class FixedSteps:
    """``__call__(tokens, time_part, users, counts)`` continues B users by one event each: ``tokens [B, dim]`` and
    ``time_part`` (or None) on the model's device, ``users[b]`` user b's per-layer state tensors (host), ``counts``
    their event counts. Returns the new events' states ``[B, dim]`` (device) and the users' new per-layer states
    (host)."""

    def __init__(self, model: SeqRecModel, device: torch.device, graphed: bool, max_graphs: int = 8):
        reason = AttentionLayer.no_fixed_step(model.encoder.cfg.layers)
        if reason:
            raise ConfigError(f"--step: {reason}")
        if graphed and device.type != "cuda":
            raise ConfigError(f"--step graphed needs a CUDA device; the model is on {device}")
        self.encoder, self.device, self.graphed, self.max_graphs = model.encoder, device, graphed, max_graphs
        self.dtype = model.item_weight.dtype
        self._graphs: OrderedDict[tuple[int, int], tuple] = OrderedDict()
        self._empty_user = [state.user(0) for state in model.empty_states(1)]

    def __call__(self, tokens: Tensor, time_part: Tensor | None, users: list[list[dict[str, Tensor]]],
                 counts: list[int]) -> tuple[Tensor, list[list[dict[str, Tensor]]]]:
        B = len(counts)
        capacity = max(MIN_CAPACITY, _pow2_at_least(max(counts) + 2))
        if not self.graphed:
            state = self.encoder.fixed_state_of_users(users, torch.tensor(counts), capacity, self.dtype, self.device)
            out = self.encoder.fixed_step(tokens, time_part, state)
            if self.device.type != "cpu":  # stored states are host tensors, as the jagged step gives them back
                state = self.encoder.empty_fixed_state(B, capacity, self.dtype, "cpu").copy_(state)
            return out, self.encoder.unfixed_users(state)
        bucket = _pow2_at_least(B)
        pad = bucket - B
        graph, host = self._graph(bucket, capacity, time_part is not None)
        self.encoder.fixed_state_of_users(users + [self._empty_user] * pad, torch.tensor(counts + [0] * pad),
                                          capacity, self.dtype, "cpu", out=host)
        graph.load(host)
        if pad:
            tokens = torch.cat([tokens, tokens.new_zeros(pad, tokens.shape[1])])
            time_part = None if time_part is None else torch.cat([time_part, time_part.new_zeros(pad, tokens.shape[1])])
        out = graph(tokens, time_part)[:B].clone()
        host.copy_(graph.state)
        return out, self.encoder.unfixed_users(host, B)

    def _graph(self, bucket: int, capacity: int, with_time: bool):
        """The bucket's graph and its host staging state (pinned: the copies in and out are its whole cost), made
        on first use."""
        from ksa_rec.modules.step_graphs import StepGraph

        key = (bucket, capacity)
        entry = self._graphs.pop(key, None)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
            state = self.encoder.empty_fixed_state(bucket, capacity, self.dtype, self.device)
            host = self.encoder.empty_fixed_state(bucket, capacity, self.dtype, "cpu")
            for tensor in host.tensors:
                tensor.set_(tensor.pin_memory())
            entry = StepGraph(self.encoder, state, self.dtype, with_time), host
        self._graphs[key] = entry
        return entry


__all__ = ["MIN_CAPACITY", "FixedSteps"]

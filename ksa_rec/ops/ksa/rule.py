"""The KSA visibility rule (KSA.md section 3) as one object, built once and passed through every op.

Tokens are named by identity: an event by its absolute index ``i`` in its user's history, a summary by
its id ``r = c*S + j`` (slot j of chunk c). For every kind of query, the keys it sees in each stream
form one interval ``[lo, hi)`` of identities, so the rule is four interval functions; ``visible`` is
membership in them. The torch-level backends (blockwise reference, Flex ``mask_mod``, the cached
serving op) all call these; the Triton kernels carry the same four intervals in ``triton_fwd.py``;
the dense oracle (``dense.py``) stays an independent statement of the rule for the tests.

    query            event keys j                          summary keys r'
    event i          (i//u - W)*u <= j <= i                c(i)-W-M <= r'//S < c(i)-W
    summary r=(c,j)  c*k <= j' < c*k + k (its own chunk)   c*S <= r' <= r (its chunk's earlier slots)

``u`` (``window_unit``) is the step of the window: ``k`` for KSA/SCA (whole chunks), 1 for a token
window (the ``swa`` kind: event i sees events ``i - W .. i``). ``W = None`` is a full layer (every
earlier event, no summaries); ``M = None`` keeps every summary older than the window; ``M = 0`` shows
events no summary at all (SCA, SWA), while summaries still read their own chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ksa_rec.utils.config import check_int

Index = int | Tensor
"""A token identity, or a tensor of them (any shape; int64)."""


@dataclass(frozen=True)
class KsaRule:
    """Who attends to what in one attention layer (module docstring). Validated on construction."""

    chunk_size: int
    """k: events per chunk; a summary token follows every complete chunk."""
    window: int | None
    """W: window in steps of ``window_unit`` events before the query's own step; None = unbounded."""
    summary_tokens: int = 1
    """S: summary tokens per complete chunk (``k % S == 0``); 0 = no summary stream."""
    max_summaries: int | None = None
    """M: an event sees the summaries of at most the M chunks just older than its window; None = all."""
    window_unit: int | None = None
    """u: events per window step; None = ``chunk_size`` (chunk window), 1 = token window."""

    def __post_init__(self) -> None:
        op = "KsaRule"
        check_int(op, "chunk_size", self.chunk_size, minimum=1)
        check_int(op, "window", self.window, minimum=0, allow_none=True)
        check_int(op, "summary_tokens", self.summary_tokens, minimum=0)
        check_int(op, "max_summaries", self.max_summaries, minimum=0, allow_none=True)
        check_int(op, "window_unit", self.window_unit, minimum=1, allow_none=True)
        if self.summary_tokens and self.chunk_size % self.summary_tokens:
            raise ValueError(f"{op}: chunk_size ({self.chunk_size}) must be a multiple of summary_tokens "
                             f"({self.summary_tokens})")
        if self.unit != self.chunk_size and self.max_summaries != 0:
            raise ValueError(f"{op}: a window of window_unit={self.unit} events does not end at chunk "
                             "boundaries, so its events cannot see summaries: set max_summaries=0")
        object.__setattr__(self, "_n", _Numbers(self.chunk_size, self.window, self.summary_tokens,
                                                max(self.summary_tokens, 1), self.max_summaries, self.unit))

    def with_tensor_numbers(self, device) -> KsaRule:
        """The same rule computing with its integers as 0-d int tensors on ``device``: for mask functions
        that a compiler traces (FlexAttention's block mask), where Python integers may turn symbolic and a
        vmapped floor division by a symbolic integer fails. Structure (None windows) stays Python."""
        twin = KsaRule(self.chunk_size, self.window, self.summary_tokens, self.max_summaries, self.window_unit)
        n = self._n

        def tensor(value):
            return None if value is None else torch.tensor(value, dtype=torch.int32, device=device)

        object.__setattr__(twin, "_n", _Numbers(*(tensor(v) for v in (n.k, n.W, n.S, n.S1, n.M, n.u))))
        return twin

    @property
    def unit(self) -> int:
        return self.chunk_size if self.window_unit is None else self.window_unit

    @property
    def events_see_summaries(self) -> bool:
        """Whether any event query can see a summary key under this rule."""
        return self.window is not None and self.summary_tokens > 0 and self.max_summaries != 0

    def without_summaries(self) -> KsaRule:
        """The same event window with no summary stream (``summary_tokens = 0``)."""
        return KsaRule(self.chunk_size, self.window, 0, self.max_summaries, self.window_unit)

    # ---- the four intervals: keys ``[lo, hi)`` seen by a query ------------------------------------------
    def event_query_events(self, i: Index) -> tuple[Index, Index]:
        """Event keys seen by event query ``i``: its window, causally."""
        if self.window is None:
            return _zeros_like(i), i + 1
        n = self._n
        return _clamp0(i // n.u - n.W) * n.u, i + 1

    def event_query_summaries(self, i: Index) -> tuple[Index, Index]:
        """Summary ids seen by event query ``i``: chunks ``c(i)-W-M <= c < c(i)-W``."""
        if not self.events_see_summaries:
            return _zeros_like(i), _zeros_like(i)
        n = self._n
        c = i // n.k
        lo = 0 if self.max_summaries is None else _clamp0(c - n.W - n.M) * n.S
        return lo + _zeros_like(i), _clamp0(c - n.W) * n.S

    def summary_query_events(self, r: Index) -> tuple[Index, Index]:
        """Event keys seen by summary query ``r``: the k events of its chunk."""
        n = self._n
        first = r // n.S1 * n.k
        return first, first + n.k

    def summary_query_summaries(self, r: Index) -> tuple[Index, Index]:
        """Summary ids seen by summary query ``r = (c, j)``: slots ``j' <= j`` of chunk c."""
        n = self._n
        return r // n.S1 * n.S1, r + 1

    def visible(self, q_index: Tensor, q_is_summary: Tensor, k_index: Tensor, k_is_summary: Tensor) -> Tensor:
        """Element-wise (broadcast): whether the query ``(q_index, q_is_summary)`` sees the key
        ``(k_index, k_is_summary)`` of the same user. All arguments are tensors (bool for the flags)."""
        def inside(interval: tuple[Index, Index]) -> Tensor:
            lo, hi = interval
            return (k_index >= lo) & (k_index < hi)

        from_event = torch.where(k_is_summary, inside(self.event_query_summaries(q_index)),
                                 inside(self.event_query_events(q_index)))
        from_summary = torch.where(k_is_summary, inside(self.summary_query_summaries(q_index)),
                                   inside(self.summary_query_events(q_index)))
        return torch.where(q_is_summary, from_summary, from_event)

    # ---- what a streaming state must keep -------------------------------------------------------------
    def first_kept_event(self, n: Index) -> Index:
        """Oldest event index any later query can read once a user has ``n`` events (the lower ends of
        the intervals never decrease with the query, and a summary query reads its own open chunk)."""
        lo, _ = self.event_query_events(n)
        if self.summary_tokens:
            lo = _minimum(lo, n // self.chunk_size * self.chunk_size)
        return lo

    def first_kept_summary(self, n: Index) -> Index | None:
        """Oldest summary id a later event query can read once a user has ``n`` events; None when events
        read no summaries (then only the summaries of a step's own open chunk matter, and those are new)."""
        if not self.events_see_summaries:
            return None
        lo, _ = self.event_query_summaries(n)
        return lo


@dataclass(frozen=True)
class _Numbers:
    """The integers the intervals compute with: Python ints, or 0-d tensors (``with_tensor_numbers``)."""

    k: Index
    W: Index | None
    S: Index
    S1: Index
    """``max(S, 1)``: a summary query's chunk is its id divided by this."""
    M: Index | None
    u: Index


def _clamp0(x: Index) -> Index:
    return x.clamp(min=0) if isinstance(x, Tensor) else max(x, 0)


def _zeros_like(x: Index) -> Index:
    return torch.zeros_like(x) if isinstance(x, Tensor) else 0


def _minimum(a: Index, b: Index) -> Index:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.minimum(a, b)
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        tensor, bound = (a, b) if isinstance(a, Tensor) else (b, a)
        return tensor.clamp(max=bound)
    return min(a, b)


__all__ = ["KsaRule"]

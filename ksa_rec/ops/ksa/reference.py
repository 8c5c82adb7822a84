"""Readable torch KSA (KSA.md section 3): the CPU path and the peer the fast backends are tested against.

No ``T x T`` (or ``n x n``) mask is ever built. Two kinds of queries, computed separately:

* **Summary queries** see only their own chunk (k events) and their own chunk's earlier slots, so all
  complete chunks of the batch form one batched attention ``[C, S queries, k + S keys]``.
* **Event queries** are processed in blocks of consecutive query chunks ``[g0, g1)``. The keys a block
  can see form two contiguous runs in the two-stream layout: the event *band*
  ``[max(0, g0 - W) * k, g1 * k)`` and the summaries of chunks ``[g0 - W - M, g1 - W)`` (a dense prefix
  when ``M`` is None). Each block attends to ``[band ; summaries]`` under a small block-local mask
  ``[rows, band + summaries]`` that applies the exact per-query rule.

Users are vectorised, not looped: they are sorted by length (longest first) and padded to ``[B, H, L, D]``.
Positions inside a user are the same for every user, so one block mask serves the whole batch, and the
users still active at block ``g0`` (``n_b > g0 * k``) are a prefix of the sorted batch. The Python loop is
over blocks only. Block size adapts: a block holds about half as many query rows as a query at its start
sees keys (at least ``min_block_rows``), so the masked-out part of the band stays below ~1/3 of the work,
short users are one block, and the key copies made per block add up to O(n) memory. The mask size
``rows x keys`` is capped by ``max_mask_elements``.

Each block is one ``scaled_dot_product_attention`` call with a boolean mask: a numerically standard
softmax (max-subtracted) over exactly the visible keys; on CPU torch runs its fused flash kernel (no
score matrix kept, only the log-sum-exp). It does keep each block's mask for backward, which adds up to
O(n * keys per query) for a long user; past ``recompute_above`` elements the blocks are recomputed in
backward (activation checkpointing) so that training memory stays O(n) plus one block.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ksa_rec.ops.ksa.layout import summary_index, summary_offsets
from ksa_rec.ops.ksa.rule import KsaRule
from ksa_rec.utils.jagged import offsets_to_lengths, positions_in_segment, segment_ids


@dataclass(frozen=True)
class BlockTuning:
    """Knobs of the event-query blocks (module docstring). They change speed and memory, never results.

    ``min_rows``: fewest query rows per block; ``max_mask_elements``: cap on a block's ``rows x keys``;
    ``recompute_above``: total mask elements of a backward pass above which blocks are recomputed.
    """

    min_rows: int = 64
    max_mask_elements: int = 1 << 24
    recompute_above: int = 1 << 25


def ksa_attention_torch(q: Tensor, k: Tensor, v: Tensor, q_sum: Tensor, k_sum: Tensor, v_sum: Tensor,
                        offsets: Tensor, rule: KsaRule, *, scale: float | None = None,
                        tuning: BlockTuning = BlockTuning()) -> tuple[Tensor, Tensor]:
    """KSA forward (differentiable) in plain torch; contract of ``ksa_rec.ops.ksa_attention``.

    Shapes: q ``(sum_b n_b, H, D)``, k, v ``(sum_b n_b, Hkv, D)``; q_sum ``(sum_b S*(n_b//k), H, D)``,
    k_sum, v_sum ``(sum_b S*(n_b//k), Hkv, D)``; offsets int64 ``[B+1]``. Inputs are assumed valid
    (``checks.check_ksa_inputs``).

    Returns ``(out (sum_b n_b, H, D), out_sum (sum_b S*(n_b//k), H, D))``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    offsets = offsets.long()
    out = _event_queries(q, k, v, k_sum, v_sum, offsets, EventBlocks(rule), scale, tuning)
    out_sum = _summary_queries(q_sum, k, v, k_sum, v_sum, offsets, rule, scale)
    return out, out_sum


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """``softmax(scale * q k^T, masked) v`` for ``q [U, H, R, D]``, ``k, v [U, Hkv, K, D]``.

    ``mask`` ``[R, K]`` bool (True = visible; every row must see a key) is shared by all users and
    heads. Query head h reads key/value head ``h // (H // Hkv)`` (GQA). Returns ``[U, H, R, D]``.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _summary_queries(q_sum: Tensor, k: Tensor, v: Tensor, k_sum: Tensor, v_sum: Tensor, offsets: Tensor,
                     rule: KsaRule, scale: float) -> Tensor:
    """Summary ``s_{c,j}`` attends to the k events of chunk c and to ``s_{c,j'}``, ``j' <= j``.

    All complete chunks of the batch at once: queries ``[C, H, S, D]`` against keys
    ``[C, Hkv, k + S, D]`` (the chunk's events gathered, then its summaries). Returns ``(Ts, H, D)``.
    """
    rows = q_sum.shape[0]
    if rows == 0:
        return q_sum[:0].clone()
    S, kk = rule.summary_tokens, rule.chunk_size
    chunks = rows // S
    user, chunk, _ = summary_index(offsets, kk, S)
    first_event = offsets[user[::S]] + chunk[::S] * kk  # rows are chunk-major: one entry per chunk
    events = first_event[:, None] + torch.arange(kk, device=offsets.device)  # [C, k]

    def chunk_keys(ev: Tensor, summ: Tensor) -> Tensor:  # -> [C, Hkv, k + S, D]
        return torch.cat([ev[events], summ.reshape(chunks, S, *summ.shape[1:])], dim=1).transpose(1, 2)

    # The first chunk's queries and keys: the rule is the same relative to every chunk.
    slot = torch.arange(S, device=q_sum.device)
    key = torch.cat([torch.arange(kk, device=q_sum.device), slot])
    is_summary = torch.arange(kk + S, device=q_sum.device) >= kk
    mask = rule.visible(slot[:, None], torch.ones(S, 1, dtype=torch.bool, device=q_sum.device), key[None],
                        is_summary[None])
    queries = q_sum.reshape(chunks, S, *q_sum.shape[1:]).transpose(1, 2)
    out = attend(queries, chunk_keys(k, k_sum), chunk_keys(v, v_sum), mask, scale)
    return out.transpose(1, 2).reshape(q_sum.shape)


@dataclass(frozen=True)
class Block:
    """Event queries of chunks ``[g0, g1)`` and what they can see: the event band ``[band)`` (event
    indices) and the summaries of chunks ``[summaries)``, both in in-user coordinates."""

    g0: int
    g1: int
    band: tuple[int, int]
    summaries: tuple[int, int]


@dataclass(frozen=True)
class EventBlocks:
    """How event queries are cut into blocks under a ``KsaRule``, and each block's mask."""

    rule: KsaRule

    @property
    def k(self) -> int:
        return self.rule.chunk_size

    @property
    def S(self) -> int:
        return self.rule.summary_tokens

    def block(self, g0: int, g1: int, n_summary_chunks: int) -> Block:
        """Keys seen by the query chunks ``[g0, g1)``; only ``n_summary_chunks`` summary chunks exist.
        The intervals' ends never decrease with the query, so the first and last query bound them."""
        first, last = g0 * self.k, g1 * self.k - 1
        band = (self.rule.event_query_events(first)[0], last + 1)
        lo = self.rule.event_query_summaries(first)[0] // max(self.S, 1)
        hi = min(self.rule.event_query_summaries(last)[1] // max(self.S, 1), n_summary_chunks)
        return Block(g0, g1, band, (min(lo, hi), hi))

    def num_keys(self, block: Block) -> int:
        return block.band[1] - block.band[0] + self.S * (block.summaries[1] - block.summaries[0])

    def plan(self, n_chunks: int, n_summary_chunks: int, tuning: BlockTuning) -> list[Block]:
        """Blocks covering query chunks ``0..n_chunks-1``, each ~half as many rows as its keys.

        Rows ~ keys/2 keeps the masked part of the band a minor cost and the key copies O(n) in total;
        ``tuning.max_mask_elements`` caps ``rows * keys`` (never below one chunk per block).
        """
        blocks, g0 = [], 0
        while g0 < n_chunks:
            seen = self.num_keys(self.block(g0, g0 + 1, n_summary_chunks))
            g = min(max(-(-tuning.min_rows // self.k), seen // (2 * self.k), 1), n_chunks - g0)
            block = self.block(g0, g0 + g, n_summary_chunks)
            while g > 1 and g * self.k * self.num_keys(block) > tuning.max_mask_elements:
                g //= 2
                block = self.block(g0, g0 + g, n_summary_chunks)
            blocks.append(block)
            g0 += g
        return blocks

    def mask(self, block: Block, device) -> Tensor:
        """``[rows, band + summaries]`` bool: which keys each event query of the block sees."""
        i = torch.arange(block.g0 * self.k, block.g1 * self.k, device=device)[:, None]
        keys = torch.cat([torch.arange(*block.band, device=device),
                          torch.arange(block.summaries[0] * self.S, block.summaries[1] * self.S, device=device)])
        is_summary = torch.arange(keys.numel(), device=device) >= block.band[1] - block.band[0]
        return self.rule.visible(i, torch.zeros_like(i, dtype=torch.bool), keys[None], is_summary[None])


def _event_queries(q: Tensor, k: Tensor, v: Tensor, k_sum: Tensor, v_sum: Tensor, offsets: Tensor,
                   blocks: EventBlocks, scale: float, tuning: BlockTuning) -> Tensor:
    """Event queries, in blocks of query chunks, of users padded to ``[B, H, L, D]``. -> ``(T, H, D)``."""
    if q.shape[0] == 0:
        return q[:0].clone()
    kk, S = blocks.k, blocks.S
    order, lengths_desc = _sort_users(offsets)
    chunks_desc = [-(-n // kk) for n in lengths_desc]  # chunks including a trailing partial one
    n_chunks, n_summary_chunks = chunks_desc[0], lengths_desc[0] // kk
    q_pad, k_pad, v_pad = (pad_users(x, offsets, order, n_chunks * kk) for x in (q, k, v))
    s_offsets = summary_offsets(offsets, kk, S)
    ks_pad, vs_pad = (pad_users(x, s_offsets, order, n_summary_chunks * S) for x in (k_sum, v_sum))

    plan = blocks.plan(n_chunks, n_summary_chunks, tuning)
    queries = _Slicer(q_pad, [g * kk for b in plan for g in (b.g0, b.g1)])
    keys, values = (_Slicer(x, [e for b in plan for e in b.band]) for x in (k_pad, v_pad))
    recompute = _needs_recompute(plan, blocks, tuning, q, k, v, k_sum, v_sum)
    active_desc = [-c for c in chunks_desc]  # ascending, for bisect
    outs = []
    for block in plan:
        users = bisect.bisect_left(active_desc, -block.g0)  # users with more than g0 chunks: a prefix
        summaries = (block.summaries[0] * S, block.summaries[1] * S)
        # summaries are sliced directly: their full-size slice backward is 1/k of the event stream
        args = (blocks, block, scale, _cat(queries.take(block.g0 * kk, block.g1 * kk, users)),
                keys.take(*block.band, users) + _take(ks_pad, *summaries, users),
                values.take(*block.band, users) + _take(vs_pad, *summaries, users))
        if recompute:
            out = checkpoint(_block_attention, *args, use_reentrant=False)
        else:
            out = _block_attention(*args)
        outs.append(F.pad(out, (0, 0, 0, 0, 0, 0, 0, len(chunks_desc) - users)))  # zero rows: inactive
    return unpad_users(torch.cat(outs, dim=2), offsets, order)


def _block_attention(blocks: EventBlocks, block: Block, scale: float, query: Tensor, keys: list[Tensor],
                     values: list[Tensor]) -> Tensor:
    """One block: ``query [U, H, R, D]`` against ``[band ; summaries]`` given as pieces along dim 2."""
    return attend(query, _cat(keys), _cat(values), blocks.mask(block, query.device), scale)


def _needs_recompute(plan: list[Block], blocks: EventBlocks, tuning: BlockTuning, *inputs: Tensor) -> bool:
    """Recompute blocks in backward when the masks autograd would keep add up to many elements.

    ``scaled_dot_product_attention`` saves its mask (as a float ``[R, K]``) for backward, one per block:
    ~n * keys-per-query elements for a long user, i.e. quadratic. Above ``tuning.recompute_above``
    elements, each block runs under activation checkpointing instead (forward twice, memory O(block)).
    """
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in inputs)):
        return False
    saved = sum((b.g1 - b.g0) * blocks.k * blocks.num_keys(b) for b in plan)
    return saved > tuning.recompute_above


def _sort_users(offsets: Tensor) -> tuple[Tensor, list[int]]:
    """Users longest first: (order ``[B]``, their lengths in that order)."""
    lengths = offsets_to_lengths(offsets)
    order = torch.argsort(lengths, descending=True, stable=True)
    return order, lengths[order].tolist()


class _Slicer:
    """Many (overlapping) slices of ``x [B, H, L, D]`` along L whose backward stays O(size of x).

    Autograd's slice backward allocates a zero tensor as large as the source for every slice: one slice
    per block would cost O(blocks x n). Splitting ``x`` once at every boundary the blocks use and handing
    out pieces keeps it linear (split's backward is one cat; a piece's grads are summed at piece size).
    """

    def __init__(self, x: Tensor, bounds: list[int]):
        edges = sorted({0, x.shape[2], *bounds})
        self.pieces = torch.split(x, [b - a for a, b in zip(edges, edges[1:])], dim=2)
        self.at = {edge: i for i, edge in enumerate(edges)}

    def take(self, lo: int, hi: int, users: int) -> list[Tensor]:
        """Pieces covering ``x[:users, :, lo:hi]`` in order (empty list when ``lo == hi``)."""
        return [piece[:users] for piece in self.pieces[self.at[lo]:self.at[hi]]]


def _take(x: Tensor, lo: int, hi: int, users: int) -> list[Tensor]:
    """``[x[:users, :, lo:hi]]``, or ``[]`` when the range is empty."""
    return [x[:users, :, lo:hi]] if hi > lo else []


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def pad_users(x: Tensor, offsets: Tensor, order: Tensor, length: int) -> Tensor:
    """Jagged ``(sum_b n_b, H, D)`` -> ``[B, H, length, D]`` with users in ``order``, zero past each end."""
    total = x.shape[0]
    starts, lengths = offsets[:-1][order], offsets_to_lengths(offsets)[order]
    pos = torch.arange(length, device=x.device)
    index = torch.where(pos < lengths[:, None], starts[:, None] + pos, total)  # row `total`: zeros
    padded = torch.cat([x, x.new_zeros(1, *x.shape[1:])])[index]
    return padded.transpose(1, 2)


def unpad_users(x: Tensor, offsets: Tensor, order: Tensor) -> Tensor:
    """Inverse of ``pad_users``: ``[B, H, L, D]`` (users in ``order``) -> jagged ``(sum_b n_b, H, D)``."""
    batch, heads, length, dim = x.shape
    rank = torch.empty_like(order)
    rank[order] = torch.arange(batch, device=order.device)
    total = int(offsets[-1])
    flat = rank[segment_ids(offsets, total)] * length + positions_in_segment(offsets, total)
    return x.transpose(1, 2).reshape(batch * length, heads, dim)[flat]

"""Parallel torch paths of MKA and FastMKA (MKA.md sections 1-3): the training / CPU path.

Nothing here loops over events. The three MKA levels, for a jagged batch ``(sum_b n_b, ...)``:

* **L1 local** -- windowed causal attention over the last ``W1`` events (the event itself included),
  run on the blockwise sliding-window op (``ksa_rec.ops.swa``: a band per query block, no ``T x T`` mask).
* **L2 session** -- ``S2`` normalised EMA slots per head, computed by a chunked scan (``ema_scan``):
  within a chunk of ``c`` steps the EMA is a product with the lower-triangular decay matrix
  ``beta^(t-j)``; the states entering the chunks are the same scan over the chunk ends, one level up.
* **L3 blocks** -- block sums by a segment sum into a block-aligned layout, then a tiled attention:
  a tile of query rows sees one contiguous run of at most ``M3 + G`` block means (``bank_attention``).

FastMKA's fused sources (``fastmka_sources``) reuse the scan and the block layout in ``x`` space.
``recurrence.py`` is the per-event oracle these are tested against; ``streaming.py`` is the step path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ksa_rec.ops.causal import causal_attention
from ksa_rec.ops.swa import sliding_window_attention
from ksa_rec.utils.jagged import jagged_to_padded, padded_to_jagged, positions_in_segment, segment_ids

LEVELS = 3
"""Memory levels, in router order: L1 local, L2 session, L3 blocks."""

MIN_TILE_ROWS = 64
"""Fewest query rows per bank-attention tile (fewer, larger SDPA calls on short histories)."""


# ----------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------

def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``softmax(scale * q k^T | mask) v`` for ``q [*, Q, H, D]``, ``k, v [*, K, H, D]``, ``mask [*, Q, K]``.

    ``mask`` may broadcast over the leading dims of q. A row that sees no key gets a zero output (it
    would be NaN otherwise); it is computed against key 0 so that backward stays finite, then zeroed.
    Returns ``(out [*, Q, H, D], has_key [*, Q] bool)``.
    """
    has_key = mask.any(-1)
    first = torch.zeros_like(mask)
    first[..., 0] = True
    safe = mask | (first & ~has_key[..., None])
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2),
                                         attn_mask=safe.unsqueeze(-3), scale=scale).transpose(-3, -2)
    return torch.where(has_key[..., None, None], out, 0.0), has_key


def level_weights(router_logits: Tensor, has_bank: Tensor | None, mask_empty_bank: bool) -> Tensor:
    """Router weights ``lambda [N, 3]`` = softmax over levels of ``router_logits [N, 3]``.

    With ``mask_empty_bank`` the softmax runs over the levels that have keys: L1 and L2 always do (they
    include the event itself); L3 is empty until a first block leaves the window (``has_bank [N]``).
    """
    if mask_empty_bank and has_bank is not None:
        empty = torch.zeros_like(router_logits, dtype=torch.bool)
        empty[:, LEVELS - 1] = ~has_bank
        router_logits = router_logits.masked_fill(empty, float("-inf"))
    return torch.softmax(router_logits, dim=-1)


def mix_levels(weights: Tensor, a1: Tensor, a2: Tensor, a3: Tensor) -> Tensor:
    """``sum_l lambda_l a_l``: ``weights [N, 3]``, ``a_l [N, H, D]`` -> ``[N, H, D]`` (lambda shared by heads)."""
    w = weights[:, :, None, None]
    return w[:, 0] * a1 + w[:, 1] * a2 + w[:, 2] * a3


def local_attention(q_rot: Tensor, k_rot: Tensor, v: Tensor, offsets: Tensor, *, window: int | None,
                    backend: str | None = None) -> Tensor:
    """Causal attention of each event to the last ``window`` events of its user (itself included).

    ``q_rot, k_rot, v (sum_b n_b, H, D)`` (RoPE applied), offsets ``[B+1]``; ``window=None`` is unbounded.
    Returns ``(sum_b n_b, H, D)``. The caller validated offsets.
    """
    if window is None:
        return causal_attention(q_rot, k_rot, v, offsets, check_offsets=False)
    return sliding_window_attention(q_rot, k_rot, v, offsets, window_tokens=window - 1, backend=backend,
                                    check_offsets=False)


# ----------------------------------------------------------------------------------------------------
# L2: normalised EMA by a chunked scan
# ----------------------------------------------------------------------------------------------------

def ema_scan(values: Tensor, log_decay: Tensor, num0: Tensor | None = None, den0: Tensor | None = None, *,
             chunk: int = 64) -> tuple[Tensor, Tensor]:
    """Numerators and denominators of normalised EMAs after every step.

    ``num_t = beta * num_{t-1} + x_t`` and ``den_t = beta * den_{t-1} + 1`` for each of S decays
    ``beta = exp(log_decay)``; the normalised slot is ``num_t / den_t``.

    Args:
        values: ``[B, L, G, F]`` (G groups, e.g. heads, each with its own S decays).
        log_decay: ``[G, S]``, ``log beta < 0``.
        num0, den0: ``[B, G, S, F]``, ``[B, G, S]``, the state before step 0 (zeros if None).
        chunk: steps per closed-form chunk (speed only).

    Returns:
        ``num [B, L, G, S, F]``, ``den [B, L, G, S]``.
    """
    batch, length, groups, feat = values.shape
    slots = log_decay.shape[-1]
    if num0 is None:
        num0 = values.new_zeros(batch, groups, slots, feat)
        den0 = values.new_zeros(batch, groups, slots)
    if length == 0:
        return values.new_zeros(batch, 0, groups, slots, feat), values.new_zeros(batch, 0, groups, slots)
    return _chunked_scan(values, log_decay, num0, den0, log_decay.new_ones(()), chunk)


MIN_CARRY_CHUNK = 16
"""Fewest chunk ends per chunk in the levels that carry state between chunks (bounds their depth)."""


def _chunked_scan(values: Tensor, log_decay: Tensor, num0: Tensor, den0: Tensor, den_step: Tensor,
                  chunk: int) -> tuple[Tensor, Tensor]:
    """``ema_scan`` with ``den_t = beta * den_{t-1} + den_step`` (``den_step`` broadcasts to ``[G, S]``).

    Within each chunk of ``c`` steps the EMA from a zero state is ``D @ x`` with ``D[t, j] = beta^(t-j)``.
    The states entering the chunks obey the same recurrence over chunks, with decay ``beta^c`` and the
    chunk ends as inputs (the den input of a chunk is its row-sum of D), so they are this scan again, one
    level up, on ``ceil(L / c) - 1`` ends; that level recurses likewise. A Python loop over chunks instead
    launched kernels in proportion to L, which dominated long-history GPU training steps.
    Every weight is ``exp(lag * log beta)`` of a lag >= 0: it may underflow to 0 over long spans (its
    true value is below the float's range) but never overflows or divides.
    """
    batch, length, groups, feat = values.shape
    slots = log_decay.shape[-1]
    size = min(chunk, length)
    n_chunks = -(-length // size)
    x = F.pad(values, (0, 0, 0, 0, 0, n_chunks * size - length)).view(batch, n_chunks, size, groups, feat)
    decay, carry_weight = _chunk_decays(log_decay, size)
    intra = torch.einsum("gstj,bnjgf->bntgsf", decay, x)  # EMA within each chunk, from a zero state
    intra_den = decay.sum(-1).permute(2, 0, 1) * den_step  # [c, G, S]
    entering, entering_den = num0[:, None], den0[:, None]  # [B, 1, G, S, F], [B, 1, G, S]
    if n_chunks > 1:
        # Chunk ends straight from x (the last row of D), not sliced out of intra: a slice of the big
        # tensor costs a full-size gradient buffer. The last chunk's end carries into nothing.
        ends = torch.einsum("gsj,bnjgf->bngsf", decay[:, :, -1], x[:, :-1])
        # The carries are a few values per chunk: keep them in float32 at least, whatever autocast does.
        dtype = torch.promote_types(ends.dtype, torch.float32)
        with torch.autocast(values.device.type, enabled=False):
            after, after_den = _chunked_scan(
                ends.reshape(batch, n_chunks - 1, groups * slots, feat).to(dtype),
                (size * log_decay).reshape(groups * slots, 1).to(dtype),
                num0.reshape(batch, groups * slots, 1, feat).to(dtype),
                den0.reshape(batch, groups * slots, 1).to(dtype),
                intra_den[-1].reshape(groups * slots, 1).to(dtype), max(chunk, MIN_CARRY_CHUNK))
        entering = torch.cat([entering.to(dtype), after.reshape(batch, n_chunks - 1, groups, slots, feat)], 1)
        entering_den = torch.cat([entering_den.to(dtype), after_den.reshape(batch, n_chunks - 1, groups, slots)], 1)
    num = intra + carry_weight[:, :, :, None] * entering[:, :, None]
    den = intra_den + carry_weight * entering_den[:, :, None]
    return (num.reshape(batch, n_chunks * size, groups, slots, feat)[:, :length],
            den.reshape(batch, n_chunks * size, groups, slots)[:, :length])


def _chunk_decays(log_decay: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """``decay [G, S, c, c]`` with ``beta^(t-j)`` for ``j <= t`` (0 above), ``carry_weight [c, G, S] = beta^(t+1)``."""
    t = torch.arange(size, device=log_decay.device)
    lag = (t[:, None] - t[None, :]).to(log_decay.dtype)
    # exp of a clamped lag keeps the masked (j > t) entries finite, so their zero gradient stays zero.
    decay = torch.where(lag >= 0, torch.exp(lag.clamp(min=0) * log_decay[..., None, None]), 0.0)
    carry_weight = torch.exp((t + 1).to(log_decay.dtype)[:, None, None] * log_decay)
    return decay, carry_weight


def session_attention(q: Tensor, num: Tensor, den: Tensor, scale: float) -> Tensor:
    """Softmax attention of ``q [*, H, D]`` over the S EMA slots ``(num_k / den, num_v / den)``.

    ``num [*, H, S, 2D]`` holds key then value numerators, ``den [*, H, S]``. Returns ``[*, H, D]``.
    """
    num_k, num_v = num.split(q.shape[-1], dim=-1)
    scores = torch.einsum("...hd,...hsd->...hs", q, num_k) * scale / den
    probs = torch.softmax(scores, dim=-1) / den
    return torch.einsum("...hs,...hsd->...hd", probs, num_v)


def session_summary(num: Tensor, den: Tensor) -> Tensor:
    """FastMKA's L2 source: the mean over S slots of ``num / den``; ``[*, S, F], [*, S]`` -> ``[*, F]``."""
    return (num / den[..., None]).mean(-2)


def mka_session(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, offsets: Tensor, max_len: int, *,
                scale: float, chunk: int) -> Tensor:
    """MKA's L2 level for a jagged batch: ``q, k, v (sum_b n_b, H, D)``, ``log_decay [H, S]`` -> ``(sum_b n_b, H, D)``.

    The un-rotated k and v of a user are scanned from a zero state (its first event is step 0).
    """
    kv = jagged_to_padded(torch.cat([k, v], dim=-1), offsets, max_len)  # [B, L, H, 2D]
    num, den = ema_scan(kv, log_decay, chunk=chunk)
    total = q.shape[0]
    return session_attention(q, padded_to_jagged(num, offsets, total), padded_to_jagged(den, offsets, total), scale)


# ----------------------------------------------------------------------------------------------------
# L3: blocks by absolute index
# ----------------------------------------------------------------------------------------------------

@dataclass
class BlockRows:
    """Where each event sits in the block-aligned padded layout ``[B, num_blocks * C3]``.

    A user's events are shifted by ``first_position % C3`` so that aligned index ``a`` is in local block
    ``a // C3``; absolute block = ``first_position // C3 + a // C3``. ``user, index`` are ``[T]`` int64.
    """

    user: Tensor
    index: Tensor
    num_blocks: int


def block_rows(offsets: Tensor, positions: Tensor, block_size: int, max_len: int | None = None) -> BlockRows:
    """Aligned rows of a jagged batch whose users have consecutive absolute ``positions [T]``.

    ``max_len`` (the longest user, where the caller knows it): the block count is its bound, at most one empty
    block more than the exact count, so that no host read is needed (a CUDA graph can capture the pass). Empty
    blocks are never visible to an event, so every event's result is the same either way."""
    total = positions.shape[0]
    user = segment_ids(offsets, total)
    if total == 0:
        return BlockRows(user, user.clone(), 0)
    first = positions[offsets[:-1].clamp(max=total - 1)]
    index = first[user] % block_size + positions_in_segment(offsets, total)
    # the last aligned index is at most (block_size - 1) + (max_len - 1)
    num_blocks = int(index.max()) // block_size + 1 if max_len is None else (block_size + max_len - 2) // block_size + 1
    return BlockRows(user, index, num_blocks)


def block_means(values: Tensor, rows: BlockRows, batch: int, block_size: int) -> Tensor:
    """Mean of ``values (T, *F)`` over the events present in each block -> ``[B, num_blocks, *F]``."""
    nb = rows.num_blocks
    flat = rows.user * nb + rows.index // block_size
    sums = values.new_zeros(batch * nb, *values.shape[1:]).index_add(0, flat, values)
    counts = values.new_zeros(batch * nb).index_add(0, flat, values.new_ones(values.shape[0]))
    shape = (batch * nb,) + (1,) * (values.dim() - 1)
    return (sums / counts.clamp(min=1).view(shape)).view(batch, nb, *values.shape[1:])


def newest_visible_block(index: Tensor, *, local_window: int, block_size: int) -> Tensor:
    """Newest block visible to a query: its last event ``(g+1)*C3 - 1`` is at least ``W1`` events old.

    Works for absolute positions and for aligned indices alike (both are block-aligned). May be < 0.
    """
    return torch.div(index - local_window + 1, block_size, rounding_mode="floor") - 1


def bank_attention(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, positions: Tensor, *, local_window: int,
                   block_size: int, max_blocks: int, scale: float, max_len: int | None = None) -> tuple[Tensor, Tensor]:
    """MKA's L3 level: each event attends to the means of the newest ``M3`` visible blocks of its user.

    ``q, k, v (sum_b n_b, H, D)`` un-rotated; ``positions (sum_b n_b,)`` consecutive absolute indices per
    user. Block g (events ``g*C3 .. g*C3 + C3 - 1``, means over those present) is visible to the query at
    p iff ``(g+1)*C3 - 1 <= p - W1``; the visible set is the run ``[hi - M3 + 1, hi]`` of existing blocks.

    Query rows are cut into tiles of ``G`` blocks (``R = G*C3`` rows); a tile's rows together see at most
    ``M3 + G`` consecutive blocks, so keys are gathered per tile as ``[B, tiles, K, H, 2D]`` (about the size
    of k itself) and one masked SDPA call serves the batch. No ``T x T`` mask is built.

    ``max_len``: the longest user, if known (``block_rows``: no host read then).

    Returns ``(out (sum_b n_b, H, D), has_bank (sum_b n_b,) bool)``; rows with no visible block are 0.
    """
    total, heads, dim = q.shape
    batch = offsets.numel() - 1
    rows = block_rows(offsets, positions, block_size, max_len)
    nb = rows.num_blocks
    if total == 0 or max_blocks == 0:
        return q.new_zeros(q.shape), torch.zeros(total, dtype=torch.bool, device=q.device)
    means = block_means(torch.cat([k, v], dim=-1), rows, batch, block_size)  # [B, nb, H, 2D]
    tile_blocks = min(nb, math.ceil(max(max_blocks, MIN_TILE_ROWS) / block_size))
    tile_rows = tile_blocks * block_size
    n_tiles = -(-nb // tile_blocks)
    keys_per_tile = min(max_blocks + tile_blocks, nb)
    a = torch.arange(n_tiles * tile_rows, device=q.device)
    hi = newest_visible_block(a, local_window=local_window, block_size=block_size).view(n_tiles, tile_rows)
    # First key block of each tile: the oldest block any of its rows sees, kept inside [0, nb - K].
    first_key = (hi[:, 0] - max_blocks + 1).clamp(min=0).clamp(max=nb - keys_per_tile)
    key_block = first_key[:, None] + torch.arange(keys_per_tile, device=q.device)  # [tiles, K]
    kb = key_block[:, None, :]
    mask = (kb <= hi[..., None]) & (kb > hi[..., None] - max_blocks)  # [tiles, R, K]
    queries = q.new_zeros(batch, n_tiles * tile_rows, heads, dim).index_put((rows.user, rows.index), q)
    keys, values = means[:, key_block].split(dim, dim=-1)  # [B, tiles, K, H, D]
    out, has = masked_attention(queries.view(batch, n_tiles, tile_rows, heads, dim), keys, values, mask, scale)
    tile, row = rows.index // tile_rows, rows.index % tile_rows
    return out[rows.user, tile, row], has[tile, row]


def block_running_mean(x: Tensor, offsets: Tensor, positions: Tensor, block_size: int,
                       max_len: int | None = None) -> Tensor:
    """FastMKA's L3 source: mean of ``x (sum_b n_b, C)`` over the events of each event's block up to itself
    (``max_len`` as for ``block_rows``)."""
    total, feat = x.shape
    batch = offsets.numel() - 1
    rows = block_rows(offsets, positions, block_size, max_len)
    if total == 0:
        return x.new_zeros(x.shape)
    width = rows.num_blocks * block_size
    padded = x.new_zeros(batch, width, feat).index_put((rows.user, rows.index), x)
    present = x.new_zeros(batch, width).index_put((rows.user, rows.index), x.new_ones(total))
    sums = padded.view(batch, rows.num_blocks, block_size, feat).cumsum(2).view(batch, width, feat)
    counts = present.view(batch, rows.num_blocks, block_size).cumsum(2).view(batch, width)
    return sums[rows.user, rows.index] / counts[rows.user, rows.index, None]


# ----------------------------------------------------------------------------------------------------
# FastMKA: fused sources
# ----------------------------------------------------------------------------------------------------

def fuse_sources(x: Tensor, session: Tensor, block: Tensor, weights: Tensor) -> Tensor:
    """``x_fused = lambda_1 x + lambda_2 L2 + lambda_3 L3``; all ``[N, C]``, ``weights [N, 3]``."""
    return weights[:, 0, None] * x + weights[:, 1, None] * session + weights[:, 2, None] * block


def fastmka_sources(x: Tensor, router_logits: Tensor, log_decay: Tensor, offsets: Tensor, positions: Tensor,
                    max_len: int, *, block_size: int, chunk: int) -> tuple[Tensor, Tensor]:
    """FastMKA's route-fused sources (MKA.md section 3) for a jagged batch.

    Args:
        x: ``(sum_b n_b, C)`` layer input; router_logits ``(sum_b n_b, 3)``; log_decay ``[S]``.
        positions: ``(sum_b n_b,)`` consecutive absolute indices per user (blocks are by absolute index).

    Returns:
        ``(x_fused (sum_b n_b, C), weights (sum_b n_b, 3))`` with L1 = x, L2 = mean of the S normalised
        EMAs of x, L3 = running mean of x over the event's block up to the event.
    """
    weights = torch.softmax(router_logits, dim=-1)
    num, den = ema_scan(jagged_to_padded(x, offsets, max_len)[:, :, None], log_decay[None], chunk=chunk)
    session = padded_to_jagged(session_summary(num[:, :, 0], den[:, :, 0]), offsets, x.shape[0])
    block = block_running_mean(x, offsets, positions, block_size, max_len)
    return fuse_sources(x, session, block, weights), weights


__all__ = [
    "BlockRows", "LEVELS", "bank_attention", "block_means", "block_rows", "block_running_mean", "ema_scan",
    "fastmka_sources", "fuse_sources", "level_weights", "local_attention", "masked_attention", "mix_levels",
    "mka_session", "newest_visible_block", "session_attention", "session_summary",
]

"""MKA / FastMKA step path: a piece of new events per user against fixed-size per-user state.

A piece holds at most ``P`` new events per user, padded to ``[B, P, ...]`` (``valid [B, P]`` marks the real
rows). Events of a user have consecutive absolute positions, so a row's position is
``base[b] + row``, whatever is padding. The state is a set of rings indexed by absolute identity:

* the L1 ring: slot ``p % W`` holds event p, for the last ``W`` events;
* the L3 bank: slot ``g % N`` holds the key/value *sums* and the count of block g, for the last ``N``
  block ids (the open block included).

Which event or block a slot holds follows from the user's ``start`` (first position seen) and ``count``
(events seen), so no ids are stored. All functions are pure (state in, state out) and differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ksa_rec.ops.mka.reference import masked_attention, newest_visible_block


def ring_index(newest: Tensor, oldest: Tensor, present: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Ids held by a ring of ``size`` slots where slot ``s`` holds the newest id ``== s (mod size)``.

    ``newest, oldest [B]`` bound the ids written so far; ``present [B]`` is False for rings never
    written. Returns ``(ids [B, size], valid [B, size])``.
    """
    slot = torch.arange(size, device=newest.device)
    ids = newest[:, None] - (newest[:, None] - slot) % size
    return ids, present[:, None] & (ids >= oldest[:, None])


def ring_write(ring: Tensor, new: Tensor, new_pos: Tensor, valid: Tensor, newest: Tensor) -> Tensor:
    """Write rows ``new [B, P, *F]`` with ids ``new_pos [B, P]`` into ``ring [B, W, *F]`` at slot ``id % W``.

    Only the rows among the ``W`` newest ids (``newest [B]`` after this piece) are written, so no two rows
    share a slot.
    """
    size = ring.shape[1]
    b, j = (valid & (new_pos > newest[:, None] - size)).nonzero(as_tuple=True)
    return ring.index_put((b, new_pos[b, j] % size), new[b, j])


def take_last(new: Tensor, lengths: Tensor, old: Tensor) -> Tensor:
    """Row ``lengths[b] - 1`` of ``new [B, P, *F]`` per user, or ``old [B, *F]`` where ``lengths[b] == 0``."""
    batch = new.shape[0]
    row = new[torch.arange(batch, device=new.device), (lengths - 1).clamp(min=0)]
    keep = (lengths > 0).view(batch, *([1] * (old.dim() - 1)))
    return torch.where(keep, row, old)


def window_attention_cached(q: Tensor, q_pos: Tensor, keys: Tensor, values: Tensor, key_pos: Tensor,
                            key_valid: Tensor, *, window: int, scale: float) -> Tensor:
    """Query at p sees the valid keys with positions ``p - window < j <= p``.

    ``q [B, P, H, D]``, ``q_pos [B, P]``; ``keys, values [B, K, H, D]`` (the ring then the piece),
    ``key_pos, key_valid [B, K]``. Returns ``[B, P, H, D]``.
    """
    lag = q_pos[:, :, None] - key_pos[:, None, :]
    mask = key_valid[:, None, :] & (lag >= 0) & (lag < window)
    return masked_attention(q, keys, values, mask, scale)[0]


def bank_update(bank_sum: Tensor, bank_count: Tensor, new: Tensor, new_pos: Tensor, valid: Tensor,
                open_block: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Add the piece's rows to the block sums of the bank.

    ``bank_sum [B, N, H, E]``, ``bank_count [B, N]`` int64; ``new [B, P, H, E]``; ``open_block [B]`` is the
    id of the block the user's last event fell in (-1 before any event): the slot of every newer block
    id is reset before its first row is added, since it still holds the block ``N`` ids older.
    """
    size = bank_sum.shape[1]
    b, j = valid.nonzero(as_tuple=True)
    block = torch.div(new_pos[b, j], block_size, rounding_mode="floor")
    slot = block % size
    fresh = block > open_block[b]
    reset = torch.zeros_like(bank_count, dtype=torch.bool).index_put((b[fresh], slot[fresh]),
                                                                     torch.ones_like(b[fresh], dtype=torch.bool))
    bank_sum = bank_sum.masked_fill(reset[:, :, None, None], 0.0).index_put((b, slot), new[b, j], accumulate=True)
    bank_count = bank_count.masked_fill(reset, 0).index_put((b, slot), torch.ones_like(b), accumulate=True)
    return bank_sum, bank_count


def bank_attention_cached(q: Tensor, q_pos: Tensor, bank_sum: Tensor, bank_count: Tensor, block_ids: Tensor,
                          block_valid: Tensor, *, local_window: int, block_size: int, max_blocks: int,
                          scale: float) -> tuple[Tensor, Tensor]:
    """MKA's L3 for a piece: query at p sees the bank's blocks ``hi - M3 < g <= hi`` (``hi`` = newest visible).

    ``q [B, P, H, D]`` un-rotated, ``bank_sum [B, N, H, 2D]``, ``bank_count [B, N]``, ``block_ids,
    block_valid [B, N]`` from ``ring_index`` *after* ``bank_update`` with this piece: a block visible to a
    query of the piece is complete before it, and the bank is large enough that no such block was
    overwritten (see ``bank_slots``). Returns ``(out [B, P, H, D], has_bank [B, P])``.
    """
    hi = newest_visible_block(q_pos, local_window=local_window, block_size=block_size)[:, :, None]
    ids = block_ids[:, None, :]
    mask = block_valid[:, None, :] & (ids <= hi) & (ids > hi - max_blocks)
    means = bank_sum / bank_count.clamp(min=1).to(bank_sum.dtype)[:, :, None, None]
    keys, values = means.split(q.shape[-1], dim=-1)
    return masked_attention(q, keys, values, mask, scale)


def bank_slots(local_window: int, block_size: int, max_blocks: int, piece: int) -> int:
    """Bank size N so that updating with a piece of up to ``piece`` events never evicts a block that a
    query of the piece still sees: ``N = M3 + ceil((P + W1 - 2) / C3) + 1``.

    The piece writes block ids up to ``p_last // C3``; its first query needs ids down to
    ``hi(p_first) - M3 + 1``; ``p_last // C3 - hi(p_first) <= ceil((P + W1 - 2) / C3) + 1``.
    """
    return max_blocks + -(-(piece + local_window - 2) // block_size) + 1


def block_running_mean_cached(x: Tensor, base: Tensor, valid: Tensor, open_sum: Tensor, open_count: Tensor,
                              open_block: Tensor, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """FastMKA's L3 source for a piece: running mean of x over each event's block up to the event.

    ``x [B, P, C]``; the piece's positions are ``base [B] + row``; ``open_sum [B, C]``, ``open_count [B]``
    are the sums of block ``open_block [B]`` (-1: none) before the piece. Returns the means ``[B, P, C]``
    and the open block's new sum and count (those of each user's last real row).
    """
    batch, piece, feat = x.shape
    row = torch.arange(piece, device=x.device)
    pos = base[:, None] + row
    block = torch.div(pos, block_size, rounding_mode="floor")
    start_row = (block * block_size - base[:, None]).clamp(min=0)  # where the block starts in this piece
    # Cumulative sums over at most P rows: short enough that differences of them stay accurate.
    cumsum = torch.cat([x.new_zeros(batch, 1, feat), (x * valid[..., None]).cumsum(1)], dim=1)
    sums = cumsum[:, 1:] - cumsum.gather(1, start_row[..., None].expand(-1, -1, feat))
    counts = row - start_row + 1
    carried = block == open_block[:, None]
    sums = sums + torch.where(carried[..., None], open_sum[:, None], 0.0)
    counts = counts + torch.where(carried, open_count[:, None], 0)
    lengths = valid.sum(1)
    return (sums / counts[..., None].to(x.dtype), take_last(sums, lengths, open_sum),
            take_last(counts, lengths, open_count))


__all__ = [
    "bank_attention_cached", "bank_slots", "bank_update", "block_running_mean_cached", "ring_index",
    "ring_write", "take_last", "window_attention_cached",
]

"""Exact top-K over the whole item table, chunk by chunk (memory ``B x (item_chunk + K)``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ksa_rec.data.schema import RESERVED_IDS
from ksa_rec.utils.jagged import segment_ids


def topk_items(user_vecs: Tensor, item_weight: Tensor, k: int, exclude_values: Tensor | None = None,
               exclude_offsets: Tensor | None = None, item_chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Best ``k`` items per user by ``<user_vec, item_embedding>``, never PAD/OOV or an excluded item.

    Args:
        user_vecs: ``[B, dim]``; item_weight: ``[num_items, dim]``.
        exclude_values, exclude_offsets: jagged item ids ``[M]`` / ``[B+1]`` to leave out per user.
    Returns:
        ``(scores [B, k'], item_ids [B, k'])`` best first, ``k' = min(k, eligible items)``; users with
        fewer eligible items get ``-inf`` scores and id 0 (PAD) in the tail.
    """
    batch, num_items = user_vecs.shape[0], item_weight.shape[0]
    k = min(k, num_items - RESERVED_IDS)
    best_scores = user_vecs.new_full((batch, k), float("-inf"))
    best_ids = torch.zeros(batch, k, dtype=torch.int64, device=user_vecs.device)
    if exclude_values is not None and exclude_values.numel():
        ex_user, ex_item = segment_ids(exclude_offsets, exclude_values.numel()), exclude_values
    else:
        ex_user = ex_item = torch.zeros(0, dtype=torch.int64, device=user_vecs.device)
    for start in range(RESERVED_IDS, num_items, item_chunk):
        stop = min(start + item_chunk, num_items)
        scores = user_vecs @ item_weight[start:stop].t()
        inside = (ex_item >= start) & (ex_item < stop)
        scores[ex_user[inside], ex_item[inside] - start] = float("-inf")
        ids = torch.arange(start, stop, device=user_vecs.device).expand(batch, -1)
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_ids = torch.cat([best_ids, ids], dim=1)
        best_scores, where = merged_scores.topk(k, dim=1)
        best_ids = merged_ids.gather(1, where)
    best_ids = torch.where(torch.isinf(best_scores), torch.zeros_like(best_ids), best_ids)
    return best_scores, best_ids

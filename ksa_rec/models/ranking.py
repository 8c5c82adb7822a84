"""The one ranking walk over the item catalogue, shared by evaluation, scoring and streaming.

:func:`masked_score_chunks` scores ``item_chunk`` items at a time, so the ``[B, num_items]`` matrix never
exists at once (millions of items fit). In every chunk PAD/OOV and each row's excluded items score -inf.
Its two consumers:

- :func:`target_ranks`: 0-based rank of a target = how many eligible items score at least as high as it
  (ties count against the model). The target is never its own competitor. A target that is among its
  own row's exclusions is removed from the ranking like any excluded item and gets :data:`UNRANKED`.
- :func:`topk_items`: exact top-K.

What is excluded is the caller's choice; for the items a user consumed before, it is one of
:data:`SEEN_ITEMS`:

- ``mask`` (the published code's rule, the default): every item the user consumed before is excluded,
  the target too when it is one of them. A re-consumed target can then never be recommended, so it
  counts as a miss. Exempting the target from its own mask instead would leak: the user's other history
  is pushed down and the target is the only consumed item left, so a model that scores "items this user
  consumed" high finds it near the top.
- ``keep``: nothing is excluded (repeat-aware recommendation).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from ksa_rec.data.schema import RESERVED_IDS
from ksa_rec.utils.jagged import segment_ids

SeenItems = Literal["mask", "keep"]
SEEN_ITEMS: tuple[str, ...] = get_args(SeenItems)

UNRANKED = torch.iinfo(torch.int64).max
"""Rank of a target that its row's exclusions remove from the ranking: below every item, so outside every
top-K; the metrics read it as an infinite rank (HR@K, NDCG@K and MRR all 0). The published code (ICLRec,
BSARec: ``rating_pred[train_matrix > 0] = 0`` before ``argpartition`` takes the top 20) sets the score of
every history item, the target included, to 0; a trained model's top-20 scores lie above 0, so such a
target sits below every top-20 item, a miss at each cutoff they report (and they report no MRR)."""


@dataclass(frozen=True)
class Exclusions:
    """Items removed from a ranking, as (row, item) pairs: row ``rows[m]`` is never offered ``items[m]``."""

    rows: Tensor
    """int64 ``[M]``: the row (user) of each pair."""
    items: Tensor
    """int64 ``[M]``: the excluded item id of each pair."""

    @classmethod
    def from_jagged(cls, values: Tensor | None, offsets: Tensor | None, device: torch.device) -> Exclusions:
        """Pairs from jagged item ids per row (``values [M]``, ``offsets [B+1]``); None: nothing excluded."""
        if values is None or not values.numel():
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return cls(empty, empty)
        if offsets.numel() == 2:  # one row: every pair is row 0
            return cls(torch.zeros(values.numel(), dtype=torch.int64, device=device), values.to(device))
        return cls(segment_ids(offsets, values.numel()).to(device), values.to(device))

    def plus(self, rows: Tensor, items: Tensor) -> Exclusions:
        return Exclusions(torch.cat([self.rows, rows]), torch.cat([self.items, items]))

    def hits(self, items: Tensor) -> Tensor:
        """bool ``[B]``: whether ``items[b]`` is among row ``b``'s exclusions (``items`` int64 ``[B]``)."""
        out = torch.zeros(items.numel(), dtype=torch.bool, device=items.device)
        out[self.rows[self.items == items[self.rows]]] = True
        return out


def mask_chunk(scores: Tensor, start: int, exclusions: Exclusions, whole: bool = False) -> Tensor:
    """Set, in place, the scores of PAD/OOV and of each row's excluded items to -inf; ``scores [B, n]``
    are items ``[start, start + n)``; ``whole``: they are the whole table (every excluded item is among
    them, no filtering). Returns ``scores``."""
    scores[:, : max(0, RESERVED_IDS - start)] = float("-inf")
    if whole:
        scores[exclusions.rows, exclusions.items] = float("-inf")
        return scores
    inside = (exclusions.items >= start) & (exclusions.items < start + scores.shape[1])
    scores[exclusions.rows[inside], exclusions.items[inside] - start] = float("-inf")
    return scores


def masked_score_chunks(user_vecs: Tensor, item_weight: Tensor, exclusions: Exclusions,
                        item_chunk: int) -> Iterator[tuple[int, Tensor]]:
    """``(start, scores [B, n])`` for consecutive item chunks ``[start, start + n)`` of the whole table,
    ``n <= item_chunk``, masked by :func:`mask_chunk`.

    Args:
        user_vecs: ``[B, dim]``; item_weight: ``[num_items, dim]``; scores are their dot products.
    """
    whole = item_weight.shape[0] <= item_chunk
    for start in range(0, item_weight.shape[0], item_chunk):
        scores = user_vecs @ item_weight[start: start + item_chunk].t()
        yield start, mask_chunk(scores, start, exclusions, whole)


class RankCounter:
    """Ranks of targets, counted chunk by chunk over masked scores (every item fed exactly once).

    Args:
        targets: int64 ``[B]``; target_scores: ``[B, 1]``, each target's score.
        exclusions: the rows' excluded items; a target among its own row's is :data:`UNRANKED`.
    """

    def __init__(self, targets: Tensor, target_scores: Tensor, exclusions: Exclusions):
        self.target_scores = target_scores
        self.unranked = exclusions.hits(targets)
        # The target is not its own competitor (its score here and in a chunk may round differently).
        self.exclusions = exclusions.plus(torch.arange(targets.numel(), device=targets.device), targets)
        self.counts = torch.zeros(targets.numel(), dtype=torch.int64, device=targets.device)

    def add(self, masked_scores: Tensor) -> None:
        """Count one chunk's eligible items scoring at least as high as the target (masked by
        :func:`mask_chunk` with ``self.exclusions``)."""
        self.counts += (masked_scores >= self.target_scores).sum(1)

    def ranks(self) -> Tensor:
        """int64 ``[B]``: 0-based ranks, :data:`UNRANKED` where the target is excluded."""
        return torch.where(self.unranked, torch.full_like(self.counts, UNRANKED), self.counts)


def target_ranks(user_vecs: Tensor, item_weight: Tensor, targets: Tensor, exclude_values: Tensor | None,
                 exclude_offsets: Tensor | None, item_chunk: int = 65536) -> Tensor:
    """0-based rank of each target among the eligible items (see the module docstring).

    Args:
        user_vecs: ``[B, dim]``; item_weight: ``[num_items, dim]``; targets: int64 ``[B]``.
        exclude_values, exclude_offsets: jagged items to exclude per row (``[M]``, ``[B+1]``), or None.
    Returns:
        int64 ``[B]``; :data:`UNRANKED` where a target is among its row's exclusions.
    """
    exclusions = Exclusions.from_jagged(exclude_values, exclude_offsets, user_vecs.device)
    counter = RankCounter(targets, (user_vecs * item_weight[targets]).sum(-1, keepdim=True), exclusions)
    for _, scores in masked_score_chunks(user_vecs, item_weight, counter.exclusions, item_chunk):
        counter.add(scores)
    return counter.ranks()


def topk_items(user_vecs: Tensor, item_weight: Tensor, k: int, exclude_values: Tensor | None = None,
               exclude_offsets: Tensor | None = None, item_chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Best ``k`` items per row by ``<user_vec, item_embedding>``, never PAD/OOV or an excluded item
    (memory ``B x (item_chunk + k)``).

    Args:
        user_vecs: ``[B, dim]``; item_weight: ``[num_items, dim]``.
        exclude_values, exclude_offsets: jagged item ids ``[M]`` / ``[B+1]`` to leave out per row.
    Returns:
        ``(scores [B, k'], item_ids [B, k'])`` best first, ``k' = min(k, num_items - 2)``; rows with fewer
        eligible items get ``-inf`` scores and id 0 (PAD) in the tail.
    """
    batch = user_vecs.shape[0]
    k = min(k, item_weight.shape[0] - RESERVED_IDS)
    best_scores = user_vecs.new_full((batch, k), float("-inf"))
    best_ids = torch.zeros(batch, k, dtype=torch.int64, device=user_vecs.device)
    exclusions = Exclusions.from_jagged(exclude_values, exclude_offsets, user_vecs.device)
    for start, scores in masked_score_chunks(user_vecs, item_weight, exclusions, item_chunk):
        ids = torch.arange(start, start + scores.shape[1], device=user_vecs.device).expand(batch, -1)
        best_scores, where = torch.cat([best_scores, scores], dim=1).topk(k, dim=1)
        best_ids = torch.cat([best_ids, ids], dim=1).gather(1, where)
    best_ids = torch.where(torch.isneginf(best_scores), torch.zeros_like(best_ids), best_ids)
    return best_scores, best_ids

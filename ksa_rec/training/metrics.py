"""Full-catalogue ranking metrics: HR@K, NDCG@K, MRR from the ranks of :mod:`ksa_rec.models.ranking`.

A target ranked 0 is the top item. An :data:`~ksa_rec.models.ranking.UNRANKED` target (removed from its
own ranking: a re-consumed item under ``seen_items: mask``) counts as a miss at every cutoff, MRR 0.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from ksa_rec.models.ranking import UNRANKED

__all__ = ["CUTOFFS", "RankingMetrics", "rank_metrics"]

CUTOFFS = (5, 10, 20)


def rank_metrics(ranks: Tensor) -> dict[str, Tensor]:
    """Per-user metric values ``[B]`` (float) from 0-based ranks."""
    ranks_f = torch.where(ranks == UNRANKED, float("inf"), ranks.to(torch.float64))
    out = {"mrr": 1.0 / (ranks_f + 1.0)}
    for k in CUTOFFS:
        hit = ranks < k
        out[f"hr@{k}"] = hit.to(torch.float64)
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks_f + 2.0), torch.zeros_like(ranks_f))
    return out


class RankingMetrics(Metric):
    """Accumulates mean HR@{5,10,20}, NDCG@{5,10,20}, MRR (and their 95% normal-approximation
    half-widths) over targets (= users under leave-one-out), optionally per group. Groups may come in
    several families (e.g. distance-of-evidence buckets and history-length buckets): a target counts
    once in "all" and once in its group of each family."""

    full_state_update = False

    def __init__(self, groups: tuple[str, ...] = ()):
        super().__init__()
        self.groups = ("all",) + tuple(groups)
        names = list(rank_metrics(torch.zeros(1, dtype=torch.int64)))
        self.names = names
        shape = (len(self.groups), len(names))
        self.add_state("sums", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("squares", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(len(self.groups), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, ranks: Tensor, *groups: Tensor) -> None:
        """``ranks [B]``; each of ``groups`` (one per family) ``[B]`` int index into ``groups[1:]``
        (-1: the target is in no group of that family)."""
        values = torch.stack(list(rank_metrics(ranks).values()), dim=1)  # [B, M]
        self._add(0, values)
        for group in groups:
            for g in range(1, len(self.groups)):
                sel = group == g - 1
                if bool(sel.any()):
                    self._add(g, values[sel])

    def _add(self, g: int, values: Tensor) -> None:
        self.sums[g] += values.sum(0)
        self.squares[g] += (values * values).sum(0)
        self.counts[g] += values.shape[0]

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for g, group in enumerate(self.groups):
            n = float(self.counts[g])
            if n == 0:
                continue
            prefix = "" if group == "all" else f"{group}/"
            for m, name in enumerate(self.names):
                mean = float(self.sums[g, m]) / n
                var = max(float(self.squares[g, m]) / n - mean * mean, 0.0)
                out[f"{prefix}{name}"] = mean
                out[f"{prefix}{name}_ci95"] = 1.96 * (var / max(n - 1.0, 1.0)) ** 0.5
            out[f"{prefix}targets"] = n
        return out

"""Event token embeddings through a TorchRec ``EmbeddingCollection``.

One table per key of the input ``KeyedJaggedTensor``: ``item_id`` (tied to the output head), each
categorical side feature, and optionally ``time_gap`` (log2-bucketed seconds since the previous
event). A token is the sum of its keys' embeddings. Example KJT for B = 2 users, n = (3, 1)::

    key       | user 0        | user 1
    item_id   | 7   12   7    | 3
    category  | 2   4    2    | 5
    time_gap  | 0   9    3    | 0

Summary tokens take only the time part of their chunk's last event (KSA.md section 4), which is why
``forward`` returns it separately.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from ksa_rec.data.schema import ITEM, TIME_GAP


class EventEmbedding(nn.Module):
    """KJT of event features -> ``(tokens [T, dim], time part [T, dim] or None)``."""

    def __init__(self, dim: int, num_items: int, feature_cardinalities: dict[str, int],
                 time_gap_buckets: int = 0):
        super().__init__()
        std = 1.0 / math.sqrt(dim)

        def init(weight: Tensor) -> Tensor:
            return nn.init.normal_(weight, std=std)

        tables = [EmbeddingConfig(name=ITEM, embedding_dim=dim, num_embeddings=num_items,
                                  feature_names=[ITEM], init_fn=init)]
        tables += [EmbeddingConfig(name=name, embedding_dim=dim, num_embeddings=size,
                                   feature_names=[name], init_fn=init)
                   for name, size in sorted(feature_cardinalities.items())]
        if time_gap_buckets:
            tables.append(EmbeddingConfig(name=TIME_GAP, embedding_dim=dim,
                                          num_embeddings=time_gap_buckets, feature_names=[TIME_GAP],
                                          init_fn=init))
        self.keys = [t.name for t in tables]
        self.uses_time_gap = bool(time_gap_buckets)
        self.collection = EmbeddingCollection(tables=tables)

    @property
    def item_weight(self) -> Tensor:
        """``[num_items, dim]``, shared with the output head."""
        return self.collection.embeddings[ITEM].weight

    def forward(self, features: KeyedJaggedTensor) -> tuple[Tensor, Tensor | None]:
        looked_up = self.collection(features)
        missing = [k for k in self.keys if k not in looked_up]
        if missing:
            raise ValueError(f"batch features lack keys {missing}; the model expects {self.keys}")
        parts = {k: looked_up[k].values() for k in self.keys}
        tokens = torch.stack(list(parts.values())).sum(0)
        return tokens, parts.get(TIME_GAP)

"""The plain next-item model (no Lightning): embeddings -> encoder -> head tied to the item table."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ksa_rec.data.batch import SequenceBatch
from ksa_rec.data.schema import ITEM, RESERVED_IDS, DataSpec
from ksa_rec.modules.config import EncoderConfig
from ksa_rec.modules.embeddings import EventEmbedding
from ksa_rec.modules.encoder import SequenceEncoder
from ksa_rec.modules.losses import LossConfig, full_cross_entropy, sampled_softmax
from ksa_rec.ops.ksa.layout import summary_index


class SeqRecModel(nn.Module):
    """Next-item recommender over jagged user histories.

    ``encode`` gives a state per event ``(sum_b n_b, dim)``; ``user_vectors`` the state after each
    user's newest event ``[B, dim]``; ``head`` says how a state scores the catalogue. ``step``
    continues per-user streaming states with new events (serving runs this, the same code as training).
    """

    def __init__(self, encoder: EncoderConfig, loss: LossConfig, data_spec: DataSpec):
        super().__init__()
        self.encoder_cfg, self.loss_cfg, self.data_spec = encoder, loss, data_spec
        self.embedding = EventEmbedding(encoder.dim, data_spec.num_items, data_spec.feature_cardinalities,
                                        encoder.time_gap_buckets)
        self.encoder = SequenceEncoder(encoder)
        content_readers = [i for i, block in enumerate(self.encoder.blocks)
                           if block.attn.reads_summaries and (i > 0 or self.encoder.keeps_open_chunk)]
        if loss.summary_reconstruction > 0 and not content_readers:
            raise ValueError(f"loss.summary_reconstruction needs a layer that reads summaries carrying chunk content "
                             f"(pattern {encoder.pattern!r}: a ksa layer after the first, or summary_init: chunk)")
        # Training frequency of each item, for the logQ correction; filled by the trainer from the data.
        self.register_buffer("item_prob", torch.full((data_spec.num_items,), 1.0 / data_spec.num_items))
        # Set when TorchRec shards the item table (ksa_rec.training.sharding.ShardedItems): item lookups
        # and full-catalogue ranks then go through the sharded collection.
        self.sharded_items = None

    @property
    def item_weight(self) -> Tensor:
        return self.embedding.item_weight

    def item_embeddings(self, ids: Tensor) -> Tensor:
        """Embeddings of item ids ``[M]`` -> ``[M, dim]`` (the one place a sharded table must hook)."""
        if self.sharded_items is not None:
            return self.sharded_items.lookup(ids)
        return self.item_weight[ids]

    # ---- the head: how a state scores items (training, evaluation and serving all go through here) ------------
    def head(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """``hidden [N, dim]`` -> ``(queries [N, dim], items [num_items, dim])``; item i's score for row r is
        ``queries[r] . items[i]`` (the loss divides it by loss.temperature; a ranking needs no temperature).
        ``loss.similarity`` dot: the raw vectors; cosine: both at unit length."""
        return self.head_queries(hidden), self.head_items()

    def head_queries(self, hidden: Tensor) -> Tensor:
        """``head``'s queries alone (serving keeps ``head_items`` of its frozen model once)."""
        return self._unit(hidden)

    def head_items(self) -> Tensor:
        """``head``'s item matrix ``[num_items, dim]``."""
        return self._unit(self.item_weight)

    def head_item_embeddings(self, ids: Tensor) -> Tensor:
        """Item ids ``[M]`` -> their rows of ``head``'s item matrix ``[M, dim]``, looked up (sharded or not)."""
        return self._unit(self.item_embeddings(ids))

    def _unit(self, vectors: Tensor) -> Tensor:
        return F.normalize(vectors, dim=-1) if self.loss_cfg.similarity == "cosine" else vectors

    def encode(self, batch: SequenceBatch, read_summaries: list[Tensor] | None = None) -> Tensor:
        """Event states ``(sum_b n_b, dim)``; ``read_summaries`` as in ``SequenceEncoder.forward``."""
        tokens, time_part = self.embedding(batch.features)
        return self.encoder(tokens, batch.offsets, batch.positions, time_part, batch.max_len, read_summaries)

    def user_vectors(self, batch: SequenceBatch) -> Tensor:
        """State after each user's newest event, ``[B, dim]`` (every user must have >= 1 event)."""
        lengths = batch.offsets[1:] - batch.offsets[:-1]
        if bool((lengths == 0).any()):
            raise ValueError("user_vectors needs at least one event per user")
        return self.encode(batch)[batch.offsets[1:] - 1]

    # ---- streaming ----------------------------------------------------------------------------------------
    def empty_states(self, batch: int, device="cpu") -> list:
        """Per-layer streaming states of ``batch`` users with no events."""
        return self.encoder.empty_states(batch, self.item_weight.dtype, device)

    def stack_states(self, users: list[list[dict[str, Tensor]]], device=None) -> list:
        """Per-user, per-layer state tensors -> one batched state per layer (``SequenceEncoder.stack_states``)."""
        return self.encoder.stack_states(users, device)

    def step(self, batch: SequenceBatch, states: list) -> tuple[Tensor, list]:
        """Continue B users' states by the events of ``batch`` (built like a training batch; ``positions``
        are absolute, so each user's first new event says how many it had). Every user needs >= 1 event.

        Returns ``(user vectors [B, dim] after each user's newest event, the new states)``; equal to
        ``user_vectors`` over the whole histories."""
        if batch.batch_size == 1:  # one user (a serving request): its first and newest rows, no index tensors
            if not batch.positions.numel():
                raise ValueError("step needs at least one new event per user")
            first, last = slice(0, 1), slice(-1, None)
        else:
            lengths = batch.offsets[1:] - batch.offsets[:-1]
            if bool((lengths == 0).any()):
                raise ValueError("step needs at least one new event per user")
            first, last = batch.offsets[:-1], batch.offsets[1:] - 1
        tokens, time_part = self.embedding(batch.features)
        out, states = self.encoder.step(tokens, batch.offsets, batch.positions[first], time_part, states)
        return out[last], states

    def loss(self, batch: SequenceBatch) -> Tensor:
        """Next-item loss at every event that has a target."""
        # Sharded item table: the candidates join the history lookup (one fused update per step), drawn from
        # the generator that prefetch returns.
        generator = self.sharded_items.prefetch(batch) if self.sharded_items is not None else None
        summaries: list[Tensor] | None = [] if self.loss_cfg.summary_reconstruction > 0 else None
        hidden = self.encode(batch, summaries)
        # The rows once (one host read, a CUDA sync), then both gathers: a boolean mask per gather reads twice.
        rows = torch.nonzero(batch.targets >= RESERVED_IDS).squeeze(1)
        hidden, targets = hidden[rows], batch.targets[rows]
        if self.loss_cfg.kind == "ce":
            loss = full_cross_entropy(*self.head(hidden), targets, self.loss_cfg.temperature,
                                      self.loss_cfg.label_smoothing, self.loss_cfg.backend)
        else:
            loss = sampled_softmax(self.head_queries(hidden), targets, self.head_item_embeddings,
                                   self.data_spec.num_items, self.loss_cfg, self.item_prob, generator)
        if summaries:
            loss = loss + self.loss_cfg.summary_reconstruction * self.summary_reconstruction_loss(batch, summaries)
        return loss

    def summary_reconstruction_loss(self, batch: SequenceBatch, summaries: list[Tensor]) -> Tensor:
        """Mean over layers of: each summary state ``[Ts, dim]``, through the final norm and the tied
        item head, scored against every item of its chunk slice (``k // S`` events; softmax CE). This gives
        summaries a reason to hold *which* items a chunk had, the content a later lookup must find."""
        if self.sharded_items is not None:
            raise ValueError("loss.summary_reconstruction needs the whole item table on every process (not sharded)")
        cfg = self.encoder_cfg
        user, chunk, slot = summary_index(batch.offsets, cfg.chunk_size, cfg.summary_tokens)
        width = cfg.chunk_size // cfg.summary_tokens
        rows = (batch.offsets[user] + chunk * cfg.chunk_size + slot * width)[:, None] + torch.arange(
            width, device=user.device)  # [Ts, k // S]
        items = batch.features[ITEM].values()[rows]
        keep = items >= RESERVED_IDS  # PAD / OOV are never targets
        owner = torch.arange(rows.shape[0], device=rows.device)[:, None].expand_as(rows)[keep]
        if owner.numel() == 0:  # no complete chunk in the batch: nothing to reconstruct
            return summaries[0].sum() * 0.0
        losses = [full_cross_entropy(*self.head(self.encoder.final_norm(states)[owner]), items[keep],
                                     self.loss_cfg.temperature, backend=self.loss_cfg.backend) for states in summaries]
        return torch.stack(losses).mean()

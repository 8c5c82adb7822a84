"""The streaming update: a micro-batch of raw events + the touched users' states -> new states and fresh
top-K recommendations. Plain torch; the Lightning predict loop drives it (``ksa_rec.serving.jobs``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import polars as pl
import torch

from ksa_rec.data.batch import SequenceBatch
from ksa_rec.data.schema import ITEM, RESERVED_IDS, ROW, TIME, USER, LogSchema, time_gap_bucket
from ksa_rec.models.ranking import topk_items
from ksa_rec.serving.admission import Admitted, time_gaps
from ksa_rec.serving.artifact import ServingModel
from ksa_rec.serving.state import UserState
from ksa_rec.utils.jagged import lengths_to_offsets


@dataclass
class Recommendations:
    """Top-K per touched user: raw ids in input order of first appearance in the micro-batch."""

    user_ids: list[str]
    event_counts: list[int]
    last_rows: list[int]
    item_ids: list[list[str]]
    scores: list[list[float]]

    def records(self) -> list[dict]:
        return [{"user_id": u, "event_count": n, "row": r, "item_ids": i, "scores": s}
                for u, n, r, i, s in zip(self.user_ids, self.event_counts, self.last_rows, self.item_ids, self.scores)]


STEPS = ("jagged", "graphed", "fixed")
"""``--step``: how a micro-batch is stepped. ``jagged``: ``SequenceEncoder.step`` (any events per user, every kind).
``graphed``: micro-batches of one event per user replayed from CUDA graphs in fixed-capacity buffers
(``ksa_rec.serving.fixed_steps``; others take the jagged step); ``fixed``: the same without the graph (any device:
how the CPU tests check the conversion)."""

STATE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
"""``--state-dtype``: how stored states keep their float tensors. fp32 keeps the model's own dtype
(None); bf16 halves their bytes, and they are computed with in the model's dtype again when read."""


class StreamEngine:
    def __init__(self, serving: ServingModel, top_k: int = 10, exclude_seen: bool = True, item_chunk: int = 65536,
                 state_dtype: str = "fp32", step: str = "jagged"):
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {', '.join(STATE_DTYPES)}, got {state_dtype!r}")
        if step not in STEPS:
            raise ValueError(f"step must be one of {', '.join(STEPS)}, got {step!r}")
        self.serving, self.top_k, self.exclude_seen, self.item_chunk = serving, top_k, exclude_seen, item_chunk
        self.state_dtype = STATE_DTYPES[state_dtype]
        self.model = serving.model
        self.schema = LogSchema(features=tuple(sorted(serving.features)))
        self.num_gap_buckets = self.model.encoder_cfg.time_gap_buckets
        self._empty: UserState | None = None
        self.fixed_steps = None
        if step != "jagged":
            from ksa_rec.serving.fixed_steps import FixedSteps

            self.fixed_steps = FixedSteps(self.model, serving.device, graphed=step == "graphed")

    @cached_property
    def _head_items(self) -> torch.Tensor:
        """The model's head item matrix, made once: serving never changes the weights, and a cosine head would
        otherwise renormalise the whole catalogue at every micro-batch."""
        with torch.inference_mode():
            return self.model.head_items()

    def decode_states(self, user_ids: list[str], blobs: dict[str, bytes]) -> list[UserState]:
        """States of ``user_ids`` (a new user starts empty: one shared state, never changed in place)."""
        states = []
        for user in user_ids:
            if user in blobs:
                state = UserState.from_bytes(blobs[user], self.serving.model_id, user)
                states.append(state.cast(self.model.item_weight.dtype))
            else:
                states.append(self._empty_state())
        return states

    def _empty_state(self) -> UserState:
        # Built once: the step reads old states (stack_states copies them) and builds new ones.
        if self._empty is None:
            self._empty = UserState.empty(self.model.empty_states(1), self.model.encoder_cfg.dim,
                                          self.model.item_weight.dtype)
        return self._empty

    def encode_state(self, state: UserState) -> bytes:
        """A state's blob, float tensors in the store's dtype (``state_dtype``)."""
        stored = state if self.state_dtype is None else state.cast(self.state_dtype)
        return stored.to_bytes(self.serving.model_id)

    def apply(self, admitted: list[Admitted], states: dict[str, UserState]) -> tuple[dict[str, bytes], Recommendations]:
        """One step over the admitted events of a micro-batch (``admitted``: one part per admission, their
        users disjoint, each in input order): the new states' blobs, with their replay windows, and the
        touched users' top-K. What ``stream`` and ``serve`` commit."""
        frames = [part.frame for part in admitted]
        frame = frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")
        new_states, recs = self.update(frame, states)
        for part in admitted:
            part.stamp(new_states)
        return {user: self.encode_state(state) for user, state in new_states.items()}, recs

    @torch.inference_mode()
    def update(self, frame: pl.DataFrame, states: dict[str, UserState]) -> tuple[dict[str, UserState], Recommendations]:
        """Apply one micro-batch. ``states`` holds every user of ``frame``; returns their new states and
        their fresh recommendations. ``frame`` holds admitted events only (``serving.admission``: replays, late
        and malformed events were sorted out before)."""
        users, order, lengths = _group_by_user(frame)
        # Already grouped (one event per user, say): no gather, which costs more than the rest on a tiny frame.
        ordered = frame if bool((np.diff(order) > 0).all()) else frame[order]
        items = self.serving.items.encode(ordered[ITEM])
        timestamps = ordered[TIME].to_numpy()
        rows = ordered[ROW].to_numpy()
        old = [states[u] for u in users]
        gaps = time_gaps(old, lengths, timestamps)
        device = self.serving.device
        # On the host nothing moves: no .to() walk over the batch's and the states' tensors.
        on_host = device.type == "cpu"
        batch = self._batch(ordered, items, gaps, lengths, old)
        if not on_host:
            batch = batch.to(device)
        if self.fixed_steps is not None and bool((lengths == 1).all()):
            tokens, time_part = self.model.embedding(batch.features)
            vectors, layers = self.fixed_steps(tokens, time_part, [s.layers for s in old],
                                               [s.event_count for s in old])
        else:
            stacked = self.model.stack_states([s.layers for s in old], None if on_host else device)
            vectors, states_out = self.model.step(batch, stacked)
            caches = states_out if on_host else [state.to("cpu") for state in states_out]
            layers = [[cache.user(b) for cache in caches] for b in range(len(users))]
        ends = np.cumsum(lengths)
        new_states = {}
        for b, user in enumerate(users):
            segment = items[ends[b] - lengths[b]:ends[b]]
            seen = torch.from_numpy(np.union1d(old[b].seen.numpy(), segment[segment >= RESERVED_IDS]))
            new_states[user] = UserState(
                event_count=old[b].event_count + int(lengths[b]), last_timestamp=int(timestamps[ends[b] - 1]),
                last_item=int(items[ends[b] - 1]), vector=vectors[b].cpu(), seen=seen, layers=layers[b])
        recs = self.recommend(users, [new_states[u] for u in users], [int(rows[e - 1]) for e in ends])
        return new_states, recs

    @torch.inference_mode()
    def recommend(self, users: list[str], states: list[UserState], last_rows: list[int],
                  top_k: int | None = None) -> Recommendations:
        """Top-K (``top_k``, default the engine's) of each user from its state."""
        device = self.serving.device
        vectors = torch.stack([s.vector for s in states]).to(device)
        exclude_values = exclude_offsets = None
        if self.exclude_seen:
            exclude_values = torch.cat([s.seen for s in states]).to(device)
            exclude_offsets = lengths_to_offsets(torch.tensor([s.seen.numel() for s in states])).to(device)
        scores, ids = topk_items(self.model.head_queries(vectors), self._head_items, top_k or self.top_k,
                                 exclude_values, exclude_offsets, self.item_chunk)
        raw = self.serving.items.raw_ids
        ids_list = ids.cpu().tolist()
        return Recommendations(users, [s.event_count for s in states], last_rows,
                               [[raw[i - RESERVED_IDS] for i in row if i >= RESERVED_IDS] for row in ids_list],
                               [[round(float(x), 6) for x, i in zip(srow, irow) if i >= RESERVED_IDS]
                                for srow, irow in zip(scores.cpu().tolist(), ids_list)])

    def _batch(self, ordered: pl.DataFrame, items: np.ndarray, gaps: np.ndarray, lengths: np.ndarray,
               old: list[UserState]) -> SequenceBatch:
        """The micro-batch's events as the model's batch (the training collator's builder), positions
        continuing each user's state."""
        first = np.repeat(np.array([s.event_count for s in old], dtype=np.int64), lengths)
        positions = first + np.arange(len(items)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        features = {name: vocab.encode(ordered[name]) for name, vocab in self.serving.features.items()}
        time_gaps = (time_gap_bucket(torch.from_numpy(gaps), self.num_gap_buckets).numpy()
                     if self.num_gap_buckets else None)
        return SequenceBatch.of_events(lengths, positions, np.arange(len(old)), items, features, time_gaps)


def _group_by_user(frame: pl.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Users in order of first appearance, the row order that groups each user's events (input order
    kept within a user), and events per user."""
    if frame.height <= _FEW:  # a serving micro-batch: a dict beats polars' per-call cost
        first: dict[str, int] = {}
        index = np.fromiter((first.setdefault(u, len(first)) for u in frame[USER].to_list()), dtype=np.int64,
                            count=frame.height)
        users = list(first)
    else:
        unique = frame[USER].unique(maintain_order=True)
        index = frame[USER].replace_strict(unique, pl.int_range(len(unique), eager=True),
                                           return_dtype=pl.Int64).to_numpy()
        users = unique.to_list()
    order = np.argsort(index, kind="stable")
    return users, order, np.bincount(index, minlength=len(users)).astype(np.int64)


_FEW = 1024


__all__ = ["STEPS", "Recommendations", "StreamEngine"]

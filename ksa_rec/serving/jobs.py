"""``ksa-rec stream`` and ``ksa-rec score`` as Lightning predict loops.

Both run ``Trainer.predict``: a DataLoader yields work (event micro-batches, or batches of users), the
LightningModule's ``predict_step`` computes, and a ``BasePredictionWriter`` persists each batch as it
completes. For ``stream`` the step first admits the micro-batch's events (``serving.admission``: replays
of applied events are skipped by identity), the writer appends the recommendations to the sink and then
commits the new states (with their replay windows) and the sink's length in one store transaction. A
restarted run reads the input from row 1: committed micro-batches are all replays and write nothing, the
sink is cut back to the committed length at the first write, so a run killed at any point (even
``kill -9``) ends, once restarted, with exactly the states and outputs of an uninterrupted one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import BasePredictionWriter, TQDMProgressBar
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ksa_rec.data.batch import SequenceBatch
from ksa_rec.data.etl import InteractionData, build_interactions
from ksa_rec.data.readers import read_interactions
from ksa_rec.data.schema import USER
from ksa_rec.data.sequences import Collator
from ksa_rec.errors import StateError
from ksa_rec.serving.admission import Admission, AdmissionConfig, StreamCounts
from ksa_rec.serving.engine import Recommendations, StreamEngine
from ksa_rec.serving.events import EventChunk, RejectRows, iter_event_chunks
from ksa_rec.serving.faults import crash_point
from ksa_rec.serving.sinks import OutputError, Sink, open_sink, position_key
from ksa_rec.serving.state import UserState
from ksa_rec.serving.store import StateStore

MODEL_KEY = "model_id"


@dataclass
class StreamResult:
    states: dict[str, bytes]
    """New blobs of the users with applied events (empty: nothing to write or commit)."""
    recommendations: Recommendations | None
    events: int
    """Events read in the micro-batch (applied or not)."""


class ServingModule(pl.LightningModule):
    """Wraps the plain model for ``Trainer.predict``; ``predict_step`` dispatches on the batch type."""

    def __init__(self, engine: StreamEngine, store: StateStore | None = None, admission: Admission | None = None):
        super().__init__()
        self.engine, self.store, self.admission = engine, store, admission
        self.model = engine.model

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # Event micro-batches stay on the host (ids are strings); the engine moves what it computes on.
        return batch.to(device) if isinstance(batch, SequenceBatch) else batch

    def predict_step(self, batch, batch_idx):
        if isinstance(batch, EventChunk):
            return self._stream(batch)
        return self._score(batch)

    def _stream(self, chunk: EventChunk) -> StreamResult:
        users = chunk.frame[USER].unique(maintain_order=True).to_list()
        # Claimed until the writer commits (a shared store: no other worker changes these users meanwhile).
        self.store.claim(users)
        try:
            states = dict(zip(users, self.engine.decode_states(users, self.store.get_many(users))))
            admitted = self.admission.admit(chunk.frame, states, chunk.source)
            if admitted.frame.height == 0:
                self.store.release()
                return StreamResult({}, None, chunk.frame.height)
            blobs, recs = self.engine.apply([admitted], states)
        except BaseException:
            self.store.release()
            raise
        return StreamResult(blobs, recs, chunk.frame.height)

    def _score(self, batch: "ScoreBatch") -> Recommendations:
        if batch.sequences is not None:
            seq = batch.sequences
            vectors = self.model.encode(seq)[seq.eval_rows]
            states = [UserState(int(n), 0, 0, v, seen, []) for n, v, seen in
                      zip(batch.event_counts, vectors, seq.seen_values.split(_lengths(seq.seen_offsets)))]
        else:
            states = batch.states
        return self.engine.recommend(batch.user_ids, states, batch.last_rows)


def _lengths(offsets: torch.Tensor) -> list[int]:
    return (offsets[1:] - offsets[:-1]).tolist()


# ---- stream -------------------------------------------------------------------------------------------------
class EventChunks(IterableDataset):
    """Micro-batches of the whole input (from row 1: replays are recognised by identity)."""

    def __init__(self, path: str, engine: StreamEngine, chunk_rows: int, reject: RejectRows):
        self.path, self.engine, self.chunk_rows, self.reject = path, engine, chunk_rows, reject

    def __iter__(self):
        return iter_event_chunks(self.path, self.engine.schema, self.chunk_rows, self.reject)


class StreamCommitWriter(BasePredictionWriter):
    """Sink first, then one store transaction with the states and the sink length. A micro-batch with no
    applied event (all replays, say) writes and commits nothing."""

    def __init__(self, store: StateStore, sink: Sink, model_id: str):
        super().__init__(write_interval="batch")
        self.store, self.sink, self.model_id = store, sink, model_id

    def write_on_batch_end(self, trainer, pl_module, prediction: StreamResult, batch_indices, batch, batch_idx,
                           dataloader_idx):
        if not prediction.states:
            return
        crash_point("before-output")
        sink_position = self.sink.write(prediction.recommendations.records())
        crash_point("after-output")
        self.store.commit(prediction.states, {self.sink.position_key: sink_position, MODEL_KEY: self.model_id})
        crash_point("after-commit")


# ---- score --------------------------------------------------------------------------------------------------
@dataclass
class ScoreBatch:
    user_ids: list[str]
    event_counts: list[int]
    last_rows: list[int]
    sequences: SequenceBatch | None = None
    states: list[UserState] | None = None

    def to(self, device) -> "ScoreBatch":
        if self.sequences is not None:
            self.sequences = self.sequences.to(device)
        return self


class HistoryUsers(Dataset):
    """One sample per user: the whole history (``max_len`` None) or its newest chunk-aligned part."""

    def __init__(self, data: InteractionData, max_len: int | None, chunk_size: int):
        from ksa_rec.data.truncation import chunk_aligned_start

        self.data = data
        self.lengths = data.lengths()
        self.users = np.flatnonzero(self.lengths > 0)
        end = self.lengths[self.users]
        self.start = np.zeros_like(end) if max_len is None else chunk_aligned_start(end, max_len, chunk_size)

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, i):
        user = int(self.users[i])
        end = int(self.lengths[user])
        return user, int(self.start[i]), end, np.array([end], dtype=np.int64)


class HistoryCollator:
    """Histories -> ``ScoreBatch``: the evaluation collation with one virtual target after the last event
    (whose state is the user vector; all history items are the seen set)."""

    def __init__(self, data: InteractionData, time_gap_buckets: int):
        self.data, self.collate = data, Collator(data, time_gap_buckets, train=False, predict=True)

    def __call__(self, samples) -> ScoreBatch:
        seq = self.collate(samples)
        users = [s[0] for s in samples]
        return ScoreBatch(user_ids=self.data.users.decode(np.array(users) + 2),
                          event_counts=[s[2] for s in samples], last_rows=[0] * len(samples), sequences=seq)


class StoredUsers(IterableDataset):
    """Batches of users straight from a state store (their last representation and seen set)."""

    def __init__(self, store: StateStore, model_id: str, batch_size: int):
        self.store, self.model_id, self.batch_size = store, model_id, batch_size

    def __iter__(self):
        # Several processes: each takes every world-th batch (Lightning shards only map-style datasets).
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        for i, rows in enumerate(self.store.scan(self.batch_size)):
            if i % world != rank:
                continue
            states = [UserState.from_bytes(blob, self.model_id, user) for user, blob in rows]
            yield ScoreBatch([u for u, _ in rows], [s.event_count for s in states], [0] * len(rows), states=states)


@dataclass
class ScoreSummary:
    """What rank 0 reports of a ``score`` run: users written, seconds spent reading and preparing the
    events (or opening the store) in this process, and seconds from the start of the predict loop to the
    merged output (every process scoring its share, then the merge)."""

    users: int
    prepare_s: float
    score_s: float
    processes: int


class ParquetScoreWriter(BasePredictionWriter):
    """Appends each batch's top-K to a temporary file and renames it to ``output`` at the end, so a failed
    run never leaves a half-written result. With several processes each rank writes its own part, and
    rank 0 streams the parts into ``output`` (row group by row group: memory stays bounded)."""

    SCHEMA = pa.schema([("user_id", pa.string()), ("event_count", pa.int64()),
                        ("item_ids", pa.list_(pa.string())), ("scores", pa.list_(pa.float32()))])

    def __init__(self, output: Path, overwrite: bool = False):
        super().__init__(write_interval="batch")
        if output.is_dir():
            raise OutputError(f"{output}: is a directory; score writes one parquet file")
        if output.exists() and not overwrite:
            raise OutputError(f"{output}: exists; pass --overwrite to replace it, or choose another --output")
        self.output = output
        self.writer: pq.ParquetWriter | None = None
        self.started: float | None = None
        self.rows: int | None = None  # rows in ``output``, on rank 0 once the run is done
        self.seconds: float | None = None

    def on_predict_start(self, trainer, pl_module):
        # Every process has joined the process group by now, each after reading the events itself.
        self.started = time.perf_counter()

    def part(self, rank: int, world: int) -> Path:
        suffix = ".tmp" if world == 1 else f".rank{rank}-of-{world}.tmp"
        return self.output.with_name(self.output.name + suffix)

    def write_on_batch_end(self, trainer, pl_module, prediction: Recommendations, batch_indices, batch, batch_idx,
                           dataloader_idx):
        self._open(trainer)
        self.writer.write_table(pa.table({"user_id": prediction.user_ids, "event_count": prediction.event_counts,
                                          "item_ids": prediction.item_ids, "scores": prediction.scores},
                                         schema=self.SCHEMA))

    def on_predict_end(self, trainer, pl_module):
        self._open(trainer)
        self.writer.close()
        world = trainer.world_size
        trainer.strategy.barrier()
        if trainer.global_rank == 0:
            if world > 1:
                self._merge([self.part(r, world) for r in range(world)], self.part(0, 1))
            self.rows = pq.ParquetFile(self.part(0, 1)).metadata.num_rows
            os.replace(self.part(0, 1), self.output)
            self.seconds = time.perf_counter() - self.started
        trainer.strategy.barrier()

    def on_exception(self, trainer, pl_module, exception):
        # A failed run leaves no part behind (the output itself is only ever replaced whole).
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for part in (self.part(trainer.global_rank, trainer.world_size), self.part(0, 1)):
            part.unlink(missing_ok=True)

    def _open(self, trainer) -> None:
        if self.writer is None:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.part(trainer.global_rank, trainer.world_size), self.SCHEMA)

    def _merge(self, parts: list[Path], target: Path) -> None:
        with pq.ParquetWriter(target, self.SCHEMA) as writer:
            for part in parts:
                for batch in pq.ParquetFile(part).iter_batches():
                    writer.write_batch(batch)
        for part in parts:
            part.unlink()


# ---- progress -----------------------------------------------------------------------------------------------
class ThroughputBar(TQDMProgressBar):
    """Lightning's progress bar plus events/s (stream) or users/s (score)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit, self.count, self.started = unit, 0, None

    def on_predict_start(self, trainer, pl_module):
        super().on_predict_start(trainer, pl_module)
        self.started = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self.count += outputs.events if isinstance(outputs, StreamResult) else len(outputs.user_ids)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.predict_progress_bar.set_postfix({f"{self.unit}/s": f"{self.count / elapsed:,.0f}",
                                               self.unit: self.count})


def predictor(callbacks, accelerator: str, devices: int = 1) -> pl.Trainer:
    return pl.Trainer(accelerator=accelerator, devices=devices, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, callbacks=callbacks, inference_mode=True)


# ---- entry points -------------------------------------------------------------------------------------------
def check_model(store: StateStore, model_id: str) -> dict[str, str]:
    """The store's bookkeeping, after checking that its states were built by ``model_id`` (a new store
    passes)."""
    meta = store.meta()
    if meta.get(MODEL_KEY, model_id) != model_id:
        raise StateError(f"the state store was built by model {meta[MODEL_KEY]}, not by this checkpoint "
                         f"({model_id}); use that checkpoint or a new store")
    return meta


def run_stream(engine: StreamEngine, store: StateStore, events: str, output: Path, chunk_rows: int,
               admission: AdmissionConfig = AdmissionConfig(), overwrite: bool = False,
               accelerator: str = "auto") -> StreamCounts:
    """Apply ``events`` to the store's states, recommendations to ``output``; returns what was done."""
    meta = check_model(store, engine.serving.model_id)
    sink = open_sink(output, meta.get(position_key(output)), overwrite)
    gate = Admission(admission, engine.serving.items, engine.serving.features)
    module = ServingModule(engine, store, gate)
    loader = DataLoader(EventChunks(events, engine, chunk_rows, gate.reject_malformed), batch_size=None)
    writer = StreamCommitWriter(store, sink, engine.serving.model_id)
    predictor([writer, ThroughputBar("events")], accelerator).predict(module, loader, return_predictions=False)
    return gate.counts


def run_score(engine: StreamEngine, output: Path, *, events: str | None = None, store: StateStore | None = None,
              batch_size: int = 256, max_len: int | None = None, accelerator: str = "auto",
              devices: int = 1, overwrite: bool = False) -> ScoreSummary | None:
    """Top-K of every user to ``output`` (an existing one only with ``overwrite``). ``devices`` > 1: that
    many processes (Lightning's DDP), users split between them, each rank's results written to its own
    part and merged by rank 0.

    Every process reads and prepares the whole event file before it takes its share of the users, so
    that part neither shrinks with more processes nor shares its memory. Returns the timings on rank 0
    (None on the others)."""
    started = time.perf_counter()
    writer = ParquetScoreWriter(output, overwrite)
    model = engine.model
    if events is not None:
        frame = read_interactions(events, schema=engine.schema)
        data = build_interactions(frame, schema=engine.schema, on_duplicate="keep", file=events,
                                  items=engine.serving.items, features=engine.serving.features)
        dataset = HistoryUsers(data, max_len, model.encoder_cfg.chunk_size)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=HistoryCollator(
            data, model.encoder_cfg.time_gap_buckets))
    else:
        loader = DataLoader(StoredUsers(store, engine.serving.model_id, batch_size), batch_size=None)
    prepare_s = time.perf_counter() - started
    trainer = predictor([writer, ThroughputBar("users")], accelerator, devices)
    trainer.predict(ServingModule(engine), loader, return_predictions=False)
    if writer.rows is None:
        return None
    return ScoreSummary(users=writer.rows, prepare_s=prepare_s, score_s=writer.seconds, processes=trainer.world_size)

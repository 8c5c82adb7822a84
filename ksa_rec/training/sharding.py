"""Model-parallel training: TorchRec shards the embedding tables, DDP replicates the encoder, Lightning drives.

Lightning has no TorchRec integration upstream; this one is built from the existing engine, not a new one:
torch.distributed, TorchRec's planner (``EmbeddingShardingPlanner.collective_plan``), its
``EmbeddingCollectionSharder`` and ``DistributedModelParallel`` (DMP).

- :class:`TorchRecStrategy` (a Lightning ``DDPStrategy``) plans a sharding for every table of the
  ``EmbeddingCollection`` (row-, table- or column-wise; chosen by the planner or forced per table), wraps
  the LightningModule in DMP (the collection is sharded in place, the rest goes under DDP, which DMP sets
  up so that it skips the sharded parameters), and writes checkpoints as torch.distributed.checkpoint
  directories (:mod:`ksa_rec.training.sharded_checkpoint`).
- The tables get a *fused* optimizer: FBGEMM's table-batched embedding kernels apply it inside the
  backward, configured by ``fused_params`` on the sharder (:class:`EmbeddingOptimConfig`). The dense
  parameters keep the LightningModule's AdamW; the strategy removes the table parameters from it.
- :class:`ShardedItems` is what :class:`~ksa_rec.models.seqrec.SeqRecModel` sees of a sharded item table
  (its ``sharded_items`` hook): sampled-softmax candidates are looked up in the same collection call as
  the history, and full-catalogue ranks are counted by each process over the rows it holds, then summed.

Why a Strategy and not ``LightningModule.configure_model``: DMP must be the module Lightning's forward
goes through (its DDP wrapper has to see the forward), the optimizer set-up must know which parameters
the fused optimizer owns, and a sharded checkpoint needs its own save and load; in Lightning 2.6 only a
Strategy controls model wrapping, optimizer set-up and checkpoint I/O together.

Only the sampled-softmax loss works with a sharded item table: the full softmax needs every item's
embedding on every process at every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from lightning_fabric.utilities.distributed import group as _group
from lightning_fabric.utilities.optimizer import _optimizers_to_device
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import JaggedTensor, KeyedJaggedTensor
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import Awaitable, ShardedModule, ShardingEnv

from ksa_rec.data.batch import SequenceBatch
from ksa_rec.data.schema import ITEM, RESERVED_IDS
from ksa_rec.errors import CheckpointError
from ksa_rec.models.ranking import Exclusions, RankCounter, mask_chunk
from ksa_rec.models.seqrec import SeqRecModel
from ksa_rec.modules.losses import LossConfig, sampled_softmax
from ksa_rec.training.sharded_checkpoint import (
    META_FILE,
    SHARED_FILESYSTEM_HINT,
    load_sharded_checkpoint,
    ranks_missing,
    require_shared_directory,
    save_sharded_checkpoint,
)
from ksa_rec.utils.config import coerce
from ksa_rec.utils.jagged import lengths_to_offsets

SHARDING_TYPES = ("row_wise", "table_wise", "column_wise", "table_row_wise", "table_column_wise")
"""What the planner may pick (data_parallel is left out: a replicated table would need the dense optimizer)."""
COMPUTE_KERNELS = ("fused", "fused_uvm", "fused_uvm_caching")
"""Kernels with the optimizer fused into the backward; the UVM ones keep rows in host memory (GPU only)."""
FUSED_OPTIMIZERS = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,
    "partial_rowwise_adam": EmbOptimType.PARTIAL_ROWWISE_ADAM,
    "lamb": EmbOptimType.LAMB,
}
CPU_FUSED_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")
"""FBGEMM's CPU kernels implement only these (the others need CUDA)."""


@dataclass
class EmbeddingOptimConfig:
    """The fused optimizer of the embedding tables (constant learning rate: the LightningModule's schedule
    drives the dense AdamW only)."""

    kind: str = "rowwise_adagrad"
    """One of FUSED_OPTIMIZERS: sgd, adagrad, rowwise_adagrad (CPU and GPU); adam, partial_rowwise_adam,
    lamb (GPU only)."""
    lr: float = 0.01
    """Learning rate of the tables (constant)."""
    eps: float = 1e-8
    """Added to the denominator of the adaptive optimizers, for stability."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/LAMB moments."""

    def __post_init__(self) -> None:
        if self.kind not in FUSED_OPTIMIZERS:
            raise ValueError(f"embedding_optimizer.kind: must be one of {', '.join(FUSED_OPTIMIZERS)}, "
                             f"got {self.kind!r}")
        if self.lr <= 0 or self.eps <= 0:
            raise ValueError("embedding_optimizer: lr and eps must be > 0")

    def fused_params(self, device: torch.device) -> dict[str, Any]:
        """``fused_params`` for TorchRec's sharder (passed on to FBGEMM's table-batched embedding ops)."""
        if device.type == "cpu" and self.kind not in CPU_FUSED_OPTIMIZERS:
            raise ValueError(f"embedding_optimizer.kind {self.kind!r} needs CUDA; on CPU use one of "
                             f"{', '.join(CPU_FUSED_OPTIMIZERS)}")
        return {"optimizer": FUSED_OPTIMIZERS[self.kind], "learning_rate": self.lr, "eps": self.eps,
                "beta1": self.betas[0], "beta2": self.betas[1]}


@dataclass
class ShardingConfig:
    """How the tables are sharded and trained."""

    sharding_types: dict[str, str] = field(default_factory=dict)
    """Table name (``item_id``, a side feature, ``time_gap``) -> forced sharding type; tables not listed
    get the planner's choice among SHARDING_TYPES."""
    compute_kernel: str = "fused"
    """One of COMPUTE_KERNELS: fused (tables in device memory), fused_uvm / fused_uvm_caching (GPU only)."""
    embedding_optimizer: EmbeddingOptimConfig = field(default_factory=EmbeddingOptimConfig)
    """The tables' fused optimizer."""
    min_column_shard: int | None = None
    """Narrowest column-wise shard (TorchRec's ``min_partition``; None keeps its default, 128 columns)."""

    def __post_init__(self) -> None:
        self.embedding_optimizer = coerce(EmbeddingOptimConfig, self.embedding_optimizer)
        for table, kind in self.sharding_types.items():
            if kind not in SHARDING_TYPES:
                raise ValueError(f"sharding_types[{table!r}]: must be one of {', '.join(SHARDING_TYPES)}, "
                                 f"got {kind!r}")
        if self.min_column_shard is not None and self.min_column_shard < 1:
            raise ValueError(f"min_column_shard: must be >= 1, got {self.min_column_shard}")
        if self.compute_kernel not in COMPUTE_KERNELS:
            raise ValueError(f"compute_kernel: must be one of {', '.join(COMPUTE_KERNELS)}, "
                             f"got {self.compute_kernel!r}")


def require_shardable_loss(loss: LossConfig) -> None:
    if loss.kind != "sampled":
        raise ValueError(f"loss.kind: {loss.kind!r} needs the whole item table on every process; training with "
                         "sharded tables needs loss.kind: sampled")
    if loss.similarity != "dot":
        # A column-wise shard holds part of each row, so a row's length is not known where its score is made.
        raise ValueError(f"loss.similarity: {loss.similarity!r} is not supported with sharded item tables; use dot")


def shard_model(module: nn.Module, config: ShardingConfig, device: torch.device,
                group: dist.ProcessGroup | None = None, local_world_size: int | None = None,
                find_unused_parameters: bool = False) -> DistributedModelParallel:
    """Shard the embedding tables of the one :class:`SeqRecModel` inside ``module`` (in place) and wrap
    ``module`` in DMP; call ``init_data_parallel()`` on the result to put the dense part under DDP.

    Collective: every process of ``group`` (default: the world) calls it with the same arguments. The
    shards start from the module's current table weights, so processes that built the model with the
    same seed start exactly where a single-process run would.
    """
    models = [m for m in module.modules() if isinstance(m, SeqRecModel)]
    if len(models) != 1:
        raise ValueError(f"shard_model: expected one SeqRecModel inside the module, found {len(models)}")
    model = models[0]
    require_shardable_loss(model.loss_cfg)
    unknown = set(config.sharding_types) - set(model.embedding.keys)
    if unknown:
        raise ValueError(f"sharding_types: unknown tables {sorted(unknown)}; the model has {model.embedding.keys}")
    group = group or dist.GroupMember.WORLD
    env = ShardingEnv.from_process_group(group)
    sharder = EmbeddingCollectionSharder(fused_params=config.embedding_optimizer.fused_params(device))
    hbm = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=env.world_size, local_world_size=local_world_size or env.world_size,
                      hbm_cap_bytes=hbm),
        kernel_config=KernelConfig(compute_device=device.type))
    constraints = {
        table: ParameterConstraints(sharding_types=[config.sharding_types[table]] if table in config.sharding_types
                                    else list(SHARDING_TYPES), compute_kernels=[config.compute_kernel],
                                    min_partition=config.min_column_shard)
        for table in model.embedding.keys}
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(
        module, [sharder], group)
    dmp = DistributedModelParallel(
        module, env=env, device=device, plan=plan, sharders=[sharder], init_data_parallel=False,
        data_parallel_wrapper=DefaultDataParallelWrapper(find_unused_parameters=find_unused_parameters))
    model.sharded_items = ShardedItems(model, group)
    return dmp


def negatives_generator(device: torch.device) -> torch.Generator:
    """A generator for the sampled-softmax negatives of one step, seeded from the global RNG (so runs stay
    reproducible under ``seed_everything``) and independent of what the encoder's dropout consumes."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(torch.randint(0, 2**62, (1,))))
    return generator


def sharded_parameter_ids(module: nn.Module) -> set[int]:
    """``id()`` of every parameter that TorchRec shards (and whose optimizer is fused into the backward)."""
    return {id(p) for m in module.modules() if isinstance(m, ShardedModule) for p in m.parameters()}


class ShardedItems:
    """A sharded item table as :class:`SeqRecModel` sees it (``model.sharded_items``).

    Training: ``prefetch(batch)`` before ``encode`` makes the history lookup also fetch every candidate
    that ``sampled_softmax`` will ask ``lookup`` for. A fused optimizer applies one update per table per
    lookup call, in the backward; a second call for the candidates would apply two updates per step (a
    different optimizer, e.g. Adagrad's accumulator grows twice). With one call the kernel sums the
    gradients of repeated rows and updates each row once, like an unsharded table under a normal optimizer.

    Evaluation: ``target_ranks`` counts, on each process, the items of its own rows that score at least
    as high as the target, for the targets of every process; the counts add up over the shards.
    """

    def __init__(self, model: SeqRecModel, group: dist.ProcessGroup):
        self.model, self.group = model, group
        self.collection = model.embedding.collection
        self.keys = list(model.embedding.keys)
        self._pending: Tensor | None = None  # candidate ids for the next collection call (sorted, unique)
        self._in_flight: tuple[KeyedJaggedTensor, Tensor] | None = None  # (that call's own input, the ids)
        self._prefetched: tuple[Tensor, Tensor] | None = None  # (candidate ids, their embeddings)
        self.collection.register_forward_pre_hook(self._add_candidates)
        self.collection.register_forward_hook(self._split_candidates)

    # ---- training ------------------------------------------------------------------------------------
    def prefetch(self, batch: SequenceBatch) -> torch.Generator:
        """Make the next collection call (the one ``encode(batch)`` makes) also fetch this batch's candidates;
        returns the generator ``sampled_softmax`` must draw its negatives from."""
        targets = batch.targets[batch.targets >= RESERVED_IDS]
        generator = negatives_generator(targets.device)
        state = generator.get_state()
        self._prefetched = None
        self._pending = torch.unique(torch.cat([targets, self._drawn_candidates(targets, generator)]))
        generator.set_state(state)
        return generator

    def _drawn_candidates(self, targets: Tensor, generator: torch.Generator) -> Tensor:
        """The ids ``sampled_softmax`` asks for: a dry run on at most one target (its draw does not depend on the
        batch; ``lookup`` checks that)."""
        asked: list[Tensor] = []

        def record(ids: Tensor) -> Tensor:
            asked.append(ids)
            return torch.zeros(ids.numel(), 0, device=ids.device)

        model, first = self.model, targets[:1]
        with torch.no_grad():
            sampled_softmax(torch.zeros(first.numel(), 0, device=targets.device), first, record,
                            model.data_spec.num_items, model.loss_cfg, model.item_prob, generator)
        return asked[0]

    def _add_candidates(self, module: nn.Module, args: tuple) -> tuple | None:
        """Forward pre-hook: append the pending candidates as extra one-item samples to the KJT."""
        if self._pending is None:
            return None
        (features,) = args
        ids, self._pending = self._pending, None
        self._in_flight = (features, ids)
        values, lengths = [], []
        for key in features.keys():
            jagged = features[key]
            is_item = key == ITEM
            values += [jagged.values(), ids if is_item else ids[:0]]
            lengths += [jagged.lengths(), torch.full(ids.shape, int(is_item), dtype=jagged.lengths().dtype,
                                                     device=ids.device)]
        return (KeyedJaggedTensor.from_lengths_sync(features.keys(), torch.cat(values), torch.cat(lengths)),)

    def _split_candidates(self, module: nn.Module, args: tuple, output: Any) -> dict[str, JaggedTensor]:
        """Forward hook: a plain dict for ``EventEmbedding`` (the sharded collection returns a lazy awaitable,
        which has no ``in``); with candidates in flight, only the history part, the candidates' embeddings
        kept for ``lookup``."""
        looked_up = dict(output.wait() if isinstance(output, Awaitable) else output)
        if self._in_flight is None:
            return looked_up
        (history, ids), self._in_flight = self._in_flight, None
        out = {}
        for key in history.keys():
            jagged = history[key]
            out[key] = JaggedTensor(values=looked_up[key].values()[: jagged.values().numel()],
                                    lengths=jagged.lengths())
        self._prefetched = (ids, looked_up[ITEM].values()[history[ITEM].values().numel():])
        return out

    def lookup(self, ids: Tensor) -> Tensor:
        """Embeddings ``[M, dim]`` of item ids ``[M]``: the prefetched rows inside a training step, else a
        lookup through the sharded collection (collective: every process calls it)."""
        if self._prefetched is None:
            return self._lookup_now(ids)
        known, rows = self._prefetched
        self._prefetched = None
        at = torch.searchsorted(known, ids).clamp_(max=max(known.numel() - 1, 0))
        if ids.numel() and (known.numel() == 0 or not torch.equal(known[at], ids)):
            raise RuntimeError("sampled_softmax asked for item ids that were not prefetched; ShardedItems assumes "
                               "its candidates are the batch targets plus a draw that does not depend on the batch")
        return rows[at]

    def _lookup_now(self, ids: Tensor) -> Tensor:
        lengths = [torch.full(ids.shape, int(key == ITEM), dtype=torch.int32, device=ids.device)
                   for key in self.keys]
        features = KeyedJaggedTensor.from_lengths_sync(self.keys, ids, torch.cat(lengths))
        return self.collection(features)[ITEM].values()

    # ---- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def target_ranks(self, vecs: Tensor, targets: Tensor, seen_values: Tensor | None,
                     seen_offsets: Tensor | None, item_chunk: int = 65536) -> Tensor:
        """The ranks of :func:`ksa_rec.models.ranking.target_ranks` (same exclusions and ties, a target among
        its row's exclusions :data:`~ksa_rec.models.ranking.UNRANKED`), computed over the sharded table.
        Collective.

        Args:
            vecs: ``[N, dim]`` states that rank ``targets [N]``; seen_values, seen_offsets: jagged items to
                exclude per row (``[M]``, ``[N+1]``), or None.
        Returns:
            int64 ``[N]``.
        """
        target_scores = (vecs * self.lookup(targets)).sum(-1, keepdim=True)
        if seen_values is None:
            seen_values = targets[:0]
            seen_offsets = torch.zeros(targets.numel() + 1, dtype=torch.int64, device=targets.device)
        # Every process scores its rows for the targets of all processes.
        all_vecs, sizes = _gather_rows(vecs, self.group)
        all_scores, _ = _gather_rows(target_scores, self.group)
        all_targets, _ = _gather_rows(targets, self.group)
        all_seen, _ = _gather_rows(seen_values, self.group)
        seen_lengths, _ = _gather_rows(seen_offsets[1:] - seen_offsets[:-1], self.group)
        exclusions = Exclusions.from_jagged(all_seen, lengths_to_offsets(seen_lengths), targets.device)
        counter = RankCounter(all_targets, all_scores, exclusions)
        self._count_above(all_vecs, counter, item_chunk)
        start = sum(sizes[: dist.get_rank(self.group)])
        return counter.ranks()[start: start + targets.numel()]

    def _count_above(self, vecs: Tensor, counter: RankCounter, item_chunk: int) -> None:
        """Feed ``counter`` the masked scores of every item of the table once, over all processes."""
        weight = self.collection.state_dict()[f"embeddings.{ITEM}.weight"]
        if not isinstance(weight, ShardedTensor):
            raise TypeError(f"item table state is a {type(weight).__name__}, expected a ShardedTensor")
        num_items, dim = weight.size()
        shards = [(shard.metadata.shard_offsets[0], shard.metadata.shard_offsets[1], shard.tensor)
                  for shard in weight.local_shards()]
        if all(m.shard_sizes[1] == dim for m in weight.metadata().shards_metadata):
            # Whole rows (row/table-wise): each score is complete here, so only counts cross processes.
            for row0, _, rows in shards:
                for lo in range(row0, row0 + rows.shape[0], item_chunk):
                    scores = vecs @ rows[lo - row0: lo - row0 + item_chunk].t()
                    counter.add(mask_chunk(scores, lo, counter.exclusions))
            dist.all_reduce(counter.counts, group=self.group)
            return
        # Column pieces: a score is a sum over processes, so partial scores are summed chunk by chunk (every
        # process walks the whole catalogue; costs [N, item_chunk] floats of traffic per chunk).
        for lo in range(0, num_items, item_chunk):
            hi = min(lo + item_chunk, num_items)
            scores = torch.zeros(vecs.shape[0], hi - lo, dtype=vecs.dtype, device=vecs.device)
            for row0, col0, rows in shards:
                a, b = max(lo, row0), min(hi, row0 + rows.shape[0])
                if a < b:
                    scores[:, a - lo: b - lo] += vecs[:, col0: col0 + rows.shape[1]] @ rows[a - row0: b - row0].t()
            dist.all_reduce(scores, group=self.group)
            counter.add(mask_chunk(scores, lo, counter.exclusions))


def _gather_rows(tensor: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, list[int]]:
    """Concatenation, in rank order, of a tensor whose first dimension differs between processes."""
    world = dist.get_world_size(group)
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes_t = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes_t, size, group=group)
    sizes = [int(s) for s in sizes_t]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), sizes


class TorchRecStrategy(DDPStrategy):
    """Lightning strategy: tables sharded by TorchRec (fused optimizer), dense part under DDP, sharded
    checkpoints. One process per device, launched by Lightning (``--trainer.devices N``) or by torchrun.

    Args:
        sharding_types: table name -> forced sharding type (see :class:`ShardingConfig`).
        embedding_optimizer: the tables' fused optimizer (:class:`EmbeddingOptimConfig` or its dict).
        compute_kernel: "fused" (tables in device memory), "fused_uvm"/"fused_uvm_caching" (GPU only).
        min_column_shard: narrowest column-wise shard (None: TorchRec's default, 128).
        process_group_backend: None picks gloo on CPU, nccl on CUDA.
        find_unused_parameters: as for ``DDPStrategy``.
        start_method: as for ``DDPStrategy``.
    """

    def __init__(self, sharding_types: dict[str, str] | None = None,
                 embedding_optimizer: EmbeddingOptimConfig | None = None, compute_kernel: str = "fused",
                 min_column_shard: int | None = None, process_group_backend: str | None = None,
                 find_unused_parameters: bool = False, start_method: str = "popen"):
        super().__init__(process_group_backend=process_group_backend, start_method=start_method)
        self.sharding = ShardingConfig(sharding_types=dict(sharding_types or {}), compute_kernel=compute_kernel,
                                       embedding_optimizer=embedding_optimizer or EmbeddingOptimConfig(),
                                       min_column_shard=min_column_shard)
        self._find_unused_parameters = find_unused_parameters
        self._dmp: DistributedModelParallel | None = None

    def setup(self, trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and trainer.accumulate_grad_batches != 1:
            raise ValueError("trainer.accumulate_grad_batches must be 1 with TorchRecStrategy: the tables' fused "
                             "optimizer updates them at every backward")
        # Shard once per LightningModule: ``fit`` followed by ``test`` keeps the sharded tables.
        if self._dmp is None or self._dmp.module is not module:
            self._dmp = shard_model(module, self.sharding, self.root_device, _group.WORLD,
                                    local_world_size=self.num_processes,
                                    find_unused_parameters=self._find_unused_parameters)
        module.to(self.root_device)
        if fitting:
            # Before any training: checkpoints of several machines need one shared directory.
            for callback in trainer.checkpoint_callbacks:
                if getattr(callback, "dirpath", None):
                    require_shared_directory(Path(callback.dirpath), _group.WORLD)
            self._dmp.init_data_parallel()  # DDP over the parameters that are not sharded
            self.model = self._dmp
            self.setup_optimizers(trainer)
        else:
            self.model = module
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    def setup_optimizers(self, trainer) -> None:
        """The LightningModule's optimizers, minus the table parameters (their optimizer runs in the backward)."""
        super().setup_optimizers(trainer)
        fused = sharded_parameter_ids(self.lightning_module)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in fused]

    # ---- checkpoints ---------------------------------------------------------------------------------
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # a sharded checkpoint loads into the sharded module

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("TorchRecStrategy.save_checkpoint: storage_options are not supported")
        assert self._dmp is not None
        save_sharded_checkpoint(checkpoint, Path(self.broadcast(str(filepath))), self._dmp.fused_optimizer,
                                _group.WORLD)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        # Every process decides together: one that raised alone would leave the others waiting in the load.
        blind = ranks_missing(path, (".metadata", META_FILE), _group.WORLD)
        if len(blind) == self.world_size:
            raise CheckpointError(f"{path}: not a sharded checkpoint directory (TorchRecStrategy loads only those; "
                                  "a single-process checkpoint is loaded without this strategy)")
        if blind:
            raise CheckpointError(f"{path}: the process(es) of rank {', '.join(map(str, blind))} do not see this "
                                  f"checkpoint: {SHARED_FILESYSTEM_HINT}")
        assert self._dmp is not None
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        return load_sharded_checkpoint(path, self.lightning_module, self._dmp.fused_optimizer if fitting else None,
                                       _group.WORLD, weights_only=weights_only)

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        """Nothing to do: ``load_checkpoint`` already loaded the module state into the shards."""

    def teardown(self) -> None:
        # Unlike DDPStrategy, keep the module where it is: moving sharded tables to the CPU would break a
        # later ``test`` on the same (already sharded) module.
        self.model = self.lightning_module
        _optimizers_to_device(self.optimizers, torch.device("cpu"))
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

"""Next-item losses over a head tied to the item table (ids 0 = PAD and 1 = OOV are never targets).

- Full softmax cross-entropy over the whole catalogue.
- Sampled softmax: candidates = the positive, every other target of the batch (in-batch negatives) and
  U uniform draws. Each sampled negative's logit is corrected by ``-log E[its count among the draws]``
  (logQ correction, Yi et al. 2019) and negatives equal to the row's positive are masked (accidental
  hits); the positive is always present, not drawn, so it is not corrected. Then
  ``e^{s_pos} + sum_neg e^{s_j - log E[count_j]}`` estimates the full partition function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ksa_rec.data.schema import RESERVED_IDS
from ksa_rec.ops.backend import resolve_fused_backend
from ksa_rec.ops.xent import sampled_cross_entropy
from ksa_rec.utils.config import require


@dataclass
class LossConfig:
    """Next-item loss: full softmax cross-entropy, or sampled softmax with in-batch + uniform negatives."""

    kind: str = "ce"
    """"ce" (softmax over the full catalogue) or "sampled" (sampled softmax with logQ correction)."""
    num_uniform_negatives: int = 256
    """Sampled softmax: uniform random negatives shared by the batch."""
    in_batch_negatives: bool = True
    """Sampled softmax: the batch's other targets are negatives too."""
    logq_correction: bool = True
    """Sampled softmax: subtract log of each negative's expected count (Yi et al. 2019)."""
    similarity: str = "dot"
    """How the head scores an item for a state: "dot" (their dot product) or "cosine" (both at unit length
    first, as HSTU's and gSASRec's heads). Ranking in evaluation and serving follows it too."""
    temperature: float = 1.0
    """Logits are divided by this before the softmax (cosine logits lie in [-1, 1]: use ~0.05)."""
    label_smoothing: float = 0.0
    """Full CE: this share of each target's probability mass is spread evenly over the catalogue's real
    items (reserved ids excluded); 0 = off."""
    backend: str | None = None
    """Who computes the softmax cross-entropy over the scored logits (sampled softmax, and the full one without
    label smoothing; ``ksa_rec.ops.xent``): null (auto: the Triton kernel on CUDA, torch elsewhere), torch or
    triton."""
    summary_reconstruction: float = 0.0
    """Weight of an auxiliary loss asking every summary state that a later KSA layer reads to name the
    items of its chunk slice (softmax over the catalogue); 0 = off. Needs a ksa layer after the first."""

    def __post_init__(self) -> None:
        require(self.kind in ("ce", "sampled"), "loss.kind", f"must be 'ce' or 'sampled', got {self.kind!r}")
        require(self.backend in (None, "torch", "triton"), "loss.backend",
                f"must be null, torch or triton, got {self.backend!r}")
        require(self.summary_reconstruction >= 0, "loss.summary_reconstruction", "must be >= 0")
        require(self.num_uniform_negatives >= 0, "loss.num_uniform_negatives", "must be >= 0")
        require(self.similarity in ("dot", "cosine"), "loss.similarity",
                f"must be 'dot' or 'cosine', got {self.similarity!r}")
        require(self.temperature > 0, "loss.temperature", "must be > 0")
        require(0 <= self.label_smoothing < 1, "loss.label_smoothing", "must be in [0, 1)")
        require(self.kind == "ce" or self.label_smoothing == 0, "loss.label_smoothing", "needs loss.kind ce")
        require(self.kind == "ce" or self.in_batch_negatives or self.num_uniform_negatives > 0,
                "loss", "sampled softmax needs in-batch or uniform negatives")


def catalogue_logits(hidden: Tensor, item_weight: Tensor) -> Tensor:
    """``hidden [N, dim]`` x ``item_weight [num_items, dim]`` -> ``[N, num_items]``, reserved ids at -inf."""
    logits = hidden @ item_weight.t()
    logits[:, :RESERVED_IDS] = float("-inf")
    return logits


def full_cross_entropy(hidden: Tensor, item_weight: Tensor, targets: Tensor, temperature: float = 1.0,
                       label_smoothing: float = 0.0, backend: str | None = None) -> Tensor:
    """Mean softmax cross-entropy over the full catalogue. ``hidden [N, dim]``, ``item_weight [num_items, dim]``,
    ``targets [N]``.

    With ``label_smoothing`` e the target distribution is (1 - e) on the target plus e spread evenly over
    the real items; torch's own smoothing would also spread it over the reserved ids, whose -inf logits
    make that loss infinite. Without it, where ``backend`` resolves to Triton (CUDA by default), the
    cross-entropy is ``ksa_rec.ops.xent``'s kernel over the catalogue's logits: the target's own score is
    the positive, every other item a negative, and the reserved ids columns that never count."""
    if label_smoothing == 0 and resolve_fused_backend(backend, hidden.device, hidden.dtype, "loss") == "triton":
        num_items = item_weight.shape[0]
        pos = (hidden * F.embedding(targets, item_weight)).sum(-1)
        ids = torch.arange(num_items, device=hidden.device)
        never = torch.where(ids < RESERVED_IDS, float("inf"), 0.0)  # subtracted: reserved ids score -inf
        return sampled_cross_entropy(pos, hidden @ item_weight.t(), ids, targets, never, temperature, "triton")
    logits = catalogue_logits(hidden, item_weight) / temperature
    if label_smoothing == 0:
        return F.cross_entropy(logits, targets)
    log_probs = F.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(1, targets[:, None]).squeeze(1)
    spread = -log_probs[:, RESERVED_IDS:].mean(dim=-1)
    return ((1 - label_smoothing) * nll + label_smoothing * spread).mean()


def sampled_softmax(hidden: Tensor, targets: Tensor, item_embeddings: Callable[[Tensor], Tensor], num_items: int,
                    cfg: LossConfig, item_prob: Tensor | None, generator: torch.Generator | None = None) -> Tensor:
    """Sampled softmax with logQ correction; only the candidates' embeddings are looked up, so the item
    table may be sharded.

    Args:
        hidden: ``[N, dim]`` states at positions with a target; targets: ``[N]`` item ids (>= 2).
        item_embeddings: ids ``[M]`` -> embeddings ``[M, dim]``; num_items: table size (incl. PAD/OOV).
        item_prob: ``[num_items]`` training frequency of each item (sums to 1), used for the expected
            in-batch count; None means uniform.
    """
    n = targets.shape[0]
    negatives = []
    if cfg.in_batch_negatives:
        negatives.append(targets)
    if cfg.num_uniform_negatives:
        negatives.append(torch.randint(RESERVED_IDS, num_items, (cfg.num_uniform_negatives,),
                                       device=targets.device, generator=generator))
    neg = torch.cat(negatives)
    candidates = item_embeddings(torch.cat([targets, neg]))
    pos_logit = (hidden * candidates[:n]).sum(-1)
    neg_logit = hidden @ candidates[n:].t()
    log_counts = torch.log(_expected_counts(neg, n, cfg, num_items, item_prob)) if cfg.logq_correction else None
    return sampled_cross_entropy(pos_logit, neg_logit, neg, targets, log_counts, cfg.temperature, cfg.backend)


def _expected_counts(items: Tensor, batch: int, cfg: LossConfig, num_items: int,
                     item_prob: Tensor | None) -> Tensor:
    """Expected number of times each item appears among the drawn negatives, ``[len(items)]``."""
    real_items = num_items - RESERVED_IDS
    expected = torch.full(items.shape, cfg.num_uniform_negatives / real_items, dtype=torch.float32,
                          device=items.device)
    if cfg.in_batch_negatives:
        expected = expected + (batch / real_items if item_prob is None else batch * item_prob[items])
    return expected.clamp(min=1e-12)

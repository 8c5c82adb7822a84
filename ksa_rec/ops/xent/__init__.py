"""The cross-entropy of sampled softmax over logits already scored: each row's positive against the batch's
shared negatives, with logQ correction and accidental hits removed.

``sampled_cross_entropy(pos [N], neg [N, M], neg_ids [M], targets [N], log_counts [M] | None, temperature)``
is the mean over rows of ``logsumexp([pos_i, z_i1 .. z_iM]) - pos_i / T`` where ``z_ij = neg_ij / T -
log_counts_j`` and ``z_ij = -inf`` where ``neg_ids_j == targets_i``. Two peers behind one dispatcher: plain
torch (every device) and a Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``) that reads the ``[N, M]``
logits once forward and once backward, in their own dtype, where torch's chain of division, correction,
mask, concatenation and softmax passes over them several times each way (at 65,536 events and 1,024
negatives, each pass moves 134-268 MB). Which one runs follows the attention rule
(``ksa_rec.ops.backend.resolve_fused_backend``). The full-catalogue cross-entropy
(``ksa_rec.modules.losses.full_cross_entropy``) runs on it too: every item a negative, the reserved ids
subtracted out with ``log_counts = +inf``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ksa_rec.ops.backend import resolve_fused_backend


def sampled_cross_entropy(pos: Tensor, neg: Tensor, neg_ids: Tensor, targets: Tensor, log_counts: Tensor | None,
                          temperature: float = 1.0, backend: str | None = None) -> Tensor:
    """Mean sampled-softmax cross-entropy (module docstring). ``pos [N]``, ``neg [N, M]`` (any float dtype),
    ``neg_ids [M]`` and ``targets [N]`` int64, ``log_counts [M]`` float32 or None."""
    if neg.shape[0] and resolve_fused_backend(backend, neg.device, neg.dtype, "loss") == "triton":
        from ksa_rec.ops.xent.triton_xent import sampled_cross_entropy_triton
        return sampled_cross_entropy_triton(pos, neg, neg_ids, targets, log_counts, temperature)
    return sampled_cross_entropy_reference(pos, neg, neg_ids, targets, log_counts, temperature)


def sampled_cross_entropy_reference(pos: Tensor, neg: Tensor, neg_ids: Tensor, targets: Tensor,
                                    log_counts: Tensor | None, temperature: float = 1.0) -> Tensor:
    """The torch peer."""
    neg = neg / temperature
    if log_counts is not None:
        neg = neg - log_counts[None, :]
    neg = neg.masked_fill(neg_ids[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([pos[:, None] / temperature, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device))


__all__ = ["sampled_cross_entropy", "sampled_cross_entropy_reference"]

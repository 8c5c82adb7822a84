"""Token sliding-window attention (the ``swa`` baseline, KSA.md section 10) as a special case of KSA.

Event i of a user sees event j of the same user iff ``0 <= i - j <= w``. With ``chunk_size = 1`` every
event is its own chunk (``c(i) = i``), and KSA's event rule "``j <= i`` and ``c(i) - c(j) <= W``" with
``W = w`` and no summaries is exactly that. So SWA runs on the KSA backends unchanged: the blockwise
torch reference (a band of ``w`` keys per query block, never a ``T x T`` mask) and the flex mask.
"""

from __future__ import annotations

from torch import Tensor

from ksa_rec.ops.ksa.reference import ksa_attention_torch


def swa_via_ksa(ksa_backend, q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, *, window_tokens: int,
                scale: float | None) -> Tensor:
    """Run SWA on a KSA backend function (signature of ``ksa_attention_torch``); returns ``(T, H, D)``."""
    no_queries, no_keys = q.new_zeros((0, *q.shape[1:])), k.new_zeros((0, *k.shape[1:]))
    out, _ = ksa_backend(q, k, v, no_queries, no_keys, no_keys, offsets, chunk_size=1, window=window_tokens,
                         summary_tokens=0, scale=scale, max_summaries=None)
    return out


def sliding_window_attention_torch(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, *, window_tokens: int,
                                   scale: float | None = None) -> Tensor:
    """Blockwise torch SWA. q ``(sum_b n_b, H, D)``, k, v ``(sum_b n_b, Hkv, D)``, offsets ``[B+1]``.

    Returns ``(sum_b n_b, H, D)``. Inputs are assumed valid (see ``sliding_window_attention``).
    """
    return swa_via_ksa(ksa_attention_torch, q, k, v, offsets, window_tokens=window_tokens, scale=scale)

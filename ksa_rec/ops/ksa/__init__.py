"""Kwai Summary Attention (KSA.md): one dispatcher over three peer backends, one rule object.

* ``"torch"``  -- ``reference.ksa_attention_torch``: readable, blockwise (no ``T x T`` mask), the CPU path.
* ``"flex"``   -- ``flex.ksa_attention_flex``: FlexAttention with the KSA ``mask_mod`` (GPU; CPU: forward).
* ``"triton"`` -- ``triton_op.ksa_attention_triton``: fused kernels, imported lazily (CUDA, or CPU under
  ``TRITON_INTERPRET=1``).

Which one runs is ``ksa_rec.ops.backend.resolve_backend`` (the same rule for the streaming op in
``cached.py``). Who sees what is the ``KsaRule`` (``rule.py``).
"""

from __future__ import annotations

from torch import Tensor

from ksa_rec.ops.backend import resolve_backend
from ksa_rec.ops.ksa.checks import check_backend, check_ksa_inputs
from ksa_rec.ops.ksa.flex import ksa_attention_flex
from ksa_rec.ops.ksa.reference import ksa_attention_torch
from ksa_rec.ops.ksa.rule import KsaRule

BACKENDS = ("torch", "flex", "triton")


def ksa_attention(q: Tensor, k: Tensor, v: Tensor, q_sum: Tensor, k_sum: Tensor, v_sum: Tensor,
                  offsets: Tensor, rule: KsaRule, *, scale: float | None = None, backend: str | None = None,
                  check_offsets: bool = True, tables: dict | None = None) -> tuple[Tensor, Tensor]:
    """Kwai Summary Attention over a jagged batch of users (KSA.md section 3), differentiable.

    Two jagged streams (KSA.md section 5). Example, k = 2, S = 1, lengths (5, 1)::

        q, k, v              | t0 t1 t2 t3 t4 | u0 |    offsets         = [0, 5, 6]
        q_sum, k_sum, v_sum  | s0    s1       |    |    summary offsets = [0, 2, 2]

    Args:
        q: ``(sum_b n_b, H, D)`` event queries (positional encoding already applied by the caller).
        k, v: ``(sum_b n_b, Hkv, D)`` event keys / values; ``H % Hkv == 0`` (GQA: head h reads h // (H/Hkv)).
        q_sum: ``(sum_b S*(n_b//k), H, D)`` summary queries, user b's rows consecutive, chunk-major then
            slot (row ``c*S + j`` of a user is ``s_{c,j}``).
        k_sum, v_sum: ``(sum_b S*(n_b//k), Hkv, D)`` summary keys / values, same layout.
        offsets: int64 ``[B+1]``, ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == T``.
        rule: who sees what (``KsaRule``: chunk size k, window W and its unit, S summary tokens per chunk,
            at most M summaries read).
        scale: softmax scale, default ``D ** -0.5``.
        backend: None (auto), ``"torch"``, ``"flex"`` or ``"triton"`` (``ksa_rec.ops.backend``).
        check_offsets: False skips the checks that read the values of ``offsets`` (and the summary row
            count derived from them): they sync a GPU. For callers that validated the layout already.
        tables: a dict that the calls over one ``offsets`` tensor share (the layers of one forward pass, whose
            backward passes run while it is alive): the Triton backend keeps its block tables there, so they
            are built once per batch and rule instead of once per layer and pass. The caller must not change
            ``offsets`` while the dict is in use. Other backends ignore it.

    Returns:
        ``(out (sum_b n_b, H, D), out_sum (sum_b S*(n_b//k), H, D))`` in the dtype of q.

    Raises:
        ValueError: one line naming the bad argument (shapes, dtypes, devices, offsets, the rule).
        BackendError: an explicit backend that cannot run here.
    """
    check_ksa_inputs(q, k, v, q_sum, k_sum, v_sum, offsets, rule, scale=scale, check_offsets=check_offsets)
    check_backend("ksa_attention", backend, BACKENDS)
    name = resolve_backend(backend, q.device, q.dtype, "train")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.shape[0] == 0:  # no events (B = 0 or only empty users): nothing to launch on any backend
        return q[:0].clone(), q_sum[:0].clone()
    extra = {"tables": tables} if name == "triton" else {}
    return backend_function(name)(q, k, v, q_sum, k_sum, v_sum, offsets, rule, scale=scale, **extra)


def backend_function(name: str):
    """The function behind a backend name; ``"triton"`` is imported here, on first use."""
    if name == "torch":
        return ksa_attention_torch
    if name == "flex":
        return ksa_attention_flex
    from ksa_rec.ops.ksa.triton_op import ksa_attention_triton

    return ksa_attention_triton


__all__ = ["BACKENDS", "KsaRule", "backend_function", "ksa_attention"]

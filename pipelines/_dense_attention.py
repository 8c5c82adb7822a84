"""Dense causal attention for bench_kernels.py: every way this machine can run it, each at its own best.

How to run: not a script; ``pipelines/bench_kernels.py`` imports it.

- ``sdpa default``: ``F.scaled_dot_product_attention(is_causal=True)`` with no override: the backend
  torch picks (what a user gets).
- ``sdpa cudnn`` / ``sdpa flash`` / ``sdpa efficient``: the same call inside ``sdpa_kernel(backend)``.
  A backend that refuses the inputs raises; the runner reports it as refused (with torch's reason).
- ``varlen flash``: ``torch.nn.attention.varlen.varlen_attn`` on the jagged ``[T, H, D]`` stream, causal,
  no padding (where this torch has it).
- ``fa4``: FlashAttention-4 (``flash_attn.cute.flash_attn_varlen_func``), only where it imports.

SDPA runs padded ``[B, H, L_max, D]`` (a jagged batch pays for its padding there); its own FLOPs are the
causal convention ``2 * B * H * L_max^2 * D`` forward; varlen kernels do ``2 * H * D * sum(n_b^2)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ksa_rec.ops.backend import varlen_causal_kwargs

SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}


@dataclass
class Call:
    """One timed method on one batch: ``fn()`` returns the outputs; ``leaves`` get gradients from
    ``grads`` (one per output). ``unavailable``: why it cannot run here (it is then reported, not timed)."""

    name: str
    group: str  # "dense", "flex-ksa" or "ksa": what the ratios divide by
    fn: Callable[[], tuple[Tensor, ...]] | None
    leaves: list[Tensor]
    grads: list[Tensor]
    own_flops_fwd: float
    setting: str = ""
    unavailable: str | None = None
    has_backward: bool = True


def dense_calls(events: list[Tensor], offsets: Tensor, lengths: list[int], event_grad: Tensor,
                gen: torch.Generator) -> list[Call]:
    """Dense causal attention over the users of a batch. ``events``: jagged q, k, v ``[T, H, D]`` leaves;
    ``event_grad``: their output gradient. Padded SDPA inputs are drawn fresh (same shape, same dtype)."""
    q = events[0]
    B, H, D, L = len(lengths), q.shape[1], q.shape[2], max(lengths)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=q.device, dtype=q.dtype)

    padded = [rand(B, H, L, D).requires_grad_() for _ in range(3)]
    padded_grad = rand(B, H, L, D)
    padded_flops = 2.0 * B * H * L * L * D
    varlen_flops = 2.0 * H * D * sum(n * n for n in lengths)

    def sdpa(backend: SDPBackend | None):
        def call():
            if backend is None:
                return (F.scaled_dot_product_attention(*padded, is_causal=True),)
            with sdpa_kernel(backend):
                return (F.scaled_dot_product_attention(*padded, is_causal=True),)
        return call

    calls = [Call("sdpa default", "dense", sdpa(None), padded, [padded_grad], padded_flops)]
    calls += [Call(f"sdpa {name}", "dense", sdpa(backend), padded, [padded_grad], padded_flops)
              for name, backend in SDPA_BACKENDS.items()]
    cu = offsets.to(torch.int32)
    calls.append(_varlen_call(events, cu, L, event_grad, varlen_flops))
    calls.append(_fa4_call(events, cu, L, event_grad, varlen_flops))
    return calls


def _varlen_call(events: list[Tensor], cu: Tensor, max_len: int, grad: Tensor, flops: float) -> Call:
    name = "varlen flash"
    causal = varlen_causal_kwargs()
    if causal is None:
        why = f"torch {torch.__version__}: no torch.nn.attention.varlen"
        return Call(name, "dense", None, [], [], flops, unavailable=why)
    from torch.nn.attention.varlen import varlen_attn

    return Call(name, "dense", lambda: (varlen_attn(*events, cu, cu, max_len, max_len, **causal),), events, [grad],
                flops)


def _fa4_call(events: list[Tensor], cu: Tensor, max_len: int, grad: Tensor, flops: float) -> Call:
    name = "fa4 (flash_attn.cute)"
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except Exception as err:  # noqa: BLE001 -- any import failure means: not on this machine
        return Call(name, "dense", None, [], [], flops, unavailable=f"does not import ({type(err).__name__}: {err})")

    def call():
        out = flash_attn_varlen_func(*events, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                                     max_seqlen_k=max_len, causal=True)
        return (out[0] if isinstance(out, tuple) else out,)

    return Call(name, "dense", call, events, [grad], flops)

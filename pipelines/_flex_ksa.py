"""Flex-KSA for bench_kernels.py: FlexAttention with the KSA mask (KSA.md section 3), set up at its fastest.

How to run: not a script; ``pipelines/bench_kernels.py`` imports it.

The fast setup ("per-user"), what a user tuning Flex for KSA would do:

- **a batch dimension**: one batch row per user, ``[B, H, P, D]``; row b holds user b's events at
  ``[0, n_b)``, its summaries at ``[L_max, L_max + S * (n_b // k))`` (chunk-major, slot-minor, as the
  summary stream is laid out) and padding up to ``P`` (a multiple of 128). A uniform batch wastes only
  the round-up; a jagged batch is padded to its longest user, as padded SDPA is.
- **an arithmetic ``mask_mod``**: chunk, slot and stream of a token follow from its index; the only
  gather is ``lengths[b]`` for jagged batches (none for uniform ones, whose mask is shared by every row:
  ``B=None``). The package's packed backend instead gathers five metadata tensors per (query, key).
- **the block mask built once** per batch layout and block size, outside the timed call, and reused.
- **``torch.compile(flex_attention, dynamic=False)``** once per process: static shapes, so every length
  gets kernels specialised for it (what a training job with a fixed length gets).
- **a tile sweep** through ``kernel_options`` (``fwd_BLOCK_M/N``, ``bwd_BLOCK_M1/N1/M2/N2``) and the
  block-mask granularity; ``"default"`` leaves every choice to Inductor.

The old setup is kept as one row, "packed": every user and both streams in one sequence with the
package's metadata ``mask_mod`` (``ksa_rec.ops.ksa.flex``), its kernel alone on pre-packed inputs.

Padding query rows attend to themselves only, so no row is fully masked (no NaN paths in backward).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from ksa_rec.ops.ksa import KsaRule
from ksa_rec.ops.ksa.flex import ksa_block_mask

ROW_MULTIPLE = 128  # rows per user are rounded up to this (every mask block size below divides it)


@dataclass(frozen=True)
class TileSetting:
    """One point of the Flex tile sweep: the block-mask granularity and the kernel tiles."""

    name: str
    mask_block: int
    kernel_options: dict = field(default_factory=dict)


_BWD_64 = {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
           "bwd_num_warps": 4, "bwd_num_stages": 3}
# "default" = Inductor's choice (torch 2.13 on sm90, bf16, D=64: forward 128x128, backward 64/128/128/64,
# which needs 128-token mask blocks); the others are the block sizes Inductor's own autotuner tries.
TILE_SETTINGS = (
    TileSetting("default", 128),
    TileSetting("fwd 128x64", 128, {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64}),
    TileSetting("fwd 64x64, bwd 64x64", 128, {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, **_BWD_64}),
    TileSetting("mask 64, fwd 64x64, bwd 64x64", 64, {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, **_BWD_64}),
)


@dataclass(frozen=True)
class PerUserLayout:
    """Rows of the per-user layout (module docstring): ``L_max`` event slots, then summary slots."""

    lengths: tuple[int, ...]
    chunk: int
    sums: int

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    @property
    def uniform(self) -> bool:
        return len(set(self.lengths)) == 1

    @property
    def rows(self) -> int:
        used = self.max_len + self.sums * (self.max_len // self.chunk)
        return -(-used // ROW_MULTIPLE) * ROW_MULTIPLE


def per_user_mask_mod(layout: PerUserLayout, window: int | None, device: torch.device):
    """``mask_mod(b, h, q, kv)``: the package's ``KsaRule`` on the per-user layout. A row's stream and
    identity (event index, or summary id) follow from its index, so no per-token metadata is gathered."""
    L = layout.max_len
    rule = KsaRule(layout.chunk, window, layout.sums).with_tensor_numbers(device)
    lengths = None if layout.uniform else torch.tensor(layout.lengths, device=device)

    def mask_mod(b, h, q, kv):
        n = L if lengths is None else lengths[b]
        q_sum, kv_sum = q >= L, kv >= L
        seen = rule.visible(torch.where(q_sum, q - L, q), q_sum, torch.where(kv_sum, kv - L, kv), kv_sum)
        end_sum = L + layout.sums * (n // layout.chunk)
        q_real = torch.where(q_sum, q < end_sum, q < n)
        kv_real = torch.where(kv_sum, kv < end_sum, kv < n)
        return (seen & q_real & kv_real) | (q_real.logical_not() & (kv == q))

    return mask_mod


def per_user_block_mask(layout: PerUserLayout, window: int | None, mask_block: int, device: torch.device) -> BlockMask:
    batch = None if layout.uniform else len(layout.lengths)  # uniform: one mask broadcast over users
    return create_block_mask(per_user_mask_mod(layout, window, device), batch, None, layout.rows, layout.rows,
                             device=device, BLOCK_SIZE=mask_block, _compile=device.type == "cuda")


def pack_per_user(events: Tensor, summaries: Tensor, layout: PerUserLayout) -> Tensor:
    """Jagged ``[T, H, D]`` events and ``[Ts, H, D]`` summaries -> ``[B, H, rows, D]`` (zero padding)."""
    out = events.new_zeros(len(layout.lengths), layout.rows, *events.shape[1:])
    e = s = 0
    for b, n in enumerate(layout.lengths):
        ns = layout.sums * (n // layout.chunk)
        out[b, :n] = events[e:e + n]
        out[b, layout.max_len:layout.max_len + ns] = summaries[s:s + ns]
        e, s = e + n, s + ns
    return out.transpose(1, 2).contiguous()


def unpack_per_user(packed: Tensor, layout: PerUserLayout) -> tuple[Tensor, Tensor]:
    """Inverse of ``pack_per_user`` for the real rows: ``(events [T, H, D], summaries [Ts, H, D])``."""
    rows = packed.transpose(1, 2)
    events, summaries = [], []
    for b, n in enumerate(layout.lengths):
        events.append(rows[b, :n])
        summaries.append(rows[b, layout.max_len:layout.max_len + layout.sums * (n // layout.chunk)])
    return torch.cat(events), torch.cat(summaries)


def packed_old_setup(events: list[Tensor], summaries: list[Tensor], offsets: Tensor, chunk: int,
                     window: int | None, sums: int) -> tuple[BlockMask, list[Tensor], int]:
    """The old setup's inputs: ``[1, H, T + Ts + pad, D]`` per tensor and the package's cached block mask.
    Returns (mask, packed tensors in the order given, number of real rows)."""
    mask = ksa_block_mask(tuple(offsets.tolist()), str(offsets.device), KsaRule(chunk, window, sums))
    rows = events[0].shape[0] + summaries[0].shape[0]

    def pack(ev: Tensor, sm: Tensor) -> Tensor:
        pad = ev.new_zeros(mask.shape[-2] - rows, *ev.shape[1:])
        return torch.cat([ev, sm, pad]).transpose(0, 1).unsqueeze(0).detach().contiguous()

    return mask, [pack(ev, sm) for ev, sm in zip(events, summaries)], rows


def flex(device: torch.device):
    """Compiled flex on CUDA; eager flex elsewhere (CPU: unfused, forward only; for smoke runs)."""
    return _compiled() if device.type == "cuda" else _eager


@functools.cache
def _compiled():
    # Every (length, batch kind, tile setting, grad mode) is its own static graph (about 60 in a full run):
    # allow more than the default 8 recompiles.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(flex_attention, dynamic=False)


def _eager(*args, **kwargs) -> Tensor:
    with warnings.catch_warnings():  # "called without torch.compile()": expected off CUDA
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(*args, **kwargs)

"""FlexAttention backend of KSA (GPU path): one packed sequence per batch and a ``mask_mod`` for section 3.

Packing: ``[events of all users (T) ; summaries of all users (Ts) ; padding]``, i.e. the two jagged
streams concatenated, padded to a multiple of flex's 128-token block. Every token carries metadata::

    user   owning user (-1 for padding: padding only sees padding, so no row is empty)
    kind   False = event, True = summary
    ident  event index within its user, or the summary id c*S + j

and ``mask_mod`` is ``KsaRule.visible`` on two tokens of the same user. Summaries of a user are
contiguous in the packing (KSA.md section 5), so event->old-summary attention is a dense band of blocks
and ``create_block_mask`` skips everything else.

Costs and caching: the block mask depends on the batch lengths; it is built per distinct
``(offsets, rule)`` and kept in a small LRU cache, so the
layers of one forward pass share it (with ``_compile=True`` on CUDA the build never materialises an
``L x L`` mask). ``flex_attention`` itself is ``torch.compile``-d once per process, lazily; new lengths
may recompile until torch marks the shapes dynamic.

CPU (torch 2.13): flex runs eagerly (unfused, it materialises the ``L x L`` scores, fine for tests), in
forward only: FlexAttention has no CPU backward, and this backend raises ``NotImplementedError`` when a
gradient would be needed. Use ``backend="torch"`` on CPU.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from ksa_rec.ops.ksa.layout import summary_index
from ksa_rec.ops.ksa.rule import KsaRule
from ksa_rec.utils.jagged import positions_in_segment, segment_ids

FLEX_BLOCK = 128


@dataclass(frozen=True)
class Tokens:
    """Per-token metadata of the packed sequence, each ``[L]`` int32 (``kind`` bool); see module doc."""

    user: Tensor
    kind: Tensor
    ident: Tensor
    events: int  # T
    summaries: int  # Ts

    @property
    def length(self) -> int:
        return self.user.numel()


def ksa_attention_flex(q: Tensor, k: Tensor, v: Tensor, q_sum: Tensor, k_sum: Tensor, v_sum: Tensor,
                       offsets: Tensor, rule: KsaRule, *, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """KSA with FlexAttention; contract of ``ksa_rec.ops.ksa_attention`` (inputs assumed valid).

    Shapes: q ``(sum_b n_b, H, D)``, k, v ``(sum_b n_b, Hkv, D)``; q_sum ``(sum_b S*(n_b//k), H, D)``,
    k_sum, v_sum ``(sum_b S*(n_b//k), Hkv, D)``; offsets int64 ``[B+1]``.
    Returns ``(out (sum_b n_b, H, D), out_sum (sum_b S*(n_b//k), H, D))``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.shape[0] == 0:
        return q[:0].clone(), q_sum[:0].clone()
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(
            x.requires_grad for x in (q, k, v, q_sum, k_sum, v_sum)):
        raise NotImplementedError("ksa_attention backend='flex': FlexAttention has no backward on CPU in "
                                  f"torch {torch.__version__}; use backend='torch' on CPU")
    mask = ksa_block_mask(tuple(offsets.tolist()), str(q.device), rule)
    total, rows = q.shape[0], q.shape[0] + q_sum.shape[0]
    padding = mask.shape[-2] - rows

    def pack(events: Tensor, summaries: Tensor) -> Tensor:  # -> [1, heads, L, D]
        pad = events.new_zeros(padding, *events.shape[1:])
        return torch.cat([events, summaries, pad]).transpose(0, 1).unsqueeze(0)

    out = _flex_attention(q.device)(pack(q, q_sum), pack(k, k_sum), pack(v, v_sum), block_mask=mask,
                                    scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    out = out[0].transpose(0, 1)  # [L, H, D]
    return out[:total].contiguous(), out[total:rows].contiguous()


def token_metadata(offsets: Tensor, chunk_size: int, summary_tokens: int,
                   multiple: int = FLEX_BLOCK) -> Tokens:
    """Metadata of ``[events ; summaries ; padding to a multiple of `multiple`]`` (module docstring)."""
    total = int(offsets[-1])
    user_s, chunk_s, slot_s = summary_index(offsets, chunk_size, summary_tokens)
    pos_e = positions_in_segment(offsets, total)
    rows = total + user_s.numel()
    padding = -rows % multiple
    dev = offsets.device

    def packed(events: Tensor, summaries: Tensor, pad_value: int) -> Tensor:
        pad = torch.full((padding,), pad_value, dtype=torch.int32, device=dev)
        return torch.cat([events.to(torch.int32), summaries.to(torch.int32), pad])

    kind = torch.zeros(rows + padding, dtype=torch.bool, device=dev)
    kind[total:rows] = True
    return Tokens(user=packed(segment_ids(offsets, total), user_s, -1), kind=kind,
                  ident=packed(pos_e, chunk_s * summary_tokens + slot_s, 0), events=total, summaries=user_s.numel())


def ksa_mask_mod(tokens: Tokens, rule: KsaRule):
    """``mask_mod(b, h, q_idx, kv_idx) -> bool``: ``rule`` on two packed tokens of the same user."""
    user, kind, ident = tokens.user, tokens.kind, tokens.ident
    rule = rule.with_tensor_numbers(ident.device)

    def mask_mod(b, h, q_idx, kv_idx):
        return (user[q_idx] == user[kv_idx]) & rule.visible(ident[q_idx], kind[q_idx], ident[kv_idx], kind[kv_idx])

    return mask_mod


@functools.lru_cache(maxsize=8)
def ksa_block_mask(offsets: tuple[int, ...], device: str, rule: KsaRule) -> BlockMask:
    """Block mask of one batch layout (``offsets`` as a tuple: hashable, cached across layers)."""
    offsets_t = torch.tensor(offsets, dtype=torch.int64, device=device)
    tokens = token_metadata(offsets_t, rule.chunk_size, rule.summary_tokens)
    mask_mod = ksa_mask_mod(tokens, rule)
    on_cuda = offsets_t.device.type == "cuda"
    return create_block_mask(mask_mod, None, None, tokens.length, tokens.length, device=device,
                             BLOCK_SIZE=FLEX_BLOCK, _compile=on_cuda)


def _flex_attention(device: torch.device):
    """Compiled flex on CUDA (fused kernel); eager flex elsewhere (CPU: unfused, forward only)."""
    return _compiled_flex_attention() if device.type == "cuda" else _eager_flex_attention


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention)


def _eager_flex_attention(*args, **kwargs) -> Tensor:
    with warnings.catch_warnings():  # "called without torch.compile()": expected off CUDA, see module doc
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(*args, **kwargs)

"""The plain per-user, per-event recurrences of MKA and FastMKA: the test oracle, written for clarity.

Every quantity is recomputed from its definition (MKA.md and this folder's README) with Python loops;
nothing is shared with ``reference.py`` or ``streaming.py``. O(n^2) per user: tests only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ksa_rec.ops.rope import apply_rotary


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """One query ``q [H, D]`` over ``k, v [N, H, D]`` (N >= 1) -> ``[H, D]``."""
    probs = torch.softmax(torch.einsum("hd,nhd->hn", q, k) * scale, dim=-1)
    return torch.einsum("hn,nhd->hd", probs, v)


def mka_recurrence(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, router_logits: Tensor,
                   log_decay: Tensor, offsets: Tensor, positions: Tensor, *, local_window: int, block_size: int,
                   max_blocks: int, mask_empty_bank: bool = True,
                   scale: float | None = None) -> tuple[Tensor, Tensor]:
    """MKA for a jagged batch, one event at a time.

    Args:
        q, k, v: ``(sum_b n_b, H, D)`` projections (not rotated); cos, sin: RoPE tables ``(sum_b n_b, 1, D/2)``.
        router_logits: ``(sum_b n_b, 3)``; log_decay: ``[H, S]`` (log of the EMA decays).
        positions: ``(sum_b n_b,)`` absolute event index.

    Returns:
        ``(out (sum_b n_b, H, D), weights (sum_b n_b, 3))``, before the output projection.
    """
    heads, dim = q.shape[1:]
    scale = dim ** -0.5 if scale is None else scale
    q_rot, k_rot = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    beta = log_decay.exp()[:, :, None]  # [H, S, 1]
    outs, all_weights = [q[:0]], [router_logits[:0]]
    for b in range(offsets.numel() - 1):
        rows = list(range(int(offsets[b]), int(offsets[b + 1])))
        num_k = q.new_zeros(heads, beta.shape[1], dim)
        num_v = q.new_zeros(heads, beta.shape[1], dim)
        den = q.new_zeros(heads, beta.shape[1], 1)
        for t in rows:
            p = int(positions[t])
            # L1: raw (rotated) keys of the last W1 events of this user, t included.
            window = [j for j in rows if p - local_window < int(positions[j]) <= p]
            a1 = _attend(q_rot[t], k_rot[window], v[window], scale)
            # L2: update the S normalised EMAs with event t, then attend over the S slots.
            num_k, num_v, den = beta * num_k + k[t][:, None], beta * num_v + v[t][:, None], beta * den + 1
            a2 = _attend(q[t], (num_k / den).transpose(0, 1), (num_v / den).transpose(0, 1), scale)
            # L3: blocks whose last event is at least W1 events old, newest M3, means of their events.
            blocks = _visible_blocks(rows, positions, p, local_window, block_size)[-max_blocks:] if max_blocks else []
            logits = router_logits[t]
            if blocks:
                members = [[j for j in rows if int(positions[j]) // block_size == g] for g in blocks]
                mean_k = torch.stack([k[m].mean(0) for m in members])
                mean_v = torch.stack([v[m].mean(0) for m in members])
                a3 = _attend(q[t], mean_k, mean_v, scale)
            else:
                a3 = torch.zeros_like(a1)
                if mask_empty_bank:
                    logits = torch.cat([logits[:2], logits.new_full((1,), float("-inf"))])
            weights = torch.softmax(logits, dim=-1)
            outs.append((weights[0] * a1 + weights[1] * a2 + weights[2] * a3)[None])
            all_weights.append(weights[None])
    return torch.cat(outs), torch.cat(all_weights)


def _visible_blocks(rows: list[int], positions: Tensor, p: int, local_window: int, block_size: int) -> list[int]:
    """Ids (ascending) of the blocks of this user whose last event ``(g+1)*C3 - 1`` is ``<= p - W1``."""
    present = sorted({int(positions[j]) // block_size for j in rows})
    return [g for g in present if (g + 1) * block_size - 1 <= p - local_window]


def fastmka_sources_recurrence(x: Tensor, router_logits: Tensor, log_decay: Tensor, offsets: Tensor,
                               positions: Tensor, *, block_size: int) -> tuple[Tensor, Tensor]:
    """FastMKA's fused sources, one event at a time.

    ``x (sum_b n_b, C)``, ``router_logits (sum_b n_b, 3)``, ``log_decay [S]``. For event j:
    L1 = x_j; L2 = mean over s of the normalised EMA ``num_s / den_s`` of x up to j; L3 = mean of x over
    the events of j's block (by absolute index) up to j. Returns ``(x_fused (sum_b n_b, C), weights)``.
    """
    beta = log_decay.exp()[:, None]  # [S, 1]
    fused, all_weights = [x[:0]], [router_logits[:0]]
    for b in range(offsets.numel() - 1):
        num, den = x.new_zeros(beta.shape[0], x.shape[1]), x.new_zeros(beta.shape[0], 1)
        block, block_rows = None, []
        for t in range(int(offsets[b]), int(offsets[b + 1])):
            num, den = beta * num + x[t], beta * den + 1
            session = (num / den).mean(0)
            if int(positions[t]) // block_size != block:
                block, block_rows = int(positions[t]) // block_size, []
            block_rows.append(t)
            block_mean = x[block_rows].mean(0)
            weights = torch.softmax(router_logits[t], dim=-1)
            fused.append((weights[0] * x[t] + weights[1] * session + weights[2] * block_mean)[None])
            all_weights.append(weights[None])
    return torch.cat(fused), torch.cat(all_weights)


def window_attention_recurrence(q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, positions: Tensor, *,
                                window: int | None, scale: float | None = None) -> Tensor:
    """Each event attends to its user's events at positions ``p - window < j <= p`` (all ``j <= p`` if None).

    ``q, k, v (sum_b n_b, H, D)`` with RoPE already applied. Returns ``(sum_b n_b, H, D)``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = [q[:0]]
    for b in range(offsets.numel() - 1):
        rows = range(int(offsets[b]), int(offsets[b + 1]))
        for t in rows:
            p = int(positions[t])
            seen = [j for j in rows if int(positions[j]) <= p and (window is None or p - int(positions[j]) < window)]
            outs.append(_attend(q[t], k[seen], v[seen], scale)[None])
    return torch.cat(outs)


__all__ = ["fastmka_sources_recurrence", "mka_recurrence", "window_attention_recurrence"]

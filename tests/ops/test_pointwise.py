"""HSTU's pointwise attention (``ksa_rec.ops.pointwise``) against a loop over queries and keys written from its
definition, forward and gradients, on odd jagged batches; and the step form (new queries over cached keys)."""

import pytest
import torch
from torch.nn import functional as F

from ksa_rec.ops.pointwise import pointwise_attention
from ksa_rec.utils.jagged import lengths_to_offsets

H, D = 3, 5


def _loop(q, k, v, q_offsets, q_pos, k_offsets, k_pos, bias, normalizer):
    """Query by query, key by key: sum over same-user keys at or before the query of silu(q.k + bias) v / N."""
    out = torch.zeros_like(q)
    for b in range(q_offsets.numel() - 1):
        for i in range(int(q_offsets[b]), int(q_offsets[b + 1])):
            for j in range(int(k_offsets[b]), int(k_offsets[b + 1])):
                d = int(q_pos[i] - k_pos[j])
                if d < 0:
                    continue
                w = F.silu((q[i] * k[j]).sum(-1) + bias[:, min(d, bias.shape[1] - 1)])  # [H]
                out[i] = out[i] + w[:, None] * v[j] / normalizer
    return out


def _jagged(lengths, start):
    """Rows of users with ``lengths``, absolute positions from ``start[b]`` on."""
    offsets = lengths_to_offsets(torch.tensor(lengths))
    pos = torch.cat([torch.arange(s, s + n) for s, n in zip(start, lengths)]).long()
    return offsets, pos


@pytest.mark.parametrize("max_distance", [1, 4, 64])
def test_training_form_matches_the_loop_forward_and_backward(max_distance):
    g = torch.Generator().manual_seed(max_distance)
    lengths, start = [7, 0, 1, 12, 3], [0, 5, 40, 17, 2]
    offsets, pos = _jagged(lengths, start)
    T = int(offsets[-1])
    q, k, v = (torch.randn(T, H, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(H, max_distance, generator=g, dtype=torch.float64, requires_grad=True)
    got = pointwise_attention(q, k, v, offsets, pos, offsets, pos, bias, normalizer=7.0)
    want = _loop(q, k, v, offsets, pos, offsets, pos, bias, 7.0)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (q, k, v, bias), grad)
    want_grads = torch.autograd.grad(want, (q, k, v, bias), grad)
    for name, a, b in zip("qkvb", got_grads, want_grads):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"d{name}: {m}")


def test_step_form_equals_the_training_rows_of_the_new_events():
    """Queries = each user's newest events, keys = all its events (cached, then new): the training pass's rows."""
    g = torch.Generator().manual_seed(0)
    lengths, new = [9, 4, 0, 6], [2, 0, 0, 6]
    offsets, pos = _jagged(lengths, [3, 0, 0, 11])
    T = int(offsets[-1])
    q, k, v = (torch.randn(T, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(H, 5, generator=g, dtype=torch.float64)
    full = pointwise_attention(q, k, v, offsets, pos, offsets, pos, bias, normalizer=3.0)
    rows = torch.cat([torch.arange(int(offsets[b + 1]) - m, int(offsets[b + 1])) for b, m in enumerate(new)]).long()
    q_offsets = lengths_to_offsets(torch.tensor(new))
    step = pointwise_attention(q[rows], k, v, q_offsets, pos[rows], offsets, pos, bias, normalizer=3.0)
    torch.testing.assert_close(step, full[rows])


def test_no_queries_or_no_keys_give_zeros():
    q = torch.randn(3, H, D)
    offsets = torch.tensor([0, 3])
    none = torch.zeros(0, H, D)
    out = pointwise_attention(q, none, none, offsets, torch.arange(3), torch.tensor([0, 0]), torch.zeros(0).long(),
                              torch.zeros(H, 2), normalizer=1.0)
    assert out.shape == q.shape and not out.any()
    empty = pointwise_attention(none, q, q, torch.tensor([0, 0]), torch.zeros(0).long(), offsets, torch.arange(3),
                                torch.zeros(H, 2), normalizer=1.0)
    assert empty.shape == (0, H, D)

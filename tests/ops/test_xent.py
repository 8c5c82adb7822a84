"""``ksa_rec.ops.xent``: the sampled-softmax cross-entropy kernel against its torch peer.

CPU: the kernels run under the Triton interpreter (``tests/conftest.py``); CUDA: compiled. Row and negative
counts that are not multiples of the tiles, accidental hits (a negative equal to the row's target, several
times, and rows whose every negative is a hit), logQ correction on and off, a temperature, and logits in
float32 and bf16. Forward and both gradients against the peer in float64.
"""

from __future__ import annotations

import pytest
import torch

from ksa_rec.modules.losses import LossConfig, full_cross_entropy, sampled_softmax
from ksa_rec.ops.xent import sampled_cross_entropy, sampled_cross_entropy_reference
from ksa_rec.ops.xent.triton_xent import sampled_cross_entropy_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(rows: int, negatives: int, dtype, with_counts: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(2, 40, (rows,), generator=g)
    neg_ids = torch.randint(2, 40, (negatives,), generator=g)  # a small catalogue: many accidental hits
    if rows > 2:
        targets[1] = neg_ids[0]
        if negatives > 3:
            neg_ids[3] = neg_ids[0]  # the same hit twice in one row
    pos = (torch.randn(rows, generator=g) * 3).to(DEVICE).requires_grad_()
    neg = (torch.randn(rows, negatives, generator=g) * 3).to(dtype).to(DEVICE).requires_grad_()
    counts = torch.log(torch.rand(negatives, generator=g) + 0.1).to(DEVICE) if with_counts else None
    return pos, neg, neg_ids.to(DEVICE), targets.to(DEVICE), counts


@pytest.mark.parametrize("rows,negatives", [(1, 1), (5, 130), (37, 257), (70, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_counts,temperature", [(True, 1.0), (False, 0.07), (True, 0.5)])
def test_kernel_matches_the_reference_forward_and_backward(rows, negatives, dtype, with_counts, temperature):
    pos, neg, neg_ids, targets, counts = _case(rows, negatives, dtype, with_counts, rows * 7 + negatives)
    loss = sampled_cross_entropy_triton(pos, neg, neg_ids, targets, counts, temperature)
    d_pos, d_neg = torch.autograd.grad(loss, [pos, neg])
    pos64, neg64 = pos.detach().double().requires_grad_(), neg.detach().double().requires_grad_()
    want = sampled_cross_entropy_reference(pos64, neg64, neg_ids, targets, None if counts is None else counts.double(),
                                           temperature)
    want_pos, want_neg = torch.autograd.grad(want, [pos64, neg64])
    assert loss.dtype == torch.float32 and d_neg.dtype == neg.dtype
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_pos.double(), want_pos, rtol=1e-4, atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 2e-2 / rows  # bf16 gradients round to 8 bits
    torch.testing.assert_close(d_neg.double(), want_neg, rtol=1e-2 if dtype == torch.bfloat16 else 1e-4, atol=tol)
    hits = neg_ids[None, :] == targets[:, None]
    assert torch.equal(d_neg[hits], torch.zeros_like(d_neg[hits]))


def test_a_row_whose_every_negative_is_a_hit_has_zero_loss():
    pos = torch.tensor([0.3, -1.0], device=DEVICE, requires_grad=True)
    neg = torch.randn(2, 3, device=DEVICE, requires_grad=True)
    neg_ids = torch.tensor([5, 5, 5], device=DEVICE)
    targets = torch.tensor([5, 6], device=DEVICE)
    kernel = sampled_cross_entropy_triton(pos, neg, neg_ids, targets, None)
    peer = sampled_cross_entropy_reference(pos, neg, neg_ids, targets, None)
    torch.testing.assert_close(kernel, peer)
    row0 = torch.logsumexp(torch.cat([pos[1:2], neg[1]]), 0) - pos[1]  # row 0 contributes 0
    torch.testing.assert_close(kernel, row0 / 2)


def test_the_dispatcher_and_the_loss_config():
    pos, neg, neg_ids, targets, counts = _case(9, 33, torch.float32, True, 3)
    for backend in ("torch", "triton"):
        got = sampled_cross_entropy(pos, neg, neg_ids, targets, counts, 1.0, backend)
        torch.testing.assert_close(got, sampled_cross_entropy_reference(pos, neg, neg_ids, targets, counts))
    with pytest.raises(ValueError, match="loss.backend"):
        LossConfig(kind="sampled", backend="flex")


def _head_case(num_items: int, rows: int, seed: int):
    """An item table, states and targets (never a reserved id), the first two with gradients."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(num_items, 16, generator=g).to(DEVICE).requires_grad_()
    hidden = torch.randn(rows, 16, generator=g).to(DEVICE).requires_grad_()
    return table, hidden, torch.randint(2, num_items, (rows,), generator=g).to(DEVICE)


def _same_on_both_backends(loss_of, wrt) -> list[tuple]:
    """``loss_of(backend)`` on torch and on the kernel: the same value and gradients of ``wrt``; returns both."""
    results = []
    for backend in ("torch", "triton"):
        loss = loss_of(backend)
        results.append((loss, *torch.autograd.grad(loss, wrt)))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    return results


@pytest.mark.parametrize("in_batch", [True, False])
def test_sampled_softmax_trains_the_same_on_either_backend(in_batch):
    """The model's loss (in-batch and uniform negatives, logQ correction): same value and gradients for the
    states and the item table with the kernel as with torch."""
    table, hidden, targets = _head_case(50, 23, 0)

    def loss_of(backend):
        cfg = LossConfig(kind="sampled", num_uniform_negatives=37, in_batch_negatives=in_batch, backend=backend)
        draws = torch.Generator(device=DEVICE).manual_seed(5)
        return sampled_softmax(hidden, targets, lambda ids: table[ids], 50, cfg, None, draws)

    _same_on_both_backends(loss_of, [hidden, table])


@pytest.mark.parametrize("temperature", [1.0, 0.2])
def test_full_cross_entropy_is_the_same_on_the_kernel(temperature):
    """The full-catalogue loss on the kernel (the target's score as the positive, the reserved ids never counted)
    against torch's cross-entropy over the catalogue: value and the gradients of the states and the item table."""
    table, hidden, targets = _head_case(131, 29, 1)
    results = _same_on_both_backends(
        lambda backend: full_cross_entropy(hidden, table, targets, temperature, backend=backend), [hidden, table])
    kernel_table_grad = results[1][2]
    assert torch.equal(kernel_table_grad[:2], torch.zeros_like(kernel_table_grad[:2]))  # reserved rows: none

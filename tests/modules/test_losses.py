"""Losses over the tied head."""

import pytest
import torch
import torch.nn.functional as F

from ksa_rec.modules.losses import LossConfig, full_cross_entropy, sampled_softmax


def test_full_ce_excludes_reserved_ids():
    torch.manual_seed(0)
    hidden, weight = torch.randn(5, 4), torch.randn(9, 4)
    targets = torch.tensor([2, 3, 8, 5, 2])
    manual = F.cross_entropy((hidden @ weight[2:].t()), targets - 2)
    assert torch.allclose(full_cross_entropy(hidden, weight, targets), manual, atol=1e-6)


def test_sampled_softmax_with_logq_estimates_full_softmax():
    # With many uniform draws and the logQ correction, the sampled loss converges to the full one.
    torch.manual_seed(0)
    hidden, weight = torch.randn(6, 4), torch.randn(14, 4)
    targets = torch.tensor([2, 3, 13, 5, 2, 9])
    cfg = LossConfig(kind="sampled", num_uniform_negatives=200_000, in_batch_negatives=False)
    gen = torch.Generator().manual_seed(1)
    sampled = sampled_softmax(hidden, targets, weight.__getitem__, 14, cfg, None, generator=gen)
    full = full_cross_entropy(hidden, weight, targets)
    assert abs(float(sampled) - float(full)) < 0.02 * float(full)
    # Without the correction the estimate is far off (the negatives' mass is inflated ~U/N times).
    biased = sampled_softmax(hidden, targets, weight.__getitem__, 14,
                             LossConfig(kind="sampled", num_uniform_negatives=200_000,
                                        in_batch_negatives=False, logq_correction=False), None, generator=gen)
    assert float(biased) > float(full) + 5


def test_accidental_hits_are_masked():
    # Every negative equals the row's positive: nothing is left to compete, the loss is exactly zero.
    hidden, weight = torch.randn(3, 4), torch.randn(6, 4)
    targets = torch.tensor([4, 4, 4])
    cfg = LossConfig(kind="sampled", num_uniform_negatives=0, in_batch_negatives=True)
    assert float(sampled_softmax(hidden, targets, weight.__getitem__, 6, cfg, torch.full((6,), 1 / 6))) == 0.0


def test_in_batch_logq_uses_item_frequency():
    # A popular item's logit is pushed down more than a rare one's: compare against a manual loss.
    hidden, weight = torch.randn(2, 4), torch.randn(5, 4)
    targets = torch.tensor([2, 3])
    prob = torch.tensor([0.0, 0.0, 0.8, 0.1, 0.1])
    cfg = LossConfig(kind="sampled", num_uniform_negatives=0, in_batch_negatives=True)
    scores = hidden @ weight[targets].t()  # [row, candidate]: candidate 0 is item 2, candidate 1 item 3
    # row 0: positive item 2 uncorrected; negative item 3 corrected by log(batch * p(3)) = log(0.2)
    # row 1: positive item 3 uncorrected; negative item 2 corrected by log(2 * 0.8)
    row0 = torch.stack([scores[0, 0], scores[0, 1] - torch.log(torch.tensor(0.2))])
    row1 = torch.stack([scores[1, 1], scores[1, 0] - torch.log(torch.tensor(1.6))])
    manual = F.cross_entropy(torch.stack([row0, row1]), torch.zeros(2, dtype=torch.long))
    assert torch.allclose(sampled_softmax(hidden, targets, weight.__getitem__, 5, cfg, prob), manual, atol=1e-6)


def test_label_smoothing_spreads_mass_over_real_items_only():
    torch.manual_seed(0)
    hidden, weight = torch.randn(5, 8), torch.randn(12, 8)
    targets = torch.tensor([2, 5, 11, 3, 7])
    eps = 0.2
    real = (hidden @ weight.t())[:, 2:]  # the reserved ids (PAD, OOV) are not items
    want = F.cross_entropy(real, targets - 2, label_smoothing=eps)
    assert torch.allclose(full_cross_entropy(hidden, weight, targets, label_smoothing=eps), want, atol=1e-6)
    assert torch.isfinite(full_cross_entropy(hidden, weight, targets, label_smoothing=eps))


def test_label_smoothing_needs_full_ce():
    with pytest.raises(ValueError, match="loss.label_smoothing"):
        LossConfig(kind="sampled", label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss.label_smoothing"):
        LossConfig(label_smoothing=1.0)

"""The item head's similarity (``loss.similarity``): the loss, evaluation ranks and serving all score items
through ``SeqRecModel.head``."""

import pytest
import torch
import torch.nn.functional as F

from ksa_rec.data.batch import SequenceBatch
from ksa_rec.data.schema import DataSpec
from ksa_rec.models.ranking import target_ranks
from ksa_rec.models.seqrec import SeqRecModel
from ksa_rec.modules.config import EncoderConfig
from ksa_rec.modules.losses import LossConfig
from ksa_rec.training.sharding import require_shardable_loss

ENCODER = EncoderConfig(dim=4, num_heads=1, pattern="full", chunk_size=2, window=1)
NUM_ITEMS = 9


def _model(**loss) -> SeqRecModel:
    torch.manual_seed(0)
    return SeqRecModel(ENCODER, LossConfig(**loss), DataSpec(num_items=NUM_ITEMS))


def _batch_with_targets(targets: list[int]) -> SequenceBatch:
    n = len(targets)
    return SequenceBatch(features=None, offsets=torch.tensor([0, n]), positions=torch.arange(n), max_len=n,
                         user_index=torch.zeros(1, dtype=torch.long), targets=torch.tensor(targets))


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_full_ce_scores_by_the_similarity_asked_for(similarity, monkeypatch):
    model = _model(similarity=similarity, temperature=0.1)
    hidden = torch.randn(4, 4) * 3
    monkeypatch.setattr(model, "encode", lambda batch, summaries=None: hidden)
    targets = [3, 0, 8, 2]  # event 1 has no target
    weight = model.item_weight.detach()
    if similarity == "cosine":
        scores = F.normalize(hidden, dim=-1) @ F.normalize(weight, dim=-1).t()
    else:
        scores = hidden @ weight.t()
    rows = [0, 2, 3]
    want = F.cross_entropy(scores[rows][:, 2:] / 0.1, torch.tensor(targets)[rows] - 2)
    assert torch.allclose(model.loss(_batch_with_targets(targets)), want, atol=1e-5)


def test_sampled_softmax_candidates_are_unit_length_under_cosine(monkeypatch):
    # in-batch negatives only: deterministic; each row's candidates are the batch's targets.
    model = _model(similarity="cosine", temperature=0.05, kind="sampled", num_uniform_negatives=0,
                   logq_correction=False)
    hidden = torch.randn(3, 4) * 5
    monkeypatch.setattr(model, "encode", lambda batch, summaries=None: hidden)
    targets = torch.tensor([2, 5, 7])
    cos = F.normalize(hidden, dim=-1) @ F.normalize(model.item_weight.detach()[targets], dim=-1).t()
    want = F.cross_entropy(cos / 0.05, torch.arange(3))
    assert torch.allclose(model.loss(_batch_with_targets(targets.tolist())), want, atol=1e-4)


def test_cosine_ranks_by_angle_not_length():
    """Item 2 is long but off the user's direction: dot ranks it first, cosine last."""
    model = _model(similarity="cosine")
    with torch.no_grad():
        model.item_weight.zero_()
        model.item_weight[2:5] = torch.tensor([[10.0, 10.0, 0, 0], [1.0, 0.1, 0, 0], [0.5, 0.2, 0, 0]])
        model.item_weight[5:] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # orthogonal to the user
    user = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    targets = torch.tensor([2])
    assert target_ranks(*model.head(user), targets, None, None).tolist() == [2]  # after items 3 and 4
    assert target_ranks(user, model.item_weight, targets, None, None).tolist() == [0]  # dot: first
    queries, items = model.head(user * 7)
    assert torch.allclose(queries.norm(dim=-1), torch.ones(1))
    assert torch.allclose(items[2:].norm(dim=-1), torch.ones(NUM_ITEMS - 2))


def test_dot_head_is_the_raw_vectors():
    model = _model()
    user = torch.randn(2, 4)
    queries, items = model.head(user)
    assert queries is user and items is model.item_weight


def test_similarity_is_validated_and_sharding_refuses_cosine():
    with pytest.raises(ValueError, match="loss.similarity: must be 'dot' or 'cosine', got 'angle'"):
        LossConfig(similarity="angle")
    with pytest.raises(ValueError, match="loss.similarity: 'cosine' is not supported with sharded item tables"):
        require_shardable_loss(LossConfig(kind="sampled", similarity="cosine"))
    require_shardable_loss(LossConfig(kind="sampled"))  # dot: accepted

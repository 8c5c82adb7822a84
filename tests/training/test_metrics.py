"""Full-catalogue ranking metrics and the seen-items setting against hand-computed examples."""

import math

import pytest
import torch

from ksa_rec.data.batch import SequenceBatch
from ksa_rec.data.schema import DataSpec
from ksa_rec.models.ranking import UNRANKED, target_ranks
from ksa_rec.modules.config import EncoderConfig
from ksa_rec.training.metrics import RankingMetrics, rank_metrics
from ksa_rec.training.module import EvalConfig, RecModule
from ksa_rec.utils.jagged import lengths_to_offsets

# Scores of items 2..6 for a user vector [1, 0]: 0.9, 0.5, 0.7, 0.1, 0.8 (ids 0, 1 are PAD/OOV).
ITEMS = torch.tensor([[5.0, 0.0], [4.0, 0.0], [0.9, 0.0], [0.5, 0.0], [0.7, 0.0], [0.1, 0.0], [0.8, 0.0]])


@pytest.mark.parametrize("item_chunk", [1, 2, 3, 100])
def test_ranks_mask_seen_reserved_and_target(item_chunk):
    users = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    targets = torch.tensor([3, 2, 5])
    # user 0 has seen item 6 (0.8) -> masked; eligible above 0.5: items 2 (0.9) and 4 (0.7) -> rank 2.
    # user 1: target 2 is the best eligible item -> rank 0 (PAD/OOV score 5 and 4 but are reserved).
    # user 2: has seen 2, 4 and its own target 5 earlier: the target is masked with them -> unranked.
    # (Exempting it from its own mask, as this code once did, gave rank 2: items 3, 6 above 0.1.)
    seen_values = torch.tensor([6, 2, 4, 5])
    seen_offsets = torch.tensor([0, 1, 1, 4])
    ranks = target_ranks(users, ITEMS, targets, seen_values, seen_offsets, item_chunk=item_chunk)
    assert ranks.tolist() == [2, 0, UNRANKED]


def test_ties_count_against_the_model():
    items = torch.tensor([[0.0], [0.0], [1.0], [1.0], [1.0]])
    ranks = target_ranks(torch.tensor([[1.0]]), items, torch.tensor([3]), None, None)
    assert ranks.tolist() == [2]


def test_metric_values_from_ranks():
    m = rank_metrics(torch.tensor([0, 2, 7, 30]))
    assert m["hr@5"].tolist() == [1, 1, 0, 0]
    assert m["hr@10"].tolist() == [1, 1, 1, 0]
    assert m["ndcg@5"].tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert m["ndcg@10"].tolist() == pytest.approx([1.0, 0.5, 1 / math.log2(9), 0.0])
    assert m["mrr"].tolist() == pytest.approx([1.0, 1 / 3, 1 / 8, 1 / 31])


def test_an_unranked_target_is_a_miss_everywhere():
    m = rank_metrics(torch.tensor([UNRANKED, 0]))
    assert {name: values[0].item() for name, values in m.items()} == {name: 0.0 for name in m}
    assert m["hr@5"][1] == 1.0 and m["mrr"][1] == 1.0


# Hand-built seen-items case. Items 2..7 score 0.9, 0.8, 0.7, 0.6, 0.5, 0.4 for the user vector [1, 0, ...].
SEEN_ITEMS_CASE = {  # name: (history before the target, target)
    "repeat target": ([3, 5], 3),
    "target seen twice": ([4, 2, 4], 4),
    "target never seen": ([2, 3], 5),
}
EXPECTED_RANKS = {
    # mask: a consumed target is removed with the rest of the history (a miss); the new one ranks after 4.
    "mask": [UNRANKED, UNRANKED, 1],
    # keep: nothing masked; 3 ranks after 2; 4 after 2, 3; 5 after 2, 3, 4.
    "keep": [1, 2, 3],
}


@pytest.mark.parametrize("seen_items", ["mask", "keep"])
def test_seen_items_setting_decides_what_evaluation_ranks(seen_items, monkeypatch):
    module = RecModule(encoder=EncoderConfig(dim=4, num_heads=1, pattern="full", chunk_size=2, window=1),
                       eval=EvalConfig(seen_items=seen_items, item_chunk=4), data_spec=DataSpec(num_items=8))
    with torch.no_grad():
        module.model.item_weight.zero_()
        module.model.item_weight[2:, 0] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    histories = [history for history, _ in SEEN_ITEMS_CASE.values()]
    lengths = torch.tensor([len(h) for h in histories])
    offsets = lengths_to_offsets(lengths)
    # Every event's state is the user vector [1, 0, 0, 0]: the ranks depend on the masking only.
    monkeypatch.setattr(module.model, "encode", lambda batch: torch.eye(4)[0].expand(int(offsets[-1]), 4))
    batch = SequenceBatch(features=None, offsets=offsets, positions=torch.zeros(0), max_len=3,
                          user_index=torch.arange(3), eval_rows=offsets[1:] - 1,
                          eval_targets=torch.tensor([target for _, target in SEEN_ITEMS_CASE.values()]),
                          seen_values=torch.tensor([i for h in histories for i in h]), seen_offsets=offsets)
    assert module._ranks(batch).tolist() == EXPECTED_RANKS[seen_items]
    hits = rank_metrics(module._ranks(batch))["hr@5"].tolist()
    assert hits == ([0.0, 0.0, 1.0] if seen_items == "mask" else [1.0, 1.0, 1.0])
    assert module.protocol() == {"seen_items": seen_items}


def test_seen_items_setting_is_validated():
    with pytest.raises(ValueError, match="model.eval.seen_items: must be one of mask, keep, got 'exempt'"):
        EvalConfig(seen_items="exempt")


def test_accumulator_means_groups_and_ci():
    metric = RankingMetrics(groups=("near", "far"))
    metric.update(torch.tensor([0, 2]), torch.tensor([0, 1]))
    metric.update(torch.tensor([7, 30]), torch.tensor([1, -1]))
    out = metric.compute()
    assert out["hr@10"] == pytest.approx(0.75)
    assert out["targets"] == 4
    assert out["near/hr@5"] == 1.0 and out["near/targets"] == 1
    assert out["far/ndcg@5"] == pytest.approx(0.25) and out["far/targets"] == 2
    # 95% CI half-width of HR@10 over values (1, 1, 1, 0): 1.96 * sqrt(0.1875 / 3)
    assert out["hr@10_ci95"] == pytest.approx(1.96 * math.sqrt(0.1875 / 3))


def test_accumulator_counts_each_target_once_per_group_family():
    # Groups (near, far | short, long): the first family indexes 0-1, the second 2-3.
    metric = RankingMetrics(groups=("near", "far", "short", "long"))
    metric.update(torch.tensor([0, 2, 30]), torch.tensor([0, -1, 1]), torch.tensor([2, 3, 3]))
    out = metric.compute()
    assert out["targets"] == 3
    assert out["near/targets"] == 1 and out["far/targets"] == 1
    assert out["short/targets"] == 1 and out["long/targets"] == 2
    assert out["long/hr@5"] == pytest.approx(0.5) and out["short/hr@5"] == 1.0

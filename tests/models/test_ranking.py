"""The shared ranking walk (ksa_rec.models.ranking) against brute force over the whole score matrix.

Embeddings are small integers, so every score is exact in float32 and ties are real ties whatever the
chunking: the chunked walk must then agree with brute force exactly.
"""

import pytest
import torch

from ksa_rec.models.ranking import UNRANKED, target_ranks, topk_items
from ksa_rec.utils.jagged import lengths_to_offsets

NUM_ITEMS, DIM = 23, 3  # 21 real items (ids 2..22)


def _case(seed: int):
    """User vectors, an item table with duplicated rows (exact ties), targets, and per-user exclusions: the
    first user excludes nothing, the second all but three items, the third includes its own target."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(-3, 4, (NUM_ITEMS, DIM), generator=g).float()
    items[10:14] = items[5]  # four copies of item 5: ties
    users = torch.randint(-3, 4, (5, DIM), generator=g).float()
    targets = torch.tensor([5, 4, 12, 7, 20])
    excluded = [[], [i for i in range(2, NUM_ITEMS) if i not in (4, 9, 17)], [3, 12, 12, 8],
                torch.randint(2, NUM_ITEMS, (6,), generator=g).tolist(), [2, 21]]
    values = torch.tensor([i for row in excluded for i in row], dtype=torch.int64)
    offsets = lengths_to_offsets(torch.tensor([len(row) for row in excluded]))
    return users, items, targets, excluded, values, offsets


def _eligible(excluded_row: list[int]) -> list[int]:
    return [i for i in range(2, NUM_ITEMS) if i not in set(excluded_row)]


@pytest.mark.parametrize("item_chunk", [1, 4, 7, 100])
@pytest.mark.parametrize("seed", [0, 1])
def test_target_ranks_match_brute_force(item_chunk, seed):
    users, items, targets, excluded, values, offsets = _case(seed)
    scores = users @ items.t()
    expected = []
    for b, target in enumerate(targets.tolist()):
        if target in excluded[b]:
            expected.append(UNRANKED)  # removed from its own ranking
        else:
            expected.append(sum(1 for i in _eligible(excluded[b]) if i != target and scores[b, i] >= scores[b, target]))
    ranks = target_ranks(users, items, targets, values, offsets, item_chunk=item_chunk)
    assert ranks.tolist() == expected
    assert expected[2] == UNRANKED and expected[0] != UNRANKED
    # Without exclusions every target is ranked among all other real items.
    free = target_ranks(users, items, targets, None, None, item_chunk=item_chunk)
    assert free.tolist() == [sum(1 for i in range(2, NUM_ITEMS) if i != t and scores[b, i] >= scores[b, t])
                             for b, t in enumerate(targets.tolist())]


def test_ties_count_against_the_model():
    users, items, targets, *_ = _case(0)
    ranks = target_ranks(users[:1], items, targets[:1], None, None, item_chunk=3)
    scores, target_score = users[0] @ items[2:].t(), users[0] @ items[5]
    ahead, tied = int((scores > target_score).sum()), int((scores == target_score).sum()) - 1
    assert tied >= 4  # its four copies at least
    assert ranks.item() == ahead + tied  # every item tied with the target counts as ahead of it


@pytest.mark.parametrize("item_chunk", [1, 4, 7, 100])
@pytest.mark.parametrize("k", [1, 5, 30])
def test_topk_matches_brute_force(item_chunk, k):
    users, items, _, excluded, values, offsets = _case(0)
    scores = users @ items.t()
    top_scores, top_ids = topk_items(users, items, k, values, offsets, item_chunk=item_chunk)
    assert top_scores.shape == top_ids.shape == (5, min(k, NUM_ITEMS - 2))
    for b in range(5):
        eligible = _eligible(excluded[b])
        best = sorted((float(scores[b, i]) for i in eligible), reverse=True)[:k]
        filled = len(best)
        assert top_scores[b, :filled].tolist() == best
        ids = top_ids[b, :filled].tolist()
        assert len(set(ids)) == filled and set(ids) <= set(eligible)
        assert [float(scores[b, i]) for i in ids] == best  # each id has the score it is listed with
        # More requested than eligible (k = 30, or the user who excluded all but three): -inf and PAD.
        assert torch.all(torch.isneginf(top_scores[b, filled:])) and torch.all(top_ids[b, filled:] == 0)
    if k == 30:
        assert top_ids.shape[1] == NUM_ITEMS - 2 and (top_ids[1] > 0).sum() == 3


def test_topk_without_exclusions_never_offers_pad_or_oov():
    users, items, *_ = _case(1)
    items[:2] = 100.0  # PAD and OOV would win every ranking
    _, ids = topk_items(users.abs() + 1, items, NUM_ITEMS - 2, item_chunk=5)
    assert sorted(ids[0].tolist()) == list(range(2, NUM_ITEMS))

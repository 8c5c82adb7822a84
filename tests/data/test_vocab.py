"""Vocab: first-appearance order, reserved ids, encode/decode, JSON round trip and corrupt input."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from ksa_rec.data.schema import OOV_ID, PAD_ID
from ksa_rec.data.vocab import Vocab
from ksa_rec.errors import DataError


def test_build_keeps_first_appearance_and_reserves_pad_and_oov():
    vocab = Vocab.build(pl.Series(["b", "a", "b", None, "c"]))
    assert (PAD_ID, OOV_ID) == (0, 1)
    assert vocab.raw_ids.to_list() == ["b", "a", "c"]
    assert len(vocab) == 5
    assert "a" in vocab and "z" not in vocab and None not in vocab


def test_build_casts_numbers_to_text():
    assert Vocab.build(pl.Series([3, 1, 3])).raw_ids.to_list() == ["3", "1"]


def test_encode_unknown_and_null_to_oov():
    vocab = Vocab(["b", "a", "c"])
    ids = vocab.encode(pl.Series(["a", "zz", None, "c", "b"]))
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, [3, 1, 1, 4, 2])
    np.testing.assert_array_equal(vocab.encode(["c"]), [4])
    assert vocab.encode([]).shape == (0,)
    ids[0] = 9  # a caller may write into the result
    np.testing.assert_array_equal(Vocab([]).encode(["a"]), [OOV_ID])


def test_decode_maps_reserved_ids_to_none():
    vocab = Vocab(["b", "a"])
    assert vocab.decode(np.array([3, 0, 2, 1])) == ["a", None, "b", None]
    assert vocab.decode([0, 1]) == [None, None]
    assert Vocab([]).decode([1]) == [None]
    with pytest.raises(IndexError, match="id 4 is outside this vocabulary of 4 ids"):
        vocab.decode([2, 4])
    with pytest.raises(IndexError, match="id -1"):
        vocab.decode([-1])


def test_encode_decode_round_trip_large():
    raw = [f"item{i}" for i in range(10_000)]
    vocab = Vocab.build(pl.Series(raw))
    ids = vocab.encode(pl.Series(raw[::-1]))
    np.testing.assert_array_equal(ids, np.arange(10_001, 1, -1))
    assert vocab.decode(ids) == raw[::-1]


def test_dict_round_trip_through_json():
    vocab = Vocab(["x", "ü", "7"])
    again = Vocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert again == vocab and again.raw_ids.to_list() == ["x", "ü", "7"]
    assert vocab != Vocab(["x", "7", "ü"])


@pytest.mark.parametrize("payload, problem", [
    ([], "expected a JSON object, got list"),
    ({"kind": "other", "version": 1, "ids": []}, "'kind' is 'other', expected 'ksa_rec.Vocab'"),
    ({"kind": "ksa_rec.Vocab", "version": 99, "ids": []}, "'version' is 99, this code reads version 1"),
    ({"kind": "ksa_rec.Vocab", "version": 1}, "'ids' must be a list of strings"),
    ({"kind": "ksa_rec.Vocab", "version": 1, "ids": ["a", 2]}, "ids[1] is 2, not a string"),
    ({"kind": "ksa_rec.Vocab", "version": 1, "ids": ["a", "b", "a"]}, "vocabulary ids must be unique; repeated: 'a'"),
])
def test_from_dict_rejects_corrupt_input(payload, problem):
    with pytest.raises(DataError) as info:
        Vocab.from_dict(payload, source="vocab_items.json")
    assert str(info.value) == f"vocab_items.json: corrupt vocabulary: {problem}"


def test_constructor_rejects_null_and_repeated_ids():
    with pytest.raises(ValueError, match="null"):
        Vocab(["a", None])
    with pytest.raises(ValueError, match="unique"):
        Vocab(["a", "a"])

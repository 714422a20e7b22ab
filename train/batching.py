"""Length buckets: which examples go into which fixed-shape batch, for every job.

A job's examples have token lengths `lengths [n]`. Every batch has `batch_size` rows and a sequence length
taken from a short list of buckets (e.g. 64, 128, 256, 512), so a jitted step compiles once per bucket, never
per batch; each example goes to the smallest bucket that holds it. This module only plans: a plan is a list of
`(seq_len, rows)` with `rows [batch_size]` example indices, -1 for a padding row (the last batch of a bucket
is short). The job gathers its own arrays for a plan entry (train/glue/pipeline.py, train/nlg/train.py).

Train order: per epoch, a permutation from `np.random.default_rng((seed, epoch))` is cut into batches per
bucket and the batches are shuffled with the same generator, so batch k of epoch e depends only on
(seed, e, k), and a run resumed at `start_step` sees the same batches as an uninterrupted one. Nothing is
dropped: an epoch of `train_plan` and one `eval_plan` hold every example exactly once.
"""

import math
from collections.abc import Iterator, Sequence

import numpy as np

Plan = list[tuple[int, np.ndarray]]


def bucket_lengths(length_buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The sorted bucket lengths below `max_length`, plus `max_length` itself (the last bucket)."""
    if max_length <= 0 or any(int(b) <= 0 for b in length_buckets):
        raise ValueError(f"length buckets {tuple(length_buckets)} and max_length {max_length} must be positive")
    return tuple(sorted({int(b) for b in length_buckets if b < max_length} | {int(max_length)}))


def _bucket_ids(lengths: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """[n] index of the smallest bucket >= each length."""
    ids = np.searchsorted(np.asarray(buckets), lengths, side="left")
    if lengths.size and ids.max() >= len(buckets):
        raise ValueError(f"an example has {lengths.max()} tokens, more than the largest bucket {buckets[-1]}")
    return ids


def _plan(lengths: np.ndarray, buckets: Sequence[int], batch_size: int, order: np.ndarray) -> Plan:
    """(seq_len, [batch_size] example indices, -1 = padding) for `order` cut into batches per bucket."""
    bucket_of = _bucket_ids(lengths, buckets)
    plan = []
    for b, seq_len in enumerate(buckets):
        members = order[bucket_of[order] == b]
        for start in range(0, len(members), batch_size):
            rows = np.full(batch_size, -1, np.int64)
            chunk = members[start : start + batch_size]
            rows[: len(chunk)] = chunk
            plan.append((int(seq_len), rows))
    return plan


def steps_per_epoch(lengths: np.ndarray, buckets: Sequence[int], batch_size: int) -> int:
    """Batches in one epoch (= in one `eval_plan`): the sum over buckets of ceil(n_b / batch_size).

    Args:
      lengths: [n] token counts of the examples.
      buckets: sequence lengths, from `bucket_lengths`.
      batch_size: rows per batch.
    """
    counts = np.bincount(_bucket_ids(np.asarray(lengths), buckets), minlength=len(buckets))
    return int(sum(math.ceil(c / batch_size) for c in counts))


def epoch_plan(lengths: np.ndarray, buckets: Sequence[int], batch_size: int, seed: int, epoch: int) -> Plan:
    """The shuffled batches of one train epoch."""
    lengths = np.asarray(lengths)
    rng = np.random.default_rng((seed, epoch))
    plan = _plan(lengths, buckets, batch_size, rng.permutation(len(lengths)))
    return [plan[i] for i in rng.permutation(len(plan))]


def train_plan(
    lengths: np.ndarray, *, batch_size: int, buckets: Sequence[int], seed: int, start_step: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """Endless shuffled train batches, epoch after epoch, beginning at global step `start_step`.

    Yields:
      (seq_len, rows [batch_size]); step s is batch s % steps_per_epoch of epoch s // steps_per_epoch.

    Raises:
      ValueError: no examples.
    """
    per_epoch = steps_per_epoch(lengths, buckets, batch_size)
    if per_epoch == 0:
        raise ValueError("the train split is empty")
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        yield from epoch_plan(lengths, buckets, batch_size, seed, epoch)[skip:]
        epoch, skip = epoch + 1, 0


def eval_plan(lengths: np.ndarray, *, batch_size: int, buckets: Sequence[int]) -> Plan:
    """One pass over every example exactly once (bucket by bucket, in index order)."""
    lengths = np.asarray(lengths)
    return _plan(lengths, buckets, batch_size, np.arange(len(lengths)))

"""Batch plans: which examples go into which padded batch, for every job; two modes.

A job's examples have token lengths `lengths [n]`. A plan is a list of `(seq_len, rows)` with
`rows [batch_size]` example indices, -1 for a padding row (a short last batch). This module only plans; the
job gathers its own arrays for a plan entry (train/glue/pipeline.py, train/nlg/train.py).

- "buckets": every batch takes its sequence length from a short list of buckets (e.g. 64, 128, 256, 512),
  so a jitted step compiles once per bucket; each example goes to the smallest bucket that holds it.
- "length_grouped": Hugging Face's `group_by_length=True` (transformers `get_length_grouped_indices`): an
  epoch's permutation is cut into megabatches of `megabatch` x batch_size examples (fewer on a small split:
  as HF, min(n // (4 batch_size), megabatch) x batch_size, at least one batch), each megabatch is sorted by
  length, longest first, and cut into batches. A batch's seq_len is its longest row rounded up to a multiple
  of `pad_multiple`, capped at max_length, so at most ceil(max_length / pad_multiple) shapes (compiles) occur.

Train order: per epoch, a permutation from `np.random.default_rng((seed, epoch))` is cut into batches and the
batches are shuffled with the same generator, so batch k of epoch e depends only on (seed, e, k), and a run
resumed at `start_step` sees the same batches as an uninterrupted one. Nothing is dropped: an epoch of
`train_plan` and one `eval_plan` hold every example exactly once. Functions take `buckets` as either the bucket
lengths (the "buckets" mode) or a `Batching`.
"""

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np

Plan = list[tuple[int, np.ndarray]]
MODES = ("buckets", "length_grouped")


@dataclasses.dataclass(frozen=True)
class Batching:
    """How examples become batches.

    Attributes:
      mode: "buckets" or "length_grouped".
      buckets: the bucket lengths, from `bucket_lengths` (max_length last); length_grouped uses only
        buckets[-1], as the cap on seq_len.
      pad_multiple: length_grouped: a batch's seq_len is a multiple of this (or max_length).
      megabatch: length_grouped: batches per megabatch at most (HF's mega_batch_mult).
    """

    mode: str
    buckets: tuple[int, ...]
    pad_multiple: int = 8
    megabatch: int = 50

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"batching mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if not self.buckets or self.pad_multiple <= 0 or self.megabatch <= 0:
            raise ValueError(f"{self}: buckets must be non-empty, pad_multiple and megabatch positive")

    @property
    def max_length(self) -> int:
        """The longest seq_len of any batch."""
        return self.buckets[-1]

    def describe(self) -> str:
        """One phrase for the run log, e.g. "buckets (64, 128)"."""
        if self.mode == "buckets":
            return f"buckets {self.buckets}"
        return f"length-grouped batches padded to multiples of {self.pad_multiple} up to {self.max_length}"


# Bucket lengths (the "buckets" mode) or a Batching: what every plan function takes as `buckets`.
Buckets = Sequence[int] | Batching


def bucket_lengths(length_buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The sorted bucket lengths below `max_length`, plus `max_length` itself (the last bucket)."""
    if max_length <= 0 or any(int(b) <= 0 for b in length_buckets):
        raise ValueError(f"length buckets {tuple(length_buckets)} and max_length {max_length} must be positive")
    return tuple(sorted({int(b) for b in length_buckets if b < max_length} | {int(max_length)}))


def from_config(config) -> Batching:
    """The Batching of a job config (keys batching, length_buckets, max_length, pad_multiple)."""
    buckets = bucket_lengths(config.length_buckets, config.max_length)
    return Batching(config.batching, buckets, config.pad_multiple)


def _as_batching(buckets: Buckets) -> Batching:
    """A Batching as given, or the "buckets" mode over plain bucket lengths."""
    return buckets if isinstance(buckets, Batching) else Batching("buckets", tuple(int(b) for b in buckets))


def _check_fits(lengths: np.ndarray, max_length: int) -> None:
    """Raises ValueError when an example is longer than `max_length` (length_grouped)."""
    if lengths.size and lengths.max() > max_length:
        raise ValueError(f"an example has {lengths.max()} tokens, more than max_length {max_length}")


def _bucket_ids(lengths: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """[n] index of the smallest bucket >= each length."""
    ids = np.searchsorted(np.asarray(buckets), lengths, side="left")
    if lengths.size and ids.max() >= len(buckets):
        raise ValueError(f"an example has {lengths.max()} tokens, more than the largest bucket {buckets[-1]}")
    return ids


def _rows(chunk: np.ndarray, batch_size: int) -> np.ndarray:
    """[batch_size] `chunk` followed by -1 padding rows."""
    rows = np.full(batch_size, -1, np.int64)
    rows[: len(chunk)] = chunk
    return rows


def _plan(lengths: np.ndarray, buckets: Sequence[int], batch_size: int, order: np.ndarray) -> Plan:
    """(seq_len, [batch_size] example indices, -1 = padding) for `order` cut into batches per bucket."""
    bucket_of = _bucket_ids(lengths, buckets)
    plan = []
    for b, seq_len in enumerate(buckets):
        members = order[bucket_of[order] == b]
        for start in range(0, len(members), batch_size):
            plan.append((int(seq_len), _rows(members[start : start + batch_size], batch_size)))
    return plan


def _padded_length(longest: int, pad_multiple: int, max_length: int) -> int:
    """`longest` (at least 1) rounded up to a multiple of `pad_multiple`, at most `max_length`."""
    return min(max_length, math.ceil(max(longest, 1) / pad_multiple) * pad_multiple)


def _cut(lengths: np.ndarray, order: np.ndarray, batch_size: int, how: Batching) -> Plan:
    """`order` cut into consecutive batches, each padded to its own longest row rounded up (length_grouped)."""
    _check_fits(lengths, how.max_length)
    plan = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        seq_len = _padded_length(int(lengths[chunk].max()), how.pad_multiple, how.max_length)
        plan.append((seq_len, _rows(chunk, batch_size)))
    return plan


def megabatch_size(n: int, batch_size: int, megabatch: int) -> int:
    """Examples per megabatch, as HF: batch_size x min(n // (4 batch_size), megabatch), at least batch_size."""
    return batch_size * max(1, min(n // (4 * batch_size), megabatch))


def _grouped_order(lengths: np.ndarray, batch_size: int, megabatch: int, perm: np.ndarray) -> np.ndarray:
    """[n] `perm` with each megabatch sorted by length, longest first (stable: ties keep `perm` order)."""
    size = megabatch_size(len(perm), batch_size, megabatch)
    parts = [mb[np.argsort(-lengths[mb], kind="stable")] for mb in np.split(perm, range(size, len(perm), size))]
    return np.concatenate(parts)


def steps_per_epoch(lengths: np.ndarray, buckets: Buckets, batch_size: int) -> int:
    """Batches in one epoch (= in one `eval_plan`).

    Args:
      lengths: [n] token counts of the examples.
      buckets: bucket lengths (from `bucket_lengths`) or a Batching.
      batch_size: rows per batch.

    Returns:
      buckets: the sum over buckets of ceil(n_b / batch_size); length_grouped: ceil(n / batch_size).
    """
    how, lengths = _as_batching(buckets), np.asarray(lengths, np.int64)
    if how.mode == "length_grouped":
        _check_fits(lengths, how.max_length)
        return math.ceil(len(lengths) / batch_size)
    counts = np.bincount(_bucket_ids(lengths, how.buckets), minlength=len(how.buckets))
    return int(sum(math.ceil(c / batch_size) for c in counts))


def epoch_plan(lengths: np.ndarray, buckets: Buckets, batch_size: int, seed: int, epoch: int) -> Plan:
    """The shuffled batches of one train epoch (`steps_per_epoch` of them)."""
    how, lengths = _as_batching(buckets), np.asarray(lengths, np.int64)
    rng = np.random.default_rng((seed, epoch))
    perm = rng.permutation(len(lengths))
    if how.mode == "length_grouped":
        plan = _cut(lengths, _grouped_order(lengths, batch_size, how.megabatch, perm), batch_size, how)
    else:
        plan = _plan(lengths, how.buckets, batch_size, perm)
    return [plan[i] for i in rng.permutation(len(plan))]


def train_plan(
    lengths: np.ndarray, *, batch_size: int, buckets: Buckets, seed: int, start_step: int = 0
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


def eval_plan(lengths: np.ndarray, *, batch_size: int, buckets: Buckets) -> Plan:
    """One pass over every example exactly once.

    buckets: bucket by bucket, in index order. length_grouped: all examples sorted by length, longest first
    (stable: ties in index order), cut into batches, each padded to its own rounded-up longest row.
    """
    how, lengths = _as_batching(buckets), np.asarray(lengths, np.int64)
    if how.mode == "length_grouped":
        return _cut(lengths, np.argsort(-lengths, kind="stable"), batch_size, how)
    return _plan(lengths, how.buckets, batch_size, np.arange(len(lengths)))

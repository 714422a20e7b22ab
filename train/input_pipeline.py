"""GLUE examples -> tokenized, length-bucketed numpy batches with a few fixed shapes.

Every batch has `batch_size` rows and a sequence length taken from a short list of buckets (e.g. 64, 128,
256, 512), so a jitted step compiles once per bucket, never per batch. Each example goes to the smallest
bucket that holds it. Batches are dicts of numpy arrays:

  input_ids       [batch, seq] int32   token ids, right-padded with the tokenizer's pad id
  attention_mask  [batch, seq] int32   1 for real tokens, 0 for padding
  token_type_ids  [batch, seq] int32   segment ids; only when the tokenizer produces them (BERT, not RoBERTa)
  labels          [batch]      int32 class ids, or float32 scores for STS-B
  weights         [batch]      float32 1 for real examples, 0 for padding rows
  index           [batch]      int32 example index in the split, -1 for padding rows

A batch short of `batch_size` examples (the last of each bucket) is filled with copies of its first row
carrying weight 0, so padding rows are valid inputs (no all-masked attention rows, no NaN) and any loss or
metric weighted by `weights` ignores them. Nothing is dropped: an epoch of `train_batches` and one pass of
`eval_batches` see every example exactly once.

Train order: per epoch, a permutation from `np.random.default_rng((seed, epoch))` is cut into batches per
bucket and the batches are shuffled with the same generator, so batch k of epoch e depends only on
(seed, e, k), and a run resumed at `start_step` sees the same batches as an uninterrupted one.
"""

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np

from train import glue_data

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A tokenized split (ragged token ids).

    Attributes:
      input_ids: n int32 arrays [length_i].
      token_type_ids: n int32 arrays [length_i], or None when the tokenizer has no token types.
      labels: [n] int32 class ids or float32 scores.
      pad_id: the tokenizer's pad token id.
    """

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray] | None
    labels: np.ndarray
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        """[n] int32 token counts."""
        return np.fromiter((len(x) for x in self.input_ids), np.int32, len(self.input_ids))


def encode(examples: glue_data.Examples, tokenizer, max_length: int, chunk: int = 4096) -> Encoded:
    """Tokenizes `examples` (as pairs where the task has two texts), truncating to `max_length` tokens.

    Args:
      examples: n examples.
      tokenizer: a HF fast tokenizer (called as tokenizer(text_a, text_b, truncation=True, ...)).
      max_length: maximum tokens per example, special tokens included.
      chunk: examples per tokenizer call.

    Returns:
      Encoded with n rows, each [length_i] with length_i <= max_length.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token")
    with_types = "token_type_ids" in tokenizer.model_input_names
    ids, types = [], []
    for start in range(0, len(examples), chunk):
        a = examples.text_a[start : start + chunk]
        b = None if examples.text_b is None else examples.text_b[start : start + chunk]
        out = tokenizer(
            a, b, truncation=True, max_length=max_length, return_attention_mask=False, return_token_type_ids=with_types
        )
        ids += [np.asarray(x, np.int32) for x in out["input_ids"]]
        if with_types:
            types += [np.asarray(x, np.int32) for x in out["token_type_ids"]]
    return Encoded(ids, types if with_types else None, examples.labels, int(tokenizer.pad_token_id))


def load_encoded(config, split: str, tokenizer) -> Encoded:
    """`load_task` + `encode` with the config's task, data_dir, data_source, max_length and example caps.

    `config.max_train_examples` applies to "train", `config.max_eval_examples` to every other split (-1: all).
    """
    cap = config.max_train_examples if split == "train" else config.max_eval_examples
    examples = glue_data.load_task(
        config.task, split, data_dir=config.data_dir or None, source=config.data_source, max_examples=cap
    )
    return encode(examples, tokenizer, config.max_length)


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


def _plan(lengths: np.ndarray, buckets, batch_size: int, order: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(bucket, [batch_size] example indices, -1 = padding) for `order` cut into batches per bucket."""
    bucket_of = _bucket_ids(lengths, buckets)
    plan = []
    for b in range(len(buckets)):
        members = order[bucket_of[order] == b]
        for start in range(0, len(members), batch_size):
            rows = np.full(batch_size, -1, np.int64)
            chunk = members[start : start + batch_size]
            rows[: len(chunk)] = chunk
            plan.append((b, rows))
    return plan


def steps_per_epoch(encoded: Encoded, buckets: Sequence[int], batch_size: int) -> int:
    """Batches in one epoch of `train_batches` (= batches of `eval_batches`): sum over buckets of ceil(n_b / B)."""
    counts = np.bincount(_bucket_ids(encoded.lengths, buckets), minlength=len(buckets))
    return int(sum(math.ceil(c / batch_size) for c in counts))


def epoch_plan(encoded: Encoded, buckets: Sequence[int], batch_size: int, seed: int, epoch: int):
    """The shuffled batches of one train epoch: a list of (bucket index, [batch_size] example indices)."""
    rng = np.random.default_rng((seed, epoch))
    plan = _plan(encoded.lengths, buckets, batch_size, rng.permutation(len(encoded)))
    return [plan[i] for i in rng.permutation(len(plan))]


def make_batch(encoded: Encoded, rows: np.ndarray, seq_len: int) -> Batch:
    """Gathers `rows` (example indices, -1 = padding) into one padded batch of shape [len(rows), seq_len]."""
    real = rows >= 0
    if not real.any():
        raise ValueError("a batch needs at least one real example")
    src = np.where(real, rows, rows[real][0])  # padding rows repeat the first real row, with weight 0
    ids = np.full((len(rows), seq_len), encoded.pad_id, np.int32)
    mask = np.zeros((len(rows), seq_len), np.int32)
    types = None if encoded.token_type_ids is None else np.zeros((len(rows), seq_len), np.int32)
    for r, i in enumerate(src):
        n = len(encoded.input_ids[i])
        ids[r, :n] = encoded.input_ids[i]
        mask[r, :n] = 1
        if types is not None:
            types[r, :n] = encoded.token_type_ids[i]
    batch = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        batch["token_type_ids"] = types
    batch["labels"] = encoded.labels[src]
    batch["weights"] = real.astype(np.float32)
    batch["index"] = np.where(real, rows, -1).astype(np.int32)
    return batch


def train_batches(
    encoded: Encoded, *, batch_size: int, buckets: Sequence[int], seed: int, start_step: int = 0
) -> Iterator[Batch]:
    """Endless shuffled train batches, epoch after epoch, beginning at global step `start_step`.

    Args:
      encoded: the train split.
      batch_size: rows per batch (global batch).
      buckets: sequence lengths, from `bucket_lengths`.
      seed: shuffling seed; epoch e uses np.random.default_rng((seed, e)).
      start_step: the first step to produce (a resumed run passes its restored step).

    Yields:
      Batches as in the module docstring; step s is batch s % steps_per_epoch of epoch s // steps_per_epoch.
    """
    per_epoch = steps_per_epoch(encoded, buckets, batch_size)
    if per_epoch == 0:
        raise ValueError("the train split is empty")
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        for bucket, rows in epoch_plan(encoded, buckets, batch_size, seed, epoch)[skip:]:
            yield make_batch(encoded, rows, buckets[bucket])
        epoch, skip = epoch + 1, 0


def eval_batches(encoded: Encoded, *, batch_size: int, buckets: Sequence[int]) -> Iterator[Batch]:
    """One pass over every example exactly once (bucket by bucket, in index order); padding rows have weight 0."""
    for bucket, rows in _plan(encoded.lengths, buckets, batch_size, np.arange(len(encoded))):
        yield make_batch(encoded, rows, buckets[bucket])

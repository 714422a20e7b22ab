"""GLUE examples -> tokenized, padded numpy batches (the plans of train/batching.py: buckets or length-grouped).

Batches are dicts of numpy arrays:

  input_ids       [batch, seq] int32   token ids, right-padded with the tokenizer's pad id
  attention_mask  [batch, seq] int32   1 for real tokens, 0 for padding
  token_type_ids  [batch, seq] int32   segment ids; only when the tokenizer produces them (BERT, not RoBERTa)
  labels          [batch]      int32 class ids, or float32 scores for STS-B
  weights         [batch]      float32 1 for real examples, 0 for padding rows
  index           [batch]      int32 example index in the split, -1 for padding rows

A batch short of `batch_size` examples (the last of each bucket, or of the split) is filled with copies of its
first row carrying weight 0, so padding rows are valid inputs (no all-masked attention rows, no NaN) and any
loss or metric weighted by `weights` ignores them. Nothing is dropped: an epoch of `train_batches` and one pass of
`eval_batches` see every example exactly once.
"""

import dataclasses
from collections.abc import Iterator

import numpy as np

from train import batching
from train.glue import data as glue_data

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
    encoded: Encoded, *, batch_size: int, buckets: batching.Buckets, seed: int, start_step: int = 0
) -> Iterator[Batch]:
    """Endless shuffled train batches from global step `start_step` (the order of `batching.train_plan`).

    Args:
      encoded: the train split.
      batch_size: rows per batch (global batch).
      buckets: sequence lengths, from `batching.bucket_lengths`, or a `batching.Batching` (e.g. length-grouped).
      seed: shuffling seed.
      start_step: the first step to produce (a resumed run passes its restored step).
    """
    plans = batching.train_plan(
        encoded.lengths, batch_size=batch_size, buckets=buckets, seed=seed, start_step=start_step
    )
    for seq_len, rows in plans:
        yield make_batch(encoded, rows, seq_len)


def eval_batches(encoded: Encoded, *, batch_size: int, buckets: batching.Buckets) -> Iterator[Batch]:
    """One pass over every example exactly once (the order of `batching.eval_plan`); padding rows have weight 0."""
    for seq_len, rows in batching.eval_plan(encoded.lengths, batch_size=batch_size, buckets=buckets):
        yield make_batch(encoded, rows, seq_len)

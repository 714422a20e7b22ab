"""Fixed-shape next-token batches of encoded rows (train/sft/tokens.py): length buckets, or packing.

A row of n tokens gives n - 1 positions: input_ids = tokens[:-1], labels = tokens[1:], weights = targets[1:].

Buckets (the shared train/batching.py): each batch is `batch_size` rows right-padded to one bucket length.

Packing (`config.packing`): rows are packed once into sequences of `max_length` positions by best-fit decreasing
(longest row first, into the fullest sequence it still fits), and those sequences are the examples that
train/batching.py shuffles and batches (one bucket: max_length). A packed sequence carries `segment_ids` (1, 2,
... per row, 0 on padding) and `position_ids` restarting at 0 in each row, so that with the decoders'
block-diagonal attention each row sees only itself, as if it were alone.

Batches (numpy, [batch_size, seq_len]): input_ids, labels, attention_mask int32; weights float32; packing adds
position_ids and segment_ids. Padding rows (index -1) repeat row 0 with weight 0.
"""

from collections.abc import Sequence

import numpy as np

from train import batching
from train.sft.tokens import Encoded


def lengths(encoded: Sequence[Encoded]) -> np.ndarray:
    """[n] positions per row (tokens - 1)."""
    return np.asarray([max(len(e.tokens) - 1, 0) for e in encoded], np.int64)


def pack(row_lengths: np.ndarray, max_length: int) -> list[list[int]]:
    """Rows (indices) per packed sequence of at most `max_length` positions, by best-fit decreasing."""
    order = np.argsort(-np.asarray(row_lengths), kind="stable")
    packs, room = [], []
    for i in order:
        n = int(row_lengths[i])
        fits = [j for j, r in enumerate(room) if r >= n]
        if fits:
            j = min(fits, key=lambda j: room[j])  # the fullest sequence that still holds the row
            packs[j].append(int(i))
            room[j] -= n
        else:
            packs.append([int(i)])
            room.append(max_length - n)
    return packs


def _empty(b: int, seq_len: int, pad_id: int, packed: bool) -> dict[str, np.ndarray]:
    batch = {k: np.zeros((b, seq_len), np.int32) for k in ("input_ids", "labels", "attention_mask")}
    batch["input_ids"][:], batch["labels"][:] = pad_id, pad_id
    batch["weights"] = np.zeros((b, seq_len), np.float32)
    if packed:
        batch["position_ids"] = np.zeros((b, seq_len), np.int32)
        batch["segment_ids"] = np.zeros((b, seq_len), np.int32)
    return batch


def make_batch(
    encoded: Sequence[Encoded], groups: Sequence[Sequence[int]], seq_len: int, pad_id: int, packed: bool
) -> dict[str, np.ndarray]:
    """One batch: row r of the batch holds the rows `groups[r]` (one row unless packed), right-padded.

    Rows longer than seq_len keep their first seq_len positions (only bucket batches: packs always fit).
    """
    batch = _empty(len(groups), seq_len, pad_id, packed)
    for r, group in enumerate(groups):
        at = 0
        for segment, i in enumerate(group, 1):
            e = encoded[i]
            n = min(len(e.tokens) - 1, seq_len - at)
            span = slice(at, at + n)
            batch["input_ids"][r, span] = e.tokens[:n]
            batch["labels"][r, span] = e.tokens[1 : n + 1]
            batch["weights"][r, span] = e.targets[1 : n + 1]
            batch["attention_mask"][r, span] = 1
            if packed:
                batch["position_ids"][r, span] = np.arange(n)
                batch["segment_ids"][r, span] = segment
            at += n
    return batch


class Batches:
    """The train examples of a run (rows, or packed sequences of rows) and their fixed-shape batches.

    Attributes:
      groups: the rows of each example (one each for buckets). example_lengths: [m] positions per example.
      buckets: sequence lengths (packing: (max_length,)).
    """

    def __init__(self, encoded, *, max_length: int, length_buckets, batch_size: int, pad_id: int, packing: bool):
        self.encoded, self.batch_size, self.pad_id, self.packing = encoded, batch_size, pad_id, packing
        row_lengths = lengths(encoded)
        if packing:
            self.groups = pack(row_lengths, max_length)
            self.example_lengths = np.asarray([row_lengths[g].sum() for g in self.groups], np.int64)
            self.buckets = (max_length,)
        else:
            self.groups = [[i] for i in range(len(encoded))]
            self.example_lengths = row_lengths
            self.buckets = batching.bucket_lengths(length_buckets, max_length)

    @property
    def steps_per_epoch(self) -> int:
        return batching.steps_per_epoch(self.example_lengths, self.buckets, self.batch_size)

    def padding_fraction(self, seed: int) -> float:
        """The fraction of an epoch's batch positions that hold padding (padding rows included)."""
        plan = batching.epoch_plan(self.example_lengths, self.buckets, self.batch_size, seed, 0)
        total = sum(seq_len * len(rows) for seq_len, rows in plan)
        return 1.0 - float(self.example_lengths.sum()) / max(total, 1)

    def batch(self, seq_len: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The batch of a plan entry (rows: example indices, -1 = a padding row with weight 0)."""
        real = rows >= 0
        out = make_batch(self.encoded, [self.groups[i] for i in np.where(real, rows, rows[0])], seq_len,
                         self.pad_id, self.packing)  # fmt: skip
        out["weights"] *= real[:, None]
        return out

    def train(self, seed: int, start_step: int = 0):
        """Endless shuffled train batches from global step `start_step` (train/batching.py:train_plan)."""
        plans = batching.train_plan(self.example_lengths, batch_size=self.batch_size, buckets=self.buckets,
                                    seed=seed, start_step=start_step)  # fmt: skip
        return (self.batch(seq_len, rows) for seq_len, rows in plans)

    def eval(self):
        """Every example once, in order."""
        plan = batching.eval_plan(self.example_lengths, batch_size=self.batch_size, buckets=self.buckets)
        return (self.batch(seq_len, rows) for seq_len, rows in plan)

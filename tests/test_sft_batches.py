"""train.sft's batches (train/sft/batches.py): packing by best-fit decreasing, packed batches, and their loss.

Independent references: a brute-force replay of best-fit decreasing and the optimal pack count by subset search,
packed batches rebuilt with numpy, the token loss of a packed batch against the same rows one per batch row through
the tiny Llama, and the padding fraction counted from the batches.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlora_jax import models
from train import lm
from train.sft import batches as batches_lib
from train.sft import rows as rows_lib
from train.sft import tokens


def _optimal_packs(lengths, max_length):
    """The fewest packs of at most max_length positions (dynamic programming over subsets)."""
    n = len(lengths)
    best = {0: (1, max_length)}  # subset mask -> (packs, room left in the last one): fewest packs, then most room
    for mask in range(1, 1 << n):
        options = []
        for i in range(n):
            if mask >> i & 1:
                packs, room = best[mask ^ (1 << i)]
                options.append(
                    (packs, room - lengths[i]) if lengths[i] <= room else (packs + 1, max_length - lengths[i])
                )
        best[mask] = min(options, key=lambda o: (o[0], -o[1]))
    return best[(1 << n) - 1][0]


def test_pack_places_every_row_once_by_best_fit_decreasing():
    """On 300 small random inputs: a partition of the rows, no pack over max_length, and a brute-force replay in
    decreasing length order: each row went into the fullest pack that still held it, and a new pack was opened
    only when none did. Best-fit decreasing uses the optimal number of packs on nearly all of them."""
    rng = np.random.default_rng(0)
    optimal = 0
    for trial in range(300):
        max_length = int(rng.integers(4, 24))
        lengths = rng.integers(1, max_length + 1, int(rng.integers(1, 9)))
        packs = batches_lib.pack(lengths, max_length)
        assert sorted(i for p in packs for i in p) == list(range(len(lengths))), trial
        assert all(lengths[p].sum() <= max_length for p in packs), trial
        where = {i: j for j, p in enumerate(packs) for i in p}
        room = {}
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            n, j = int(lengths[i]), where[i]
            fitting = [r for r in room.values() if r >= n]
            if j not in room:
                assert not fitting, (trial, lengths, packs)  # a pack was open that could hold it
                room[j] = max_length - n
            else:
                assert room[j] >= n and room[j] == min(fitting), (trial, lengths, packs)
                room[j] -= n
        best = _optimal_packs(lengths.tolist(), max_length)
        assert best <= len(packs) <= best + 1, (trial, lengths, packs)
        optimal += len(packs) == best
    assert optimal >= 290


def _encoded(llama_tok, sft_dir):
    rows = (rows_lib.load(sft_dir / "chat.jsonl").rows + rows_lib.load(sft_dir / "text.jsonl").rows
            + rows_lib.load(sft_dir / "prompt.json").rows)  # fmt: skip
    encoded, _ = tokens.encode_all(llama_tok, rows, 128)
    return encoded


def _reference_packed(encoded, groups, seq_len, pad_id):
    """The packed batch rebuilt: each row's tokens[:-1] / tokens[1:] / targets[1:] one after the other, its
    segment id (1, 2, ...) and positions from 0; pad_id / 0 after them."""
    keys = ("input_ids", "labels", "weights", "segment_ids", "position_ids")
    out = {k: np.full((len(groups), seq_len), pad_id if k in ("input_ids", "labels") else 0) for k in keys}
    for r, group in enumerate(groups):
        at = 0
        for segment, i in enumerate(group, 1):
            e = encoded[i]
            n = len(e.tokens) - 1
            values = (e.tokens[:-1], e.tokens[1:], e.targets[1:], np.full(n, segment), np.arange(n))
            for key, value in zip(keys, values, strict=True):
                out[key][r, at : at + n] = value
            at += n
    return out


def test_packed_batches_restart_positions_and_keep_labels_in_their_row(llama_tok, sft_dir):
    encoded = _encoded(llama_tok, sft_dir)
    packed = batches_lib.Batches(encoded, max_length=128, length_buckets=(), batch_size=4, pad_id=2, packing=True)
    assert len(packed.groups) < len(encoded)  # rows really share sequences
    seen = 0
    for batch in packed.eval():
        groups = packed.groups[seen : seen + 4]
        real = len(groups)
        want = _reference_packed(encoded, groups, 128, 2)
        for key, value in want.items():
            np.testing.assert_array_equal(batch[key][:real], value, err_msg=key)
        np.testing.assert_array_equal(batch["attention_mask"][:real], want["segment_ids"] > 0)
        seg = batch["segment_ids"]
        boundary = (seg[:, :-1] != seg[:, 1:]) & (seg[:, 1:] > 0)  # the last position of a row before the next
        # there the label is the row's own last token, never the next row's first token; padding trains nothing
        assert boundary[:real].any()
        assert (batch["labels"][:, :-1][boundary] != batch["input_ids"][:, 1:][boundary]).all()
        assert (batch["weights"][seg == 0] == 0).all()
        assert (batch["weights"][real:] == 0).all()  # padding rows
        seen += real
    assert seen == len(packed.groups)


def _token_loss_sum(module, params, batch):
    kwargs = lm.model_inputs(batch)
    logits = module.apply({"params": params}, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                          **{k: jnp.asarray(v) for k, v in kwargs.items()})  # fmt: skip
    nll = np.asarray(lm.token_nll(logits, jnp.asarray(batch["labels"])), np.float64)  # [b, t], summed in float64
    return float((nll * batch["weights"]).sum()), batch["weights"].sum()


def test_packed_token_loss_equals_the_rows_one_per_batch_row(tiny_llama, llama_tok, sft_dir):
    """sum_j w_j * nll_j over a packed batch (block-diagonal attention, positions per row) equals the sum over the
    same rows each alone in a right-padded batch row; packing without segment ids does not."""
    encoded = _encoded(llama_tok, sft_dir)
    module, params = models.from_pretrained(tiny_llama, head="lm")
    params = jax.tree.map(lambda x: 8 * x, params)  # sharper attention than the 0.02-std random init
    kw = dict(max_length=128, length_buckets=(), pad_id=2)
    packed = batches_lib.Batches(encoded, batch_size=len(encoded), packing=True, **kw)
    bucketed = batches_lib.Batches(encoded, batch_size=len(encoded), packing=False, **kw)
    (p_batch,), (b_batch,) = list(packed.eval()), list(bucketed.eval())
    with jax.default_matmul_precision("float32"):
        got, n_packed = _token_loss_sum(module, params, p_batch)
        want, n_rows = _token_loss_sum(module, params, b_batch)
        naive = {k: v for k, v in p_batch.items() if k not in lm.PACKING_KEYS}
        crossed, _ = _token_loss_sum(module, params, naive)
    assert n_packed == n_rows == sum(e.targets[1:].sum() for e in encoded)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert abs(crossed - want) > 1e-2


def test_padding_fraction_counts_the_padding_of_an_epoch(llama_tok, sft_dir):
    encoded = _encoded(llama_tok, sft_dir)
    for packing, buckets in ((False, (16, 32)), (True, ())):
        b = batches_lib.Batches(encoded, max_length=64, length_buckets=buckets, batch_size=4, pad_id=2,
                                packing=packing)  # fmt: skip
        pad = total = 0
        stream = b.train(seed=3)
        for _ in range(b.steps_per_epoch):
            batch = next(stream)
            padding_row = batch["weights"].sum(axis=1) == 0
            mask = batch["attention_mask"].astype(bool) & ~padding_row[:, None]
            pad, total = pad + (~mask).sum(), total + mask.size
        assert b.padding_fraction(3) == pytest.approx(pad / total, abs=1e-12), packing

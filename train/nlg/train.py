"""Table-to-text fine-tuning with MTLoRA (E2E, WebNLG, DART): the job's own parts for the shared run.

The decoder (GPT-2 or a Llama-family model from `config.model`: hub id, HF folder or .gguf file) gets MTLoRA
adapters on the `config.mtlora.targets_preset` weights (GPT-2 "mtlora-paper": c_attn q, k and v under one
joint T, plus mlp.c_fc); only the adapters train. Training sequences are `prefix + context + separator + " " + target +
eos` (train/nlg/data.py); the loss is the label-smoothed cross-entropy on the target and eos tokens only,
with adapter dropout from `mt.apply(..., rng=...)`. Batches are padded to a few length buckets, or length-grouped
(`config.batching`, train/batching.py).
Each evaluation decodes the eval split and scores it (train/nlg/evaluation.py); the best is the highest BLEU.
With `config.holdout_examples` = k > 0, k distinct train inputs (train/holdout.py), each with all its references,
stay out of training (max_train_examples / train_subset then pick from the rest) and each evaluation also decodes
them with the same settings and scores them as `heldout_<metric>` (`heldout_bleu`; no seen / unseen breakdown),
written to <workdir>/train_heldout.* (train_heldout_before.* for the base model); the best is still the eval
split's.
The loop, checkpoints, resume, SIGTERM, logging and summary.json are the runner's (train/runner.py); the job's
summary fields: "eval_split", "eval_inputs", "train_examples" and, per evaluation, "metrics_unavailable".
"""

import dataclasses
import functools
from typing import NamedTuple

import numpy as np

import mtlora_jax as mt
from configs import nlg_common
from train import batching, holdout, lm, runner
from train import workdir as workdir_lib
from train.nlg import data as nlg_data
from train.nlg import evaluation as nlg_eval

# The file prefix of the held-out inputs' decode outputs in the workdir (beside the eval split's "test.*").
HELDOUT_NAME = "train_heldout"


class Data(NamedTuple):
    """The examples of a run: training examples, the eval inputs with their references, WebNLG's seen categories,
    and the held-out train inputs with theirs (None when config.holdout_examples is 0)."""

    train: list
    eval_set: nlg_data.EvalSet
    seen: frozenset
    heldout: nlg_data.EvalSet | None = None


def subset(n: int, m: int, how: str) -> list[int]:
    """Indices of the items kept out of n: all (m < 0 or m >= n), the first m, or m evenly spaced ("spread")."""
    if m < 0 or m >= n:
        return list(range(n))
    if how == "first":
        return list(range(m))
    if how == "spread":  # m < n evenly spaced indices from 0 to n - 1 are all distinct
        return np.round(np.linspace(0, n - 1, m)).astype(int).tolist()
    raise ValueError(f"subset {how!r}: expected 'first' or 'spread'")


def eval_subset(eval_set: nlg_data.EvalSet, m: int, how: str) -> nlg_data.EvalSet:
    """The EvalSet of the inputs `subset(len, m, how)` keeps."""
    keep = subset(len(eval_set.contexts), m, how)
    pick = lambda xs: tuple(xs[i] for i in keep)
    return nlg_data.EvalSet(pick(eval_set.contexts), pick(eval_set.references), pick(eval_set.categories))


def hold_out(examples, k: int, seed: int, task: str) -> tuple[list, nlg_data.EvalSet | None]:
    """(the examples whose input is not held out, in file order; the k held-out inputs with all their references).

    The inputs are the distinct contexts of `examples`, in file order; `holdout.choose` picks k of them, and every
    example of a held-out context is held out (a table listed twice, under two groups, too). k = 0: (all, None).

    Raises:
      ValueError: k >= the number of distinct inputs, naming config.holdout_examples.
    """
    if not k:
        return list(examples), None
    contexts = list(dict.fromkeys(ex.context for ex in examples))  # distinct inputs in file order
    held = {contexts[i] for i in holdout.choose(len(contexts), k, seed, f"distinct {task} train inputs")}
    number = {c: i for i, c in enumerate(contexts)}  # one group per context: group_references merges all its refs
    held_out = [dataclasses.replace(ex, group=number[ex.context]) for ex in examples if ex.context in held]
    return [ex for ex in examples if ex.context not in held], nlg_data.group_references(held_out)


def load_data(config) -> Data:
    """The training examples (holdout_examples inputs out, then max_train_examples by train_subset), the eval
    inputs (eval_max_examples) and the held-out train inputs (`hold_out`)."""
    train_all = nlg_data.load_split(config.task, config.data_dir, "train")
    seen = nlg_data.seen_categories(train_all) if config.task == "webnlg" else frozenset()
    pool, heldout = hold_out(train_all, config.holdout_examples, config.holdout_seed, config.task)
    train = [pool[i] for i in subset(len(pool), config.max_train_examples, config.train_subset)]
    eval_all = nlg_data.group_references(nlg_data.load_split(config.task, config.data_dir, config.eval_split))
    return Data(train, eval_subset(eval_all, config.eval_max_examples, config.eval_subset), seen, heldout)


def data_identity(data: Data) -> str:
    """Digest of the training examples, and of the held-out inputs when there are; without them it is the digest
    of the training examples alone, as before the held-out split existed (such workdirs still resume)."""
    return workdir_lib.digest(data.train if data.heldout is None else (data.train, data.heldout))


def head(config, data) -> dict:
    """The decoder's own LM head (frozen)."""
    return {"head": "lm"}


def encode_examples(examples, tokenizer, max_length: int) -> tuple[list[tuple[list[int], int]], np.ndarray]:
    """Training sequences (tokens, n_context) and their input lengths [n] for bucketing.

    A sequence of n tokens gives n - 1 (input, next-token) positions, capped at max_length.
    """
    fmt = nlg_data.token_format(tokenizer)
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)
    seqs = [
        nlg_data.encode_example(
            encode, e.context, e.target, separator=fmt.separator, eos_id=fmt.eos_id, prefix=fmt.prefix
        )
        for e in examples
    ]
    return seqs, np.asarray([min(len(t) - 1, max_length) for t, _ in seqs], np.int32)


def lm_batch(seqs, rows: np.ndarray, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """`nlg_data.make_lm_batch` of `rows` (example indices, -1 = padding row: a copy of row 0 with weight 0).

    Returns:
      input_ids, labels, attention_mask: [len(rows), seq_len] int32; weights [len(rows), seq_len] float32.
    """
    real = rows >= 0
    batch = nlg_data.make_lm_batch([seqs[i] for i in np.where(real, rows, rows[0])], seq_len, pad_id)
    batch["weights"] = batch["weights"] * real[:, None]
    return batch


def train_batches(seqs, lengths: np.ndarray, pad_id: int, *, batch_size: int, buckets, seed: int, start_step: int = 0):
    """Endless shuffled LM batches from global step `start_step`, in the order of `batching.train_plan`."""
    plans = batching.train_plan(lengths, batch_size=batch_size, buckets=buckets, seed=seed, start_step=start_step)
    return (lm_batch(seqs, rows, seq_len, pad_id) for seq_len, rows in plans)


def prepare(config, model, data: Data, mesh, workdir: str) -> runner.Task:
    """Tokenizes the training sequences and binds the loss and the decode-and-score evaluation to `model`."""
    seqs, lengths = encode_examples(data.train, model.tokenizer, config.max_length)
    pad_id = nlg_data.token_format(model.tokenizer).pad_id
    buckets = batching.from_config(config)  # bucket lengths or length-grouped (config.batching)
    generate = nlg_eval.make_generate(model.module, model.tokenizer, config, mesh)
    split_name = nlg_data.SPLITS[config.eval_split]

    def evaluate(params, frozen, before: bool, step: int):
        full, suffix = mt.combine(params, frozen), "_before" if before else ""
        run = functools.partial(nlg_eval.evaluate, generate, full, task=config.task, seen=data.seen, workdir=workdir)
        numbers, unavailable = run(data.eval_set, name=split_name + suffix)
        if data.heldout is not None:  # the held-out train inputs, decoded the same way: heldout_<metric>
            held, why = run(data.heldout, name=HELDOUT_NAME + suffix, breakdown=False)
            numbers, unavailable = {**numbers, **holdout.prefixed(held)}, {**unavailable, **holdout.prefixed(why)}
        return numbers, {"metrics_unavailable": unavailable}

    n_eval = len(data.eval_set.contexts)
    n_held = 0 if data.heldout is None else len(data.heldout.contexts)
    return runner.Task(
        steps_per_epoch=batching.steps_per_epoch(lengths, buckets, config.batch_size),
        train_batches=lambda start: train_batches(
            seqs, lengths, pad_id, batch_size=config.batch_size, buckets=buckets, seed=config.seed, start_step=start
        ),
        loss_fn=lm.make_loss_fn(model.module, config.label_smoothing),
        make_evaluate=lambda placed: evaluate,
        main_metric="bleu",
        summary={"eval_split": split_name, "eval_inputs": n_eval, "train_examples": len(seqs)},
        description=f"{len(seqs)} train examples, {buckets.describe()}; {n_eval} {config.eval_split} and {n_held} "
        "held-out train inputs to decode",
    )


JOB = runner.Job(
    validate=nlg_common.validate,
    load_data=load_data,
    data_identity=data_identity,
    head=head,
    prepare=prepare,
)


def train_and_evaluate(config, workdir: str) -> dict | None:
    """Fine-tunes, decodes and scores in `workdir` (train/runner.py:run); the summary, or None after SIGTERM."""
    return runner.run(config, workdir, JOB)

"""Instruction fine-tuning of a decoder LLM with MTLoRA: the job's own parts for the shared run (train/runner.py).

Rows come from `config.data` (train/sft/rows.py: chat, prompt / completion, Alpaca or text), held-out rows from
`config.eval_data` or a fixed-seed `eval_fraction` split. They are tokenized with the model's tokenizer and chat
template (train/sft/tokens.py; the loss covers the assistant turns / completions only) and batched by length
buckets or packed (train/sft/batches.py); the loss is the token cross-entropy of train/lm.py with adapter
dropout. Each evaluation scores the held-out rows (`eval_loss`: mean token loss, `perplexity`: its exp) and
writes greedy generations for the first `sample_prompts` held-out prompts to `<workdir>/samples/<step>.jsonl`
(`before.jsonl` for the base model); the best evaluation is the lowest eval loss. The job's summary fields:
"train_rows", "eval_rows", "skipped_rows", "truncated_rows", "padding_fraction", "packing".
"""

import json
import math
import os
from typing import NamedTuple

import jax
import numpy as np
from absl import logging

import mtlora_jax as mt
from configs import sft as sft_config
from train import chat, generation, lm, runner
from train import mesh as mesh_lib
from train import workdir as workdir_lib
from train.sft import batches as batches_lib
from train.sft import rows as rows_lib
from train.sft import tokens

SPLIT_SEED = 0  # the eval_fraction split does not move with config.seed


class Data(NamedTuple):
    """The rows of a run: train and held-out rows, and the rows skipped per cause."""

    train: list
    eval: list
    skipped: dict


def split(rows: list, fraction: float) -> tuple[list, list]:
    """(train, held out): round(fraction * n) rows (at least 1) drawn with a fixed seed, both in file order."""
    if len(rows) < 2:
        raise ValueError(f"config.eval_fraction: {len(rows)} row cannot be split; give --config.eval_data=<file>")
    n_eval = min(max(1, round(fraction * len(rows))), len(rows) - 1)
    held = set(np.random.default_rng(SPLIT_SEED).permutation(len(rows))[:n_eval].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def load_data(config) -> Data:
    """Reads and checks the rows (errors name file:line), before the model loads."""
    loaded = rows_lib.load(config.data, skip_bad_rows=config.skip_bad_rows)
    skipped = dict(loaded.skipped)
    for file, fmt in loaded.formats.items():
        logging.info("%s: %s rows", file, fmt)
    if config.eval_data:
        held = rows_lib.load(config.eval_data, skip_bad_rows=config.skip_bad_rows)
        train, evals = loaded.rows, held.rows
        skipped = {k: skipped.get(k, 0) + held.skipped.get(k, 0) for k in {*skipped, *held.skipped}}
    else:
        train, evals = split(loaded.rows, config.eval_fraction)
    if skipped:
        logging.warning("skipped %d invalid rows (skip_bad_rows): %s", sum(skipped.values()), skipped)
    if config.max_train_examples > 0:
        train = train[: config.max_train_examples]
    if config.eval_max_rows > 0:
        evals = evals[: config.eval_max_rows]
    return Data(train, evals, skipped)


def identity(data: Data) -> str:
    return workdir_lib.digest([(r.messages, r.prompt, r.completion, r.fmt) for r in data.train])


def sample_prompts(tokenizer, rows, n: int) -> list[tuple[str, list[int], str]]:
    """(where, prompt ids, reference answer) for the first n held-out rows that have a prompt (not text rows):
    a chat up to its last assistant turn, an Alpaca instruction, a prompt."""
    out = []
    for row in rows:
        if len(out) == n:
            break
        if row.messages is not None:
            last = max(i for i, (role, _) in enumerate(row.messages) if role == "assistant")
            ids = chat.prompt_ids(tokenizer, messages=row.messages[:last])
            out.append((row.where, ids, row.messages[last][1]))
        elif row.fmt == "prompt":
            out.append((row.where, chat.prompt_ids(tokenizer, prompt=row.prompt), row.completion))
    return out


def write_samples(path: str, tokenizer, prompts, answers) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for (where, ids, reference), answer in zip(prompts, answers, strict=True):
            prompt = tokenizer.decode(ids, skip_special_tokens=False)
            f.write(json.dumps({"row": where, "prompt": prompt, "reference": reference, "prediction": answer}) + "\n")
    os.replace(path + ".tmp", path)


def prepare(config, model, data: Data, mesh, workdir: str) -> runner.Task:
    """Tokenizes the rows and binds the loss, the held-out scoring and the sample generations to `model`."""
    tok = model.tokenizer
    encoded, cut = tokens.encode_all(tok, data.train, config.max_length)
    if cut["truncated"]:
        logging.warning("%d of %d train rows are longer than max_length=%d tokens and were truncated (%d of them "
                        "lost every trained token)", cut["truncated"], len(encoded), config.max_length,
                        cut["truncated_no_target"])  # fmt: skip
    held, _ = tokens.encode_all(tok, data.eval, config.max_length)
    kw = dict(max_length=config.max_length, length_buckets=config.length_buckets, pad_id=chat.pad_id(tok))
    train = batches_lib.Batches(encoded, batch_size=config.batch_size, packing=config.packing, **kw)
    mesh_lib.check_batch_size(config.eval_batch_size, mesh, key="eval_batch_size")
    evals = batches_lib.Batches(held, batch_size=config.eval_batch_size, packing=False, **kw)
    padding = train.padding_fraction(config.seed)
    samples = sample_prompts(tok, data.eval, config.sample_prompts)
    stops = chat.stop_ids(tok)

    def make_evaluate(placed: runner.Placement):
        def sums(params, frozen, batch):
            full = {"params": mt.combine(params, frozen)}
            logits = mt.apply(model.module.apply)(full, batch["input_ids"], batch["attention_mask"])
            w = batch["weights"]
            return (lm.token_nll(logits, batch["labels"]) * w).sum(), w.sum()

        step_fn = jax.jit(sums, in_shardings=(placed.params, placed.frozen, mesh_lib.batch_sharding(mesh)),
                          out_shardings=mesh_lib.replicated(mesh))  # fmt: skip

        def evaluate(params, frozen, before: bool, step: int):
            total, count = 0.0, 0.0
            for batch in evals.eval():
                s, n = jax.device_get(step_fn(params, frozen, mesh_lib.shard_batch(batch, mesh)))
                total, count = total + float(s), count + float(n)
            loss = total / max(count, 1.0)
            if samples:
                gen = generation.Generator(model.module, mt.combine(params, frozen), stop_ids=stops,
                                           max_new_tokens=config.sample_max_new_tokens, pad_id=kw["pad_id"])
                answers = [tok.decode(gen.generate(ids), skip_special_tokens=True) for _, ids, _ in samples]
                name = "before" if before else f"{step}"
                write_samples(os.path.join(workdir, "samples", f"{name}.jsonl"), tok, samples, answers)
            return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0))}, {}

        return evaluate

    skipped = sum(data.skipped.values())
    how = f"packed into {len(train.groups)} sequences" if config.packing else f"buckets {train.buckets}"
    return runner.Task(
        steps_per_epoch=train.steps_per_epoch,
        train_batches=lambda start: train.train(config.seed, start),
        loss_fn=lm.make_loss_fn(model.module, config.label_smoothing),
        make_evaluate=make_evaluate,
        main_metric="eval_loss",
        lower_is_better=True,
        summary={"train_rows": len(encoded), "eval_rows": len(held), "skipped_rows": skipped,
                 "truncated_rows": cut["truncated"], "padding_fraction": padding, "packing": config.packing},
        description=f"{len(encoded)} train rows ({how}, padding {padding:.1%}), {len(held)} held-out rows, "
        f"{skipped} invalid rows skipped, {cut['truncated']} truncated",
    )  # fmt: skip


JOB = runner.Job(
    validate=sft_config.validate,
    load_data=load_data,
    data_identity=identity,
    head=lambda config, data: {"head": "lm"},
    prepare=prepare,
)


def train_and_evaluate(config, workdir: str) -> dict | None:
    """Fine-tunes and scores in `workdir` (train/runner.py:run); the summary, or None after SIGTERM."""
    return runner.run(config, workdir, JOB)

"""GLUE fine-tuning with MTLoRA: the job's own parts for the shared run (train/runner.py).

The model (BERT/RoBERTa from `config.model`, a hub id or a local folder) gets a classification head (a
regression head for STS-B) and MTLoRA adapters on the `config.mtlora.targets_preset` weights; the adapters and
the head train, the base stays frozen. Loss: cross-entropy (mean squared error for STS-B) over the real rows
of each batch. Each evaluation scores every dev example of every dev split (MNLI: matched and mismatched);
the best evaluation is the one with the highest main metric of the task (train/glue/metrics.py). With
`config.holdout_examples` = k > 0, k train examples (train/holdout.py, drawn after max_train_examples) stay out of
training and each evaluation also scores them like one dev split, as `heldout_<metric>` (MNLI, whose train split
mixes the matched genres only: `heldout_accuracy`, no _m / _mm suffix); the best evaluation is still chosen on dev.
Everything else (checkpoints, resume, SIGTERM, metrics.jsonl, TensorBoard, summary.json) is the runner's.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtlora_jax as mt
from configs import glue_common
from train import batching, holdout, loop, runner
from train import mesh as mesh_lib
from train import workdir as workdir_lib
from train.glue import data as glue_data
from train.glue import metrics as glue_metrics
from train.glue import pipeline
from train.glue import tasks as glue_tasks


def load_data(config) -> dict[str, glue_data.Examples]:
    """The train split, every dev split of config.task and, with config.holdout_examples > 0, "heldout".

    The caps apply first (max_train_examples, max_eval_examples); the held-out examples are then drawn from the
    capped train split (`holdout.choose`) and "train" keeps the others in file order. Errors name the file or key.
    """
    spec = glue_tasks.get_task(config.task)
    local = config.data_source == "local" or (config.data_source == "auto" and config.data_dir)
    if local and not os.path.isdir(os.path.join(config.data_dir, spec.folder)):
        raise FileNotFoundError(
            f"config.data_dir={config.data_dir!r} has no {spec.folder}/ folder; pass "
            f"--config.data_dir=<GLUE folder holding {spec.folder}/ and the other task folders in the official layout>"
        )
    load = lambda split, cap: glue_data.load_task(
        config.task, split, data_dir=config.data_dir or None, source=config.data_source, max_examples=cap
    )
    train = load("train", config.max_train_examples)
    out = {"train": train}
    if config.holdout_examples:
        what = f"{spec.name} train examples (max_train_examples={config.max_train_examples})"
        held = holdout.choose(len(train), config.holdout_examples, config.holdout_seed, what)
        out["train"] = train.select(np.setdiff1d(np.arange(len(train)), held))  # sorted: file order
        out["heldout"] = train.select(held, split="heldout")
    out.update({split: load(split, config.max_eval_examples) for split in spec.dev_splits})
    return out


def data_identity(data: dict) -> str:
    """Digest of the training examples, and of the held-out ones when there are; without them it is the digest
    of the training examples alone, as before the held-out split existed (such workdirs still resume)."""
    return workdir_lib.digest(data["train"] if "heldout" not in data else (data["train"], data["heldout"]))


def head(config, data) -> dict:
    """The task's head: a classifier over its labels, or a one-output regression head for STS-B."""
    spec = glue_tasks.get_task(config.task)
    return {"head": "regression" if spec.is_regression else "classification", "num_labels": spec.num_labels}


def _forward(module, params, frozen, batch, *, rng=None, dropout_rng=None):
    """Head outputs: logits [batch, classes] (scores [batch] for STS-B); dropout on when rngs are given."""
    run = mt.apply(module.apply, rng=rng)
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    variables = {"params": mt.combine(params, frozen)}
    inputs = (batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    return run(variables, *inputs, deterministic=dropout_rng is None, rngs=rngs)


def make_loss_fn(module, regression: bool):
    """loss_fn(params, frozen, batch, rng) -> (sum of weighted losses, {"weight", "accuracy"?: sums})."""

    def loss_fn(params, frozen, batch, rng):
        adapter_rng, dropout_rng = jax.random.split(rng)
        out = _forward(module, params, frozen, batch, rng=adapter_rng, dropout_rng=dropout_rng)
        out = out.astype(jnp.float32)  # the loss (and its softmax) in fp32 under bf16 compute
        w = batch["weights"]  # [batch]: 0 for padding rows
        if regression:
            return jnp.sum(w * (out - batch["labels"]) ** 2), {"weight": jnp.sum(w)}
        losses = optax.softmax_cross_entropy_with_integer_labels(out, batch["labels"])  # [batch]
        correct = (jnp.argmax(out, -1) == batch["labels"]).astype(jnp.float32)
        return jnp.sum(w * losses), {"weight": jnp.sum(w), "accuracy": jnp.sum(w * correct)}

    return loss_fn


def predict_split(eval_step, params, frozen, encoded, *, batch_size: int, buckets, mesh) -> tuple:
    """Head outputs over one pass of `encoded` (each example once, in eval-plan order, plus padding rows).

    Returns:
      (logits [rows, classes] (STS-B: [rows]), labels [rows], weights [rows]: 0 for padding rows).
    """
    logits, labels, weights = [], [], []
    for batch in pipeline.eval_batches(encoded, batch_size=batch_size, buckets=buckets):
        logits.append(np.asarray(jax.device_get(eval_step(params, frozen, mesh_lib.shard_batch(batch, mesh)))))
        labels.append(batch["labels"])
        weights.append(batch["weights"])
    return tuple(np.concatenate(x) for x in (logits, labels, weights))


def evaluate(eval_step, params, frozen, dev: dict, *, task: str, batch_size: int, buckets, mesh,
             heldout=None) -> dict:  # fmt: skip
    """Dev metrics of every dev split, e.g. {"accuracy": ..., "f1": ...}, and with `heldout` (the encoded
    held-out train examples) the task's metrics on them as one split: {"heldout_accuracy": ..., ...}."""
    run = lambda encoded: predict_split(eval_step, params, frozen, encoded, batch_size=batch_size, buckets=buckets,
                                        mesh=mesh)  # fmt: skip
    metrics = glue_metrics.dev_metrics(task, {split: run(encoded) for split, encoded in dev.items()})
    if heldout is not None:
        metrics.update(holdout.prefixed(glue_metrics.compute_metrics(task, *run(heldout))))
    return metrics


def prepare(config, model, data: dict, mesh, workdir: str) -> runner.Task:
    """Tokenizes the splits and binds the loss and the dev (and held-out) evaluation to `model`."""
    spec = glue_tasks.get_task(config.task)
    encoded = {split: pipeline.encode(x, model.tokenizer, config.max_length) for split, x in data.items()}
    train, heldout = encoded.pop("train"), encoded.pop("heldout", None)
    buckets = batching.from_config(config)  # bucket lengths or length-grouped (config.batching)
    micro = config.batch_size // config.grad_accum_steps

    def make_evaluate(placed: runner.Placement):
        predict = lambda p, f, b: _forward(model.module, p, f, b)
        step = loop.make_eval_step(predict, mesh=placed.mesh, params_shardings=placed.params,
                                   frozen_shardings=placed.frozen)  # fmt: skip
        score = functools.partial(evaluate, step, dev=encoded, heldout=heldout, task=spec.name, batch_size=micro,
                                  buckets=buckets, mesh=mesh)  # fmt: skip
        return lambda params, frozen, before, at_step: (score(params, frozen), {})

    return runner.Task(
        steps_per_epoch=batching.steps_per_epoch(train.lengths, buckets, config.batch_size),
        train_batches=lambda start: pipeline.train_batches(
            train, batch_size=config.batch_size, buckets=buckets, seed=config.seed, start_step=start
        ),
        loss_fn=make_loss_fn(model.module, spec.is_regression),
        make_evaluate=make_evaluate,
        main_metric=glue_metrics.main_metric(spec.name),
        summary={},
        description=f"{len(train)} train examples, {len(data.get('heldout', ()))} held out, {buckets.describe()}",
    )


JOB = runner.Job(
    validate=glue_common.validate,
    load_data=load_data,
    data_identity=data_identity,
    head=head,
    prepare=prepare,
)


def train_and_evaluate(config, workdir: str) -> dict | None:
    """Fine-tunes config.task in `workdir` (train/runner.py:run); returns the summary, or None after SIGTERM."""
    return runner.run(config, workdir, JOB)

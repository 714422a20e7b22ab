"""GLUE fine-tuning with MTLoRA: `train_and_evaluate(config, workdir)`, one loop read top to bottom.

The model (BERT/RoBERTa from `config.model`, a hub id or a local folder) gets a classification head (a
regression head for STS-B) and MTLoRA adapters on the `config.mtlora.targets_preset` weights; the adapters and
the head train, the base stays frozen. Loss: cross-entropy (mean squared error for STS-B) over the real rows
of each batch. The run evaluates on every dev example every epoch (or `eval_every_steps`), checkpoints to
`<workdir>/checkpoints` (resuming from the latest automatically, and on SIGTERM), logs to
`<workdir>/metrics.jsonl` and `<workdir>/tb`, and ends by writing `<workdir>/summary.json`:

  {"task", "metrics": final dev metrics, "best": the best evaluation's metrics (by the task's main metric),
   "best_step", "best_epoch", "trainable_params", "wall_time_s"}
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

import mtlora_jax as mt
from configs import common
from mtlora_jax import models
from train import checkpoints, glue_data, glue_tasks, loop, placement, reporting
from train import input_pipeline as ip
from train import mesh as mesh_lib
from train import metrics as glue_metrics

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


_MODEL_HINT = "pass --config.model=<local HF folder with config.json, model.safetensors and tokenizer files>"


def check_sources(config, spec: glue_tasks.TaskSpec) -> None:
    """Fails fast, naming --config.model / --config.data_dir, when the model or the data cannot be found."""
    model = config.model
    if not os.path.exists(os.path.expanduser(model)):
        if model.startswith((".", "/", "~")):
            raise FileNotFoundError(f"config.model={model!r}: no such folder; {_MODEL_HINT}")
        if not glue_data.hub_offline() and not glue_data.hub_reachable():
            raise OSError(f"config.model={model!r} is a hub id but huggingface.co is unreachable; {_MODEL_HINT}")
    local = config.data_source == "local" or (config.data_source == "auto" and config.data_dir)
    if local and not os.path.isdir(os.path.join(config.data_dir, spec.folder)):
        raise FileNotFoundError(
            f"config.data_dir={config.data_dir!r} has no {spec.folder}/ folder; pass "
            f"--config.data_dir=<GLUE folder holding {spec.folder}/, SST-2/, CoLA/ ... in the official layout>"
        )


def load_model(config, spec: glue_tasks.TaskSpec, mesh=None):
    """(module, params, tokenizer, head) for config.model with the task's head; errors name --config.model.

    The weights go from the host straight to their shards on `mesh` (None: the default device)."""
    head = "regression" if spec.is_regression else "classification"
    kw = dict(dtype=DTYPES[config.dtype], scan_layers=config.scan_layers, remat=config.remat)
    kw.update(mesh=mesh, rules=placement.config_rules(config))
    try:
        module, params = models.from_pretrained(
            config.model, head=head, num_labels=spec.num_labels, seed=config.seed, **kw
        )
        tokenizer = models.load_tokenizer(config.model)
    except (OSError, ValueError, KeyError) as e:
        raise type(e)(f"config.model={config.model!r}: {e}; {_MODEL_HINT}") from e
    return module, params, tokenizer, head


def mtlora_config(config, family: str, head: str) -> tuple[mt.MTLoRAConfig, tuple[str, ...]]:
    """The one place where config.mtlora becomes an `mt.MTLoRAConfig`; also the trainable head regexes."""
    m = config.mtlora
    cfg = mt.MTLoRAConfig(  # validated again by mt.init against the real weights (see add_adapters)
        rank=m.rank,
        alpha=m.alpha,
        structure=m.structure,
        targets=models.targets(m.targets_preset, family) + tuple(m.extra_targets),
        dropout=m.dropout,
        fused=models.fused(m.targets_preset, family),
        stack_ndim=models.stack_ndim(family) if config.scan_layers else {},
    )
    return cfg, models.head_targets(family, head) + tuple(m.extra_trainable)


def add_adapters(config, module, params, head: str):
    """mt.init with the config's adapters (then init_from's factors); returns (params, head regexes)."""
    mt_cfg, heads = mtlora_config(config, models.family(module), head)
    try:
        params = mt.init(params, mt_cfg, jax.random.key(config.seed))
    except ValueError as e:
        raise ValueError(f"config.mtlora ({config.mtlora.to_dict()}): {e}") from e
    if config.init_from:
        params, folder = checkpoints.load_adapter_factors(config.init_from, params)
        logging.info("adapters (not the head) initialised from %s", folder)
    return params, heads


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


def evaluate(eval_step, params, frozen, dev: dict, *, task: str, batch_size: int, buckets, mesh) -> dict:
    """Dev metrics of every dev split (each example once), e.g. {"accuracy": ..., "f1": ...}."""
    outputs = {}
    for split, encoded in dev.items():
        logits, labels, weights = [], [], []
        for batch in ip.eval_batches(encoded, batch_size=batch_size, buckets=buckets):
            logits.append(np.asarray(jax.device_get(eval_step(params, frozen, mesh_lib.shard_batch(batch, mesh)))))
            labels.append(batch["labels"])
            weights.append(batch["weights"])
        outputs[split] = tuple(np.concatenate(x) for x in (logits, labels, weights))
    return glue_metrics.dev_metrics(task, outputs)


def train_and_evaluate(config, workdir: str) -> dict | None:
    """Fine-tunes, evaluates and checkpoints; resumes from the latest checkpoint in `workdir`.

    Args:
      config: a GLUE config (configs/<task>.py), validated here.
      workdir: output folder (created); holds checkpoints/, metrics.jsonl, tb/, config.json, summary.json.

    Returns:
      The summary dict (also written to summary.json), or None when SIGTERM stopped the run: a SIGTERM at any
      time (loading and compiling included) makes the run checkpoint after its current step and return.
    """
    with reporting.sigterm_flag() as sigterm:
        return _train_and_evaluate(config, workdir, sigterm)


def _train_and_evaluate(config, workdir: str, sigterm) -> dict | None:
    t0 = time.perf_counter()
    common.validate(config)
    spec = glue_tasks.get_task(config.task)
    workdir, main_process = reporting.start_run(config, workdir)
    mngr = checkpoints.manager(workdir, config.keep_checkpoints)
    mesh = mesh_lib.make_mesh(config.mesh)
    micro = config.batch_size // config.grad_accum_steps
    mesh_lib.check_batch_size(
        micro, mesh, key="batch_size / config.grad_accum_steps" if micro != config.batch_size else "batch_size"
    )

    # Model and data. Failures name the config key to change.
    check_sources(config, spec)
    module, base, tokenizer, head = load_model(config, spec, mesh)
    buckets = ip.bucket_lengths(config.length_buckets, config.max_length)
    train = ip.load_encoded(config, "train", tokenizer)
    dev = {split: ip.load_encoded(config, split, tokenizer) for split in spec.dev_splits}
    per_epoch = ip.steps_per_epoch(train, buckets, config.batch_size)
    total = loop.total_steps(config.num_train_steps, config.num_epochs, per_epoch)
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else per_epoch
    ckpt_every = config.checkpoint_every_steps if config.checkpoint_every_steps > 0 else eval_every
    logging.info(
        "%s: %d train examples, %d steps/epoch, %d steps, buckets %s", spec.name, len(train), per_epoch, total, buckets
    )

    # Adapters (optionally from an earlier run, without its head), both halves placed on the mesh (the base
    # sharded by its logical axes, each adapter like its base weight), the sharded train state.
    params, heads = add_adapters(config, module, base, head)
    trainable_params, _ = mt.count_params(params, heads)
    logging.info("%s", mt.summary(params, heads))
    family = models.family(module)
    trainable, frozen, shardings = placement.place(
        params, heads, family=family, mesh=mesh, base_dtype=config.base_dtype, rules=placement.config_rules(config)
    )
    frozen_shardings = shardings.frozen
    schedule = loop.make_schedule(config.learning_rate, total, int(config.warmup_ratio * total))
    tx = loop.make_optimizer(schedule, config.weight_decay, trainable, heads)
    rng = loop.rng_key(config.seed)
    state, state_shardings = loop.create_train_state(trainable, tx, rng, mesh, shardings.trainable)
    state, record = checkpoints.restore_latest(mngr, state, frozen, heads)
    record = record or {"best": {}, "best_step": 0, "wall_time_s": 0.0}
    start = int(jax.device_get(state.step))
    if start:
        logging.info("resumed from %s at step %d", mngr.directory, start)

    train_step = loop.make_train_step(
        make_loss_fn(module, spec.is_regression),
        tx,
        schedule,
        mesh=mesh,
        state_shardings=state_shardings,
        frozen_shardings=frozen_shardings,
        grad_accum_steps=config.grad_accum_steps,
    )
    eval_step = loop.make_eval_step(
        lambda p, f, b: _forward(module, p, f, b),
        mesh=mesh,
        params_shardings=state_shardings.params,
        frozen_shardings=frozen_shardings,
    )
    run_eval = lambda: evaluate(
        eval_step, state.params, frozen, dev, task=spec.name, batch_size=micro, buckets=buckets, mesh=mesh
    )
    main = glue_metrics.main_metric(spec.name)
    batches = ip.train_batches(train, batch_size=config.batch_size, buckets=buckets, seed=config.seed, start_step=start)
    writer = reporting.MetricWriter(workdir, start, active=main_process)
    progress = reporting.Progress(total, start, config.batch_size, active=main_process)
    last, metrics, interval, n_interval = {}, None, None, 0
    for step in range(start, total):
        state, metrics = train_step(state, frozen, mesh_lib.shard_batch(next(batches), mesh))
        interval, n_interval = loop.accumulate(interval, metrics), n_interval + 1
        done = step + 1
        if done % config.log_every_steps == 0 or done == total:
            means = loop.interval_mean(interval, n_interval, metrics)  # train metrics: means since the last log
            interval, n_interval = None, 0
            loop.check_finite(means, done)
            rates = progress.update(done, means)
            writer.write(done, "train", {**means, **rates, "epoch": done / per_epoch})
            logging.info("step %d/%d loss %.4f lr %.3g %.1f examples/s eta %.0fs", done, total, means["loss"],
                         means["learning_rate"], rates["examples_per_s"], rates["eta_s"])  # fmt: skip
        else:
            progress.update(done)
        if done % eval_every == 0 or done == total:
            t_eval = time.perf_counter()
            last = run_eval()
            writer.write(done, "eval", {**last, "epoch": done / per_epoch, "eval_time_s": time.perf_counter() - t_eval})
            logging.info("step %d eval %s", done, json.dumps(last))
            if not record["best"] or last[main] > record["best"][main]:
                record.update(best=last, best_step=done)
        if done % ckpt_every == 0 or done == total or sigterm.is_set():
            loop.check_finite(jax.device_get(metrics), done)  # never save a diverged state
            wall = record["wall_time_s"] + time.perf_counter() - t0
            checkpoints.save(mngr, state, frozen, heads, {**record, "epoch": done / per_epoch, "wall_time_s": wall})
        if done % eval_every == 0 or done % ckpt_every == 0:
            progress.restart_clock(done)
        if sigterm.is_set():
            progress.close()
            writer.close()
            logging.warning(
                "SIGTERM at step %d: checkpoint saved in %s; rerun the same command to resume", done, mngr.directory
            )
            return None
    progress.close()
    writer.close()
    if not last:  # the run had already finished: evaluate the restored state again
        last = run_eval()
    summary = {
        "task": spec.name,
        "metrics": last,
        "best": record["best"] or last,
        "best_step": record["best_step"] or total,
        "best_epoch": (record["best_step"] or total) / per_epoch,
        "trainable_params": int(trainable_params),
        "wall_time_s": record["wall_time_s"] + time.perf_counter() - t0,
    }
    if main_process:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    logging.info("summary: %s", json.dumps(summary))
    return summary

"""The one fine-tuning run that every job shares: `run(config, workdir, job)`, read top to bottom.

The runner owns what every job does the same way: config checks, the workdir, the mesh, the base model and its
MTLoRA adapters, placement, the sharded train state, resume from the latest checkpoint, and the loop (train
metrics as means over each log interval, the evaluation cadence, best tracking, checkpoints, SIGTERM at any
time, the progress bar, `summary.json`), with its writers closed in `finally`. A `Job` supplies only what is
its own: its config check, its data, its model head, and (`prepare`) a `Task` holding its batches, loss,
evaluation and summary fields.

Cadence (configs/base.py): evaluate every `eval_every_steps` (-1: each epoch, 0: only after the last step),
checkpoint every `checkpoint_every_steps` (-1: at each evaluation) and always after the last step and on SIGTERM.
`<workdir>/summary.json`:

  {"task", "model", <the job's fields>, "num_train_steps", "metrics": the final evaluation, <its extras>,
   "eval_time_s", "best": the evaluation with the highest (or lowest) `Task.main_metric`, "best_step", "best_epoch",
   "best_checkpoint": "best/<step>" (kept whatever keep_checkpoints says; train.predict and train.export use it),
   "metrics_before" ... (eval_before_training), "trainable_params", "wall_time_s"}
"""

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
from absl import logging

import mtlora_jax as mt
from train import checkpoints, loop, placement, run_log
from train import mesh as mesh_lib
from train import model as model_lib
from train import workdir as workdir_lib

# evaluate(params, frozen, before, step) -> (metrics: name -> float, extras for the summary: name -> anything)
Evaluate = Callable[[Any, Any, bool, int], tuple[dict[str, float], dict[str, Any]]]


class Placement(NamedTuple):
    """Where the state lives, for a job's jitted evaluation: the mesh and the shardings of both halves."""

    mesh: Any
    params: Any
    frozen: Any


@dataclasses.dataclass(frozen=True)
class Task:
    """What a job trains on and how it is scored, built once the model is loaded (`Job.prepare`).

    Attributes:
      steps_per_epoch: train batches in one epoch.
      train_batches: start_step -> endless numpy train batches from that global step (same order on resume).
      loss_fn: loss_fn(params, frozen, batch, rng) -> (loss sum, {"weight": rows or tokens counted, ...}).
      make_evaluate: Placement -> Evaluate; `before=True` is the evaluation of the base model, `step` the train
        step evaluated (0 before training).
      main_metric: the metric whose highest value is the best evaluation; None: the last one is the best.
      lower_is_better: the lowest main_metric is the best instead (a loss).
      summary: the job's own summary fields.
      description: one log line on the data (examples, buckets).
    """

    steps_per_epoch: int
    train_batches: Callable[[int], Iterator[dict]]
    loss_fn: Callable
    make_evaluate: Callable[[Placement], Evaluate]
    main_metric: str | None
    summary: dict
    description: str
    lower_is_better: bool = False


@dataclasses.dataclass(frozen=True)
class Job:
    """A job's own parts.

    Attributes:
      validate: config -> None; raises ValueError naming the bad key (configs/<job>_common.validate).
      load_data: config -> data, read before the model loads (a bad data_dir or an empty split fails fast).
      data_identity: data -> str, a digest of the training data (`workdir.digest`): a resumed run must match it.
      head: (config, data) -> keyword arguments of `model.load`: head (and num_labels).
      prepare: (config, model, data, mesh, workdir) -> Task.
    """

    validate: Callable
    load_data: Callable
    data_identity: Callable
    head: Callable
    prepare: Callable


def total_steps(config, steps_per_epoch: int) -> int:
    """config.num_train_steps (0: evaluate only), or ceil(num_epochs * steps_per_epoch) when it is -1."""
    return 0 if config.num_train_steps == 0 else loop.total_steps(config.num_train_steps, config.num_epochs,
                                                                  steps_per_epoch)  # fmt: skip


def warmup_steps(config, total: int) -> int:
    """config.warmup_steps, or warmup_ratio of the training steps when it is -1; raises when >= total."""
    warmup = config.warmup_steps if config.warmup_steps >= 0 else int(config.warmup_ratio * total)
    if total and warmup >= total:
        raise ValueError(f"config.warmup_steps={warmup}: expected fewer than the {total} training steps")
    return warmup if total else 0


def cadence(config, steps_per_epoch: int, total: int) -> tuple[int, int]:
    """(evaluate every N steps, checkpoint every M steps); N = M = total means only after the last step."""
    every = {-1: steps_per_epoch, 0: total}.get(config.eval_every_steps, config.eval_every_steps)
    every = max(every, 1)
    return every, every if config.checkpoint_every_steps == -1 else config.checkpoint_every_steps


def use_compilation_cache(folder: str) -> str | None:
    """Turns on JAX's persistent compilation cache in `folder` ("" = off) unless one is already configured
    (JAX_COMPILATION_CACHE_DIR, or jax.config set by the caller); returns the cache folder in use."""
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    if not folder:
        return None
    folder = os.path.abspath(os.path.expanduser(folder))
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder


def run(config, workdir: str, job: Job) -> dict | None:
    """Fine-tunes, evaluates and checkpoints; resumes from the latest checkpoint in `workdir`.

    Args:
      config: the job's config (validated here).
      workdir: output folder (created): checkpoints/, metrics.jsonl, tb/, config.json, summary.json.

    Returns:
      The summary (also in summary.json), or None when SIGTERM stopped the run: a SIGTERM at any time
      (loading and compiling included) makes the run checkpoint after its current step and return.
    """
    job.validate(config)
    use_compilation_cache(config.compilation_cache_dir)
    workdir = os.path.abspath(workdir)
    main_process = run_log.join_run(config)
    held = workdir_lib.lock(workdir) if main_process else contextlib.nullcontext()
    with run_log.sigterm_flag() as sigterm, held:
        return _run(config, workdir, job, sigterm, main_process)


def _run(config, workdir: str, job: Job, sigterm, main_process: bool) -> dict | None:
    t0 = time.perf_counter()
    mesh = mesh_lib.make_mesh(config.mesh)
    micro = config.batch_size // config.grad_accum_steps
    key = "batch_size / config.grad_accum_steps" if micro != config.batch_size else "batch_size"
    mesh_lib.check_batch_size(micro, mesh, key=key)

    # A model that cannot be found and bad data (a missing data_dir, an empty split) fail before the model loads;
    # a workdir of another run (another task, model, adapters or data) refuses before anything in it is written.
    model_lib.check_source(config.model)
    data = job.load_data(config)
    mine = workdir_lib.check_fingerprint(workdir, config, job.data_identity(data))
    if main_process:
        workdir_lib.record_start(workdir, config, mine)
    model = model_lib.load(config, mesh=mesh, **job.head(config, data))
    task = job.prepare(config, model, data, mesh, workdir)
    per_epoch = task.steps_per_epoch
    total = total_steps(config, per_epoch)
    warmup = warmup_steps(config, total)
    eval_every, ckpt_every = cadence(config, per_epoch, total)
    logging.info("%s: %s; %d steps/epoch, %d steps", config.task, task.description, per_epoch, total)

    # Adapters, both halves placed on the mesh (the base sharded by its logical axes, each adapter like its base
    # weight), the sharded train state, restored from the latest checkpoint if there is one.
    model = model_lib.add_adapters(config, model)
    heads = model_lib.trainable_heads(config, model)
    trainable_params, _ = mt.count_params(model.params, heads)
    logging.info("%s", mt.summary(model.params, heads))
    trainable, frozen, shardings = placement.place(
        model.params, heads, family=model.family, mesh=mesh, base_dtype=config.base_dtype,
        rules=placement.config_rules(config),
    )  # fmt: skip
    schedule = loop.make_schedule(config.learning_rate, max(total, 1), warmup)
    tx = loop.make_optimizer(schedule, config.weight_decay, trainable, heads)
    state, state_shardings = loop.create_train_state(
        trainable, tx, loop.rng_key(config.seed), mesh, shardings.trainable
    )
    mngr = checkpoints.manager(workdir, config.keep_checkpoints)
    best_mngr = checkpoints.manager(workdir, 1, checkpoints.BEST)
    state, record = checkpoints.restore_latest(mngr, state, frozen, heads)
    record = record or {"best": {}, "best_step": 0, "wall_time_s": 0.0}
    start = int(jax.device_get(state.step))
    if start:
        logging.info("resumed from %s at step %d", mngr.directory, start)

    evaluate = task.make_evaluate(Placement(mesh, state_shardings.params, shardings.frozen))

    def timed_eval(state, before: bool = False) -> tuple[dict, dict, float]:
        t, step = time.perf_counter(), int(jax.device_get(state.step))
        metrics, extras = evaluate(state.params, frozen, before, step)
        seconds = time.perf_counter() - t
        logging.info("step %d %s %s (%.0fs)", step, "base model" if before else "eval", json.dumps(metrics), seconds)
        return metrics, extras, seconds

    if config.eval_before_training and start == 0 and total > 0:  # with 0 steps the final eval is the base
        metrics, extras, seconds = timed_eval(state, before=True)
        record["before"] = {"metrics_before": metrics, "eval_before_time_s": seconds}
        record["before"].update({k.replace("metrics", "metrics_before", 1): v for k, v in extras.items()})

    train_step = loop.make_train_step(
        task.loss_fn, tx, schedule, mesh=mesh, state_shardings=state_shardings, frozen_shardings=shardings.frozen,
        grad_accum_steps=config.grad_accum_steps,
    )  # fmt: skip
    batches = task.train_batches(start)
    writer = run_log.MetricWriter(workdir, start, active=main_process)
    progress = run_log.Progress(total, start, config.batch_size, active=main_process)
    last, interval, n_interval = None, None, 0
    try:
        for step in range(start, total):
            state, metrics = train_step(state, frozen, mesh_lib.shard_batch(next(batches), mesh))
            interval, n_interval = loop.accumulate(interval, metrics), n_interval + 1
            done = step + 1
            if done % config.log_every_steps == 0 or done == total:
                means = loop.interval_mean(interval, n_interval, metrics)  # means since the last log
                interval, n_interval = None, 0
                loop.check_finite(means, done)
                rates = progress.update(done, means)
                writer.write(done, "train", {**means, **rates, "epoch": done / per_epoch})
                logging.info("step %d/%d loss %.4f lr %.3g %.1f examples/s eta %.0fs", done, total, means["loss"],
                             means["learning_rate"], rates["examples_per_s"], rates["eta_s"])  # fmt: skip
            else:
                progress.update(done)
            if done % eval_every == 0 or done == total:
                last = timed_eval(state)
                writer.write(done, "eval", {**last[0], "epoch": done / per_epoch, "eval_time_s": last[2]})
                main = task.main_metric
                sign = -1 if task.lower_is_better else 1
                if not record["best"] or main is None or sign * last[0][main] > sign * record["best"][main]:
                    record.update(best=last[0], best_step=done)
                    wall = record["wall_time_s"] + time.perf_counter() - t0
                    checkpoints.save(best_mngr, state, frozen, heads, {**record, "epoch": done / per_epoch,
                                                                        "wall_time_s": wall})  # fmt: skip
            if done % ckpt_every == 0 or done == total or sigterm.is_set():
                loop.check_finite(jax.device_get(metrics), done)  # never save a diverged state
                wall = record["wall_time_s"] + time.perf_counter() - t0
                checkpoints.save(mngr, state, frozen, heads, {**record, "epoch": done / per_epoch, "wall_time_s": wall})
            if done % eval_every == 0 or done % ckpt_every == 0:
                progress.restart_clock(done)  # evaluations and checkpoints are not training time
            if sigterm.is_set():
                logging.warning("SIGTERM at step %d: checkpoint saved in %s; rerun the same command to resume",
                                done, mngr.directory)  # fmt: skip
                return None
    finally:
        progress.close()
        writer.close()
    metrics, extras, eval_time = last if last is not None else timed_eval(state)  # finished earlier, or 0 steps
    best_step = record["best_step"] or total
    summary = {
        "task": config.task,
        "model": config.model,
        **task.summary,
        "num_train_steps": total,
        "metrics": metrics,
        **extras,
        "eval_time_s": eval_time,
        "best": record["best"] or metrics,
        "best_step": best_step,
        "best_epoch": best_step / max(per_epoch, 1),
        # what train.predict / train.export use: the best evaluation's checkpoint (None: no training step)
        "best_checkpoint": None if best_mngr.latest_step() is None else f"{checkpoints.BEST}/{best_mngr.latest_step()}",
        **record.get("before", {}),
        "trainable_params": int(trainable_params),
        "wall_time_s": record["wall_time_s"] + time.perf_counter() - t0,
    }
    if main_process:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    logging.info("summary: %s", json.dumps(summary))
    return summary

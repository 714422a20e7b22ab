"""Table-to-text fine-tuning with MTLoRA (E2E, WebNLG, DART): `train_and_evaluate(config, workdir)`.

The decoder (GPT-2 or a Llama-family model from `config.model`: hub id, HF folder or .gguf file) gets MTLoRA
adapters on the `config.mtlora.targets_preset` weights (GPT-2 "mtlora-paper": c_attn q and v under one joint T,
plus mlp.c_fc); only the adapters train. Training sequences are `prefix + context + separator + " " + target +
eos` (train/nlg_data.py); the loss is the label-smoothed cross-entropy on the target and eos tokens only,
with adapter dropout from `mt.apply(..., rng=...)`. Batches are padded to a few length buckets (one compile
each) in a deterministic order that depends only on (seed, step), so a resumed run sees the same batches.

The train step, optimizer (AdamW, linear warmup then linear decay), sharded state, checkpoints (resume from
the latest in `<workdir>/checkpoints`, and on SIGTERM), metrics.jsonl / TensorBoard and progress bar are the
shared ones of train/loop.py, train/checkpoints.py and train/reporting.py. After the last step (and every
`eval_every_steps`) the eval split is decoded and scored by train/nlg_eval.py; `<workdir>/summary.json`:

  {"task", "model", "eval_split", "eval_inputs", "train_examples", "num_train_steps",
   "metrics": {"bleu", "ter", ...; WebNLG also "bleu_seen", "bleu_unseen", ...}, "metrics_unavailable",
   "eval_time_s", "metrics_before", "metrics_before_unavailable", "eval_before_time_s" (eval_before_training),
   "trainable_params", "wall_time_s"}
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import mtlora_jax as mt
from configs import nlg_common
from mtlora_jax import models
from train import checkpoints, glue_data, loop, nlg_data, nlg_eval, placement, reporting
from train import input_pipeline as ip
from train import mesh as mesh_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_model(config, mesh=None):
    """(module with an LM head, params, tokenizer) of config.model; errors name --config.model.

    The weights go from the host straight to their shards on `mesh` (None: the default device)."""
    path = os.path.expanduser(config.model)
    if not os.path.exists(path):
        hint = "pass --config.model=<local HF folder (config.json, model.safetensors, tokenizer) or .gguf file>"
        if config.model.startswith((".", "/", "~")):
            raise FileNotFoundError(f"config.model={config.model!r}: no such file or folder; {hint}")
        if not glue_data.hub_offline() and not glue_data.hub_reachable():
            raise OSError(f"config.model={config.model!r} is a hub id but huggingface.co is unreachable; {hint}")
    try:
        kw = dict(head="lm", dtype=DTYPES[config.dtype], scan_layers=config.scan_layers, remat=config.remat)
        kw.update(mesh=mesh, rules=placement.config_rules(config))
        module, params = models.from_pretrained(config.model, **kw)
        return module, params, models.load_tokenizer(config.model)
    except OSError as e:  # not found, or a hub id that cannot be fetched: name the key to change
        raise OSError(f"config.model={config.model!r}: {e}") from e


def mtlora_config(config, family: str) -> tuple[mt.MTLoRAConfig, tuple[str, ...]]:
    """The one place where config.mtlora becomes an `mt.MTLoRAConfig`; also the extra trainable regexes."""
    m = config.mtlora
    cfg = mt.MTLoRAConfig(
        rank=m.rank,
        alpha=m.alpha,
        structure=m.structure,
        targets=models.targets(m.targets_preset, family) + tuple(m.extra_targets),
        dropout=m.dropout,
        fused=models.fused(m.targets_preset, family),
        stack_ndim=models.stack_ndim(family) if config.scan_layers else {},
    )
    return cfg, tuple(m.extra_trainable)


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


def encode_examples(examples, tokenizer, max_length: int) -> tuple[list[tuple[list[int], int]], ip.Encoded]:
    """Training sequences (tokens, n_context) and an `ip.Encoded` of their input lengths for bucketing.

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
    inputs = [np.zeros(min(len(t) - 1, max_length), np.int32) for t, _ in seqs]  # only the lengths matter
    return seqs, ip.Encoded(inputs, None, np.zeros(len(seqs), np.int32), fmt.pad_id)


def lm_batch(seqs, rows: np.ndarray, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """`nlg_data.make_lm_batch` of `rows` (example indices, -1 = padding row: a copy of row 0 with weight 0)."""
    real = rows >= 0
    batch = nlg_data.make_lm_batch([seqs[i] for i in np.where(real, rows, rows[0])], seq_len, pad_id)
    batch["weights"] = batch["weights"] * real[:, None]
    return batch


def train_batches(seqs, encoded: ip.Encoded, *, batch_size: int, buckets, seed: int, start_step: int = 0):
    """Endless shuffled LM batches from global step `start_step`; the order of input_pipeline.epoch_plan.

    Yields:
      input_ids, labels, attention_mask: [batch_size, bucket] int32; weights [batch_size, bucket] float32.
    """
    per_epoch = ip.steps_per_epoch(encoded, buckets, batch_size)
    if per_epoch == 0:
        raise ValueError("the train split is empty")
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        for bucket, rows in ip.epoch_plan(encoded, buckets, batch_size, seed, epoch)[skip:]:
            yield lm_batch(seqs, rows, buckets[bucket], encoded.pad_id)
        epoch, skip = epoch + 1, 0


def make_loss_fn(module, label_smoothing: float):
    """loss_fn(params, frozen, batch, rng) -> (sum of token losses, {"weight": target tokens}) for loop.py."""

    def loss_fn(params, frozen, batch, rng):
        run = mt.apply(module.apply, rng=rng)  # adapter dropout
        logits = run({"params": mt.combine(params, frozen)}, batch["input_ids"], batch["attention_mask"])
        weight = batch["weights"].sum()
        mean = nlg_data.lm_loss(logits, batch["labels"], batch["weights"], label_smoothing)
        return mean * jnp.maximum(weight, 1.0), {"weight": weight}

    return loss_fn


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def train_and_evaluate(config, workdir: str) -> dict | None:
    """Fine-tunes, decodes and scores; resumes from the latest checkpoint in `workdir`.

    Args:
      config: an NLG config (configs/e2e.py, webnlg.py, dart.py), validated here.
      workdir: output folder: checkpoints/, metrics.jsonl, tb/, config.json, <split>*.predictions.txt, summary.json.

    Returns:
      The summary (also in summary.json), or None when SIGTERM stopped the run (after a checkpoint).
    """
    t0 = time.perf_counter()
    nlg_common.validate(config)
    workdir, main_process = reporting.start_run(config, workdir)
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.check_batch_size(config.batch_size, mesh)
    mesh_lib.check_batch_size(config.eval_batch_size, mesh, key="eval_batch_size")

    # Data first (fails fast on a bad data_dir), then the model.
    train_all = nlg_data.load_split(config.task, config.data_dir, "train")
    seen = nlg_data.seen_categories(train_all) if config.task == "webnlg" else frozenset()
    train = [train_all[i] for i in subset(len(train_all), config.max_train_examples, config.train_subset)]
    eval_all = nlg_data.group_references(nlg_data.load_split(config.task, config.data_dir, config.eval_split))
    eval_set = eval_subset(eval_all, config.eval_max_examples, config.eval_subset)
    module, base, tokenizer = load_model(config, mesh)
    buckets = ip.bucket_lengths(config.length_buckets, config.max_length)
    seqs, encoded = encode_examples(train, tokenizer, config.max_length)
    per_epoch = ip.steps_per_epoch(encoded, buckets, config.batch_size)
    total = 0 if config.num_train_steps == 0 else loop.total_steps(config.num_train_steps, config.num_epochs, per_epoch)
    if total and config.warmup_steps >= total:
        raise ValueError(f"config.warmup_steps={config.warmup_steps} must be < the {total} training steps")
    n_eval = len(eval_set.contexts)
    logging.info("%s: %d train examples, %d steps/epoch, %d steps, buckets %s; %d %s inputs to decode",
                 config.task, len(seqs), per_epoch, total, buckets, n_eval, config.eval_split)  # fmt: skip

    # Adapters, the frozen half and the sharded train state, restored from the latest checkpoint if any.
    mt_cfg, extra = mtlora_config(config, models.family(module))
    params = mt.init(base, mt_cfg, jax.random.key(config.seed))
    trainable_params, _ = mt.count_params(params, extra)
    logging.info("%s", mt.summary(params, extra))
    family = models.family(module)
    trainable, frozen, shardings = placement.place(
        params, extra, family=family, mesh=mesh, base_dtype=config.base_dtype, rules=placement.config_rules(config)
    )
    frozen_shardings = shardings.frozen
    schedule = loop.make_schedule(config.learning_rate, max(total, 1), config.warmup_steps if total else 0)
    tx = loop.make_optimizer(schedule, config.weight_decay, trainable, extra)
    state, state_shardings = loop.create_train_state(
        trainable, tx, loop.rng_key(config.seed), mesh, shardings.trainable
    )
    mngr = checkpoints.manager(workdir, config.keep_checkpoints)
    state, record = checkpoints.restore_latest(mngr, state, frozen, extra)
    record = record or {"wall_time_s": 0.0}
    start = int(jax.device_get(state.step))
    if start:
        logging.info("resumed from %s at step %d", mngr.directory, start)
    split_name = nlg_data.SPLITS[config.eval_split]
    generate = nlg_eval.make_generate(module, tokenizer, config, mesh)

    def run_eval(name: str) -> tuple[dict, dict, float]:
        """Decodes and scores eval_set with the current adapters: (numbers, unavailable, seconds)."""
        t = time.perf_counter()
        params = mt.combine(state.params, frozen)
        out = nlg_eval.evaluate(generate, params, eval_set, config.task, seen=seen, workdir=workdir, name=name)
        logging.info("%s: %s (%.0fs)", name, json.dumps(out[0]), time.perf_counter() - t)
        return *out, time.perf_counter() - t

    if config.eval_before_training and start == 0 and total > 0:  # with 0 steps the final eval is the base
        before = run_eval(f"{split_name}_before")
        record.update(metrics_before=before[0], metrics_before_unavailable=before[1], eval_before_time_s=before[2])

    train_step = loop.make_train_step(
        make_loss_fn(module, config.label_smoothing),
        tx,
        schedule,
        mesh=mesh,
        state_shardings=state_shardings,
        frozen_shardings=frozen_shardings,
    )
    batches = train_batches(
        seqs, encoded, batch_size=config.batch_size, buckets=buckets, seed=config.seed, start_step=start
    )
    writer = reporting.MetricWriter(workdir, start, active=main_process)
    progress = reporting.Progress(total, start, config.batch_size, active=main_process)
    last, last_eval_step = None, -1
    with reporting.sigterm_flag() as sigterm:
        for step in range(start, total):
            state, metrics = train_step(state, frozen, mesh_lib.shard_batch(next(batches), mesh))
            done = step + 1
            if done % config.log_every_steps == 0 or done == total:
                metrics = jax.device_get(metrics)
                loop.check_finite(metrics, done)
                rates = progress.update(done, metrics)
                writer.write(done, "train", {**metrics, **rates, "epoch": done / per_epoch})
                logging.info("step %d/%d loss %.4f lr %.3g %.1f examples/s", done, total, metrics["loss"],
                             metrics["learning_rate"], rates["examples_per_s"])  # fmt: skip
            else:
                progress.update(done)
            if config.eval_every_steps > 0 and done % config.eval_every_steps == 0 or done == total:
                last, last_eval_step = run_eval(split_name), done
                writer.write(done, "eval", {**last[0], "eval_time_s": last[2]})
            if done % config.checkpoint_every_steps == 0 or done == total or sigterm.is_set():
                loop.check_finite(jax.device_get(metrics), done)  # never save a diverged state
                wall = record["wall_time_s"] + time.perf_counter() - t0
                checkpoints.save(mngr, state, frozen, extra, {**record, "wall_time_s": wall})
            if last_eval_step == done or done % config.checkpoint_every_steps == 0:
                progress.restart_clock(done)  # evaluations and checkpoints are not training time
            if sigterm.is_set():
                progress.close()
                writer.close()
                logging.warning("SIGTERM at step %d: checkpoint saved in %s; rerun to resume", done, mngr.directory)
                return None
    progress.close()
    writer.close()
    numbers, unavailable, eval_time = last if last is not None else run_eval(split_name)  # done before, or 0 steps
    summary = {
        "task": config.task,
        "model": config.model,
        "eval_split": split_name,
        "eval_inputs": len(eval_set.contexts),
        "train_examples": len(seqs),
        "num_train_steps": total,
        "metrics": numbers,
        "metrics_unavailable": unavailable,
        "eval_time_s": eval_time,
        **{k: record[k] for k in ("metrics_before", "metrics_before_unavailable", "eval_before_time_s") if k in record},
        "trainable_params": int(trainable_params),
        "wall_time_s": record["wall_time_s"] + time.perf_counter() - t0,
    }
    if main_process:
        _write_json(os.path.join(workdir, "summary.json"), summary)
    logging.info("summary: %s", json.dumps(summary))
    return summary

"""Where the time of a `train.glue` step goes on this CPU: the job's step against variants that drop one part.

Variants, each the exact train step of train/loop.py on the same real batches of one bucket shape, timed
alternately round by round in one process (ms / step, ratio to the job's step in the same round):

  job          the step `python -m train.glue` runs: adapters on the config's targets, head, AdamW, dropout
  no-dropout   the same without the model's and the adapters' dropout (its RNG and masks)
  fused-attn   no-dropout, with attention as `jax.nn.dot_product_attention` (XLA) instead of einsum + softmax
  floor        no-dropout without adapters: the head and the embeddings' LayerNorm train, so the backward pass runs
               through every layer as with adapters, without any weight gradient of the frozen matrices (the
               frozen model's forward and backward to its inputs)

    python -m bench.glue_step_parts --config configs/mrpc.py:minilm --seq 64 --rounds 5 --steps 3
"""

import argparse
import contextlib
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from absl import logging

import mtlora_jax as mt
from bench import glue_step_time
from mtlora_jax.models import layers
from train import loop
from train import mesh as mesh_lib
from train import model as model_lib
from train.glue import train as glue_train

VARIANTS = ("job", "no-dropout", "fused-attn", "floor")


def fused_attention(q, k, v, mask, dropout=lambda p: p):
    """layers.attention through jax.nn.dot_product_attention (no dropout): [b, t, h, hd] -> [b, t, h * hd]."""
    b, t, h, hd = q.shape
    mask = jnp.broadcast_to(mask, (b, t, k.shape[1]))[:, None]  # [b, 1, t, s]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    return out.reshape(b, t, h * hd)


def loss_without_dropout(module, regression: bool):
    def loss_fn(params, frozen, batch, rng):
        out = glue_train._forward(module, params, frozen, batch).astype(jnp.float32)
        w = batch["weights"]
        if regression:
            return jnp.sum(w * (out - batch["labels"]) ** 2), {"weight": jnp.sum(w)}
        losses = optax.softmax_cross_entropy_with_integer_labels(out, batch["labels"])
        return jnp.sum(w * losses), {"weight": jnp.sum(w)}

    return loss_fn


@contextlib.contextmanager
def attention_as(fn):
    """Swaps the models' attention function while a step is traced and compiled."""
    saved = layers.attention
    layers.attention = fn
    try:
        yield
    finally:
        layers.attention = saved


def build(variant: str, config, model, mesh, batch):
    """(jitted step, state, frozen) of one variant, compiled on `batch`."""
    regression = model.head == "regression"
    heads = model_lib.trainable_heads(config, model)
    if variant == "floor":  # a trainable leaf below the first layer: the backward pass goes through all of them
        heads, params = heads + (r"embeddings/LayerNorm/.*",), model.params
    else:
        params = model_lib.add_adapters(config, model).params
    trainable, frozen = mt.split(params, heads)
    frozen_shardings = mesh_lib.tree_shardings(mesh, frozen)
    frozen = jax.device_put(frozen, frozen_shardings)
    schedule = loop.make_schedule(config.learning_rate, 1000, 0)
    tx = loop.make_optimizer(schedule, config.weight_decay, trainable, heads)
    state, shardings = loop.create_train_state(trainable, tx, loop.rng_key(0), mesh)
    loss = glue_train.make_loss_fn(model.module, regression) if variant == "job" else loss_without_dropout(
        model.module, regression)  # fmt: skip
    step = loop.make_train_step(loss, tx, schedule, mesh=mesh, state_shardings=shardings,
                                frozen_shardings=frozen_shardings)  # fmt: skip
    with attention_as(fused_attention) if variant == "fused-attn" else contextlib.nullcontext():
        state, m = step(state, frozen, batch)  # trace + compile with this variant's attention
        jax.block_until_ready(m)
    return step, state, frozen


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mrpc.py:minilm", help="configs/<task>.py[:arg]")
    parser.add_argument("--seq", type=int, default=64, help="padded sequence length of every batch")
    parser.add_argument("--rounds", type=int, default=5, help="alternated timing rounds")
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    config, model, mesh, batches = glue_step_time.real_batches(args.config, args.seq, args.steps)
    runs = {v: build(v, config, model, mesh, batches[0]) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v, (step, state, frozen) in runs.items():
            t = time.perf_counter()
            for b in batches:
                state, m = step(state, frozen, b)
            jax.block_until_ready(m)
            times[v].append((time.perf_counter() - t) / len(batches))
            runs[v] = (step, state, frozen)
    print(f"{config.task} {config.model}: batch {config.batch_size} x {args.seq}, {jax.devices()[0].device_kind}; "
          f"median (range) of {args.rounds} alternated rounds x {args.steps} steps")  # fmt: skip
    for v, ts in times.items():
        ratios = [a / b for a, b in zip(ts, times["job"], strict=True)]
        print(f"{v:<11} {1e3 * statistics.median(ts):7.1f} ms/step ({1e3 * min(ts):.1f}-{1e3 * max(ts):.1f}); / job "
              f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")  # fmt: skip


if __name__ == "__main__":
    main()

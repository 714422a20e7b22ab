"""Task-agnostic training pieces: the train state, schedule and optimizer, and the jitted train/eval steps.

A task supplies two pure functions over the two halves of `mt.split(params, extra_trainable=head)`:

  loss_fn(params, frozen, batch, rng) -> (loss_sum, sums)   loss summed over the batch's rows (or tokens);
                                                            sums: dict of scalar sums, with sums["weight"]
                                                            the number of rows (tokens) counted
  predict_fn(params, frozen, batch) -> outputs              e.g. logits [batch, classes]

`train_step` takes gradients of the *sum* and divides by the total weight, so a step over one batch equals
(up to rounding) a step that accumulates gradients over micro-batches of it (`grad_accum_steps`, a `lax.scan`)
whatever the padding rows are. Randomness (dropout) is `fold_in(state.rng, state.step)`, then the micro-batch
index, so a resumed run draws the same masks as an uninterrupted one.
"""

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mtlora_jax as mt
from train import mesh as mesh_lib
from train import placement


class TrainState(flax.struct.PyTreeNode):
    """What a train step changes.

    Attributes:
      step: int32 [] optimizer steps taken.
      params: the trainable half of the params (adapter factors + task head), None where frozen.
      opt_state: the optimizer state of `params` (no moments for frozen leaves).
      rng: PRNG key; step s uses fold_in(rng, s).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def rng_key(seed: int) -> jax.Array:
    """The run's PRNG key: JAX's default threefry. On the 2-core CPU (jax 0.10.2) it draws the MiniLM train
    step's dropout masks so much faster than "rbg" (XLA's RngBitGenerator: 19 vs 1.8 ms for one [16, 12, 64, 64]
    mask) that the step takes 0.87x the time, for about 1.5 s more compile (docs/BENCHMARKS.md)."""
    return jax.random.key(seed)


def total_steps(num_train_steps: int, num_epochs: float, steps_per_epoch: int) -> int:
    """num_train_steps when > 0, else ceil(num_epochs * steps_per_epoch)."""
    if num_train_steps > 0:
        return int(num_train_steps)
    return max(1, math.ceil(num_epochs * steps_per_epoch))


def make_schedule(learning_rate: float, total: int, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then linear decay to 0 at `total`.

    HF's `get_linear_schedule_with_warmup`: lr(s) = lr * s / warmup for s < warmup, else
    lr * max(0, (total - s) / (total - warmup)); the first update (s = 0) has lr 0 when warmup > 0.
    """
    if not 0 <= warmup_steps < total:
        raise ValueError(f"warmup steps {warmup_steps} must be in [0, total steps {total})")
    decay = optax.linear_schedule(learning_rate, 0.0, total - warmup_steps)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def _decay_mask(params):
    """Weight decay on matrices only (A, B, C, D, head kernels), not on biases or norm scales (as HF does)."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(schedule: optax.Schedule, weight_decay: float, params, extra_trainable=()):
    """AdamW on the adapters and `extra_trainable` leaves of `params`; everything else frozen (no state).

    Args:
      schedule: learning rate per step.
      weight_decay: AdamW decoupled weight decay (on >= 2-D trainable leaves).
      params: the full adapted tree or its trainable half.
      extra_trainable: regexes of the non-adapter leaves that train (the task head).
    """
    tx = optax.adamw(schedule, weight_decay=weight_decay, mask=_decay_mask)
    return mt.optimizer(tx, params, extra_trainable=extra_trainable)


def create_train_state(params, tx: optax.GradientTransformation, rng: jax.Array, mesh, params_shardings=None):
    """The train state born sharded on `mesh`: `jax.jit(init, out_shardings=...)` after `jax.eval_shape`.

    Args:
      params: the trainable half (adapter factors + head).
      tx: the optimizer.
      rng: PRNG key of the run.
      mesh: the device mesh.
      params_shardings: NamedShardings of `params` (`placement.place`); the optimizer moments follow them.
        None: everything replicated.

    Returns:
      (state, state shardings).
    """
    init = lambda p, r: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=r)
    if params_shardings is None:
        shardings = mesh_lib.tree_shardings(mesh, jax.eval_shape(init, params, rng))
    else:
        rep = mesh_lib.replicated(mesh)
        opt = placement.opt_state_shardings(tx, params, params_shardings, mesh)
        shardings = TrainState(step=rep, params=params_shardings, opt_state=opt, rng=rep)
    return jax.jit(init, out_shardings=shardings)(params, rng), shardings


def _micro_batches(batch, k: int, mesh):
    """[B, ...] leaves -> [k, B/k, ...]: micro-batch i holds rows i, k + i, 2k + i, ... so that every device
    keeps its own rows (the batch stays split along B/k)."""
    spec = NamedSharding(mesh, P(None, mesh_lib.batch_axes(mesh) or None))

    def split(x):
        y = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)  # [k, B/k, ...]
        return jax.lax.with_sharding_constraint(y, spec)

    return jax.tree.map(split, batch)


def train_step(state: TrainState, frozen, batch, *, loss_fn, tx, schedule, grad_accum_steps: int, mesh):
    """One optimizer step on the trainable half; gradients of the loss sum divided by the total weight.

    Args:
      state: the train state (donated).
      frozen: the frozen half of the params (base weights).
      batch: dict of [batch, ...] arrays, split over the data axes.
      loss_fn, tx, schedule, grad_accum_steps, mesh: bound by `make_train_step`.

    Returns:
      (new state, metrics): loss (sum / weight), weight, grad_norm, learning_rate, and each other entry of
      loss_fn's sums divided by the weight.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum_steps == 1:
        (loss_sum, sums), grads = grad_fn(state.params, frozen, batch, rng)
    else:

        def body(carry, xs):
            i, micro = xs
            out = grad_fn(state.params, frozen, micro, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, out), None

        micro = _micro_batches(batch, grad_accum_steps, mesh)
        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, state.params, frozen, first, rng)
        )
        ((loss_sum, sums), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro))
    weight = sums["weight"]
    denom = jnp.where(weight > 0, weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {k: v / denom for k, v in sums.items() if k != "weight"}
    metrics.update(loss=loss_sum / denom, weight=weight, grad_norm=optax.tree.norm(grads))
    metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(loss_fn, tx, schedule, *, mesh, state_shardings, frozen_shardings, grad_accum_steps: int = 1):
    """`train_step` jitted once per batch shape with explicit shardings, the state donated.

    Returns:
      step(state, frozen, batch) -> (state, metrics); metrics replicated scalars.
    """
    fn = functools.partial(
        train_step, loss_fn=loss_fn, tx=tx, schedule=schedule, grad_accum_steps=grad_accum_steps, mesh=mesh
    )
    rep = mesh_lib.replicated(mesh)
    return jax.jit(
        fn,
        in_shardings=(state_shardings, frozen_shardings, mesh_lib.batch_sharding(mesh)),
        out_shardings=(state_shardings, rep),
        donate_argnums=0,
    )


def make_eval_step(predict_fn, *, mesh, params_shardings, frozen_shardings):
    """`predict_fn(params, frozen, batch)` jitted with the batch split over the data axes, outputs replicated."""
    return jax.jit(
        predict_fn,
        in_shardings=(params_shardings, frozen_shardings, mesh_lib.batch_sharding(mesh)),
        out_shardings=mesh_lib.replicated(mesh),
    )


def accumulate(total, metrics):
    """Running sums of step metrics on device (no host sync): `total` None starts a new interval."""
    return metrics if total is None else jax.tree.map(jnp.add, total, metrics)


def interval_mean(total, count: int, last) -> dict[str, float]:
    """Host means of `accumulate`d metrics over `count` steps; the learning rate is the last step's.

    A NaN or inf in any step of the interval survives the mean, so `check_finite` on it sees every step.
    """
    means = {k: float(v) / count for k, v in jax.device_get(total).items()}
    means["learning_rate"] = float(jax.device_get(last["learning_rate"]))
    return means


def check_finite(metrics: dict, step: int) -> None:
    """Raises FloatingPointError when the host-side loss or gradient norm of `step` is NaN or infinite.

    An infinite gradient (an adapter scale alpha / rank too large, say) leaves the loss finite while Adam's update
    turns every factor into NaN or leaves B at 0, so it stops the run as a non-finite loss does."""
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(
            f"non-finite train loss {loss} at step {step}: the run diverged; lower config.learning_rate, "
            "or use config.dtype='float32'"
        )
    grad_norm = float(metrics.get("grad_norm", 0.0))
    if not np.isfinite(grad_norm):
        raise FloatingPointError(
            f"non-finite gradient norm {grad_norm} at step {step}: the run diverged; lower config.mtlora.alpha "
            "(the adapter scale alpha / rank) or config.learning_rate, or use config.dtype='float32'"
        )

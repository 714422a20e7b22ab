"""Training checkpoints in the workdir: Orbax `CheckpointManager` (keep N, atomic), resume, and `init_from`.

Layout: `<workdir>/checkpoints/<step>/{adapters, opt_state, meta}`. The items are those of
`mt.save_adapters`, so every step folder is also a valid adapter checkpoint (`mt.load_adapters(folder, params)`):

  adapters   {path: array}: every adapter factor (".../kernel/a") and the trainable head leaves
  opt_state  the optimizer state of the trainable half
  meta       JSON: "adapters" (structure, rank, scale, shapes per adapter, checked on restore), "arrays"
             (shape and dtype per saved leaf), "step", and "train": the loop's own record (epoch, best
             metrics so far, wall time) that a resumed run continues from

Base weights are never written. Batches are a function of (seed, step) and dropout of (rng, step), so the
step is the whole data position.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

import mtlora_jax as mt
from mtlora_jax.checkpoint import adapter_meta, handler_registry

ITEMS = ("adapters", "opt_state", "meta")


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """A synchronous CheckpointManager over `<workdir>/checkpoints` keeping the last `keep` steps."""
    if keep < 1:
        raise ValueError(f"config.keep_checkpoints={keep}: expected >= 1")
    registry = handler_registry()  # the items of mt.save_adapters
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


def _host(tree):
    """Whole numpy copies of a (small, adapter-sized) tree on every process: `jax.device_get` in one process, an
    all-gather of the shards in a multi-process run (where no process holds every shard)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def save(mngr: ocp.CheckpointManager, state, frozen, extra_trainable, train_meta: dict) -> int:
    """Writes the trainable leaves, optimizer state and `train_meta` at `state.step`; returns the step."""
    step = int(jax.device_get(state.step))
    full = mt.combine(state.params, frozen)
    # Adapter-sized host copies: Orbax writes numpy at once, while each replicated device array costs it a
    # transfer plan (seconds per save on a CPU mesh).
    flat = _host(mt.adapter_state(full, extra_trainable))
    opt_state = _host(state.opt_state)
    meta = {
        "adapters": adapter_meta(full),
        "arrays": {p: [list(v.shape), str(v.dtype)] for p, v in flat.items()},
        "has_opt_state": True,
        "step": step,
        "train": train_meta,
    }
    args = ocp.args.Composite(
        adapters=ocp.args.StandardSave(flat), opt_state=ocp.args.StandardSave(opt_state), meta=ocp.args.JsonSave(meta)
    )
    mngr.save(step, args=args, force=True)
    mngr.wait_until_finished()
    return step


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_latest(mngr: ocp.CheckpointManager, state, frozen, extra_trainable):
    """Restores the latest checkpoint into `state` (same shardings).

    Returns:
      (state, train_meta), or (state, None) unchanged when the workdir has no checkpoint.
    """
    step = mngr.latest_step()
    if step is None:
        return state, None
    full = mt.combine(state.params, frozen)
    flat = mt.adapter_state(full, extra_trainable)
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if set(meta["arrays"]) != set(flat):
        extra, missing = sorted(set(meta["arrays"]) - set(flat)), sorted(set(flat) - set(meta["arrays"]))
        raise ValueError(
            f"{mngr.directory}/{step}: checkpoint leaves differ from this config's trainable leaves "
            f"(only in checkpoint: {extra[:3]}, only in config: {missing[:3]}); use a new --workdir"
        )
    args = ocp.args.Composite(
        adapters=ocp.args.StandardRestore(_abstract(flat)),
        opt_state=ocp.args.StandardRestore(_abstract(state.opt_state)),
    )
    restored = mngr.restore(step, args=args)
    full = mt.restore_adapter_state(full, restored["adapters"], meta["adapters"], source=f"{mngr.directory}/{step}")
    params, _ = mt.split(full, extra_trainable)
    shardings = jax.tree.map(lambda x: x.sharding, state.params)
    state = state.replace(
        step=jax.device_put(np.int32(step), state.step.sharding),
        params=jax.device_put(params, shardings),
        opt_state=restored["opt_state"],
    )
    return state, meta["train"]


def _checkpoint_folder(path: str) -> str:
    """A workdir (its latest checkpoint), a `checkpoints/` folder, or one checkpoint folder -> the folder."""
    path = os.path.abspath(path)
    for root in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(root) and not os.path.isdir(os.path.join(root, "meta")):
            steps = [int(n) for n in os.listdir(root) if n.isdigit()]
            if steps:
                return os.path.join(root, str(max(steps)))
    if os.path.isdir(os.path.join(path, "meta")) and os.path.isdir(os.path.join(path, "adapters")):
        return path
    raise FileNotFoundError(
        f"config.init_from={path!r}: no checkpoint there; pass a workdir of an earlier run, its "
        "checkpoints/ folder, or one checkpoint folder (holding adapters/ and meta/)"
    )


def load_adapter_factors(path: str, params):
    """Copies only the adapter factors (A, B, C, D) of a checkpoint into `params`, not its head (init_from).

    Args:
      path: a workdir, its checkpoints/ folder, a step folder, or an `mt.save_adapters` folder.
      params: the full adapted tree; its adapters must match the checkpoint's (targets, structure, rank).

    Returns:
      (params with the checkpoint's adapter factors, the folder read).
    """
    folder = _checkpoint_folder(path)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        meta = ckptr.restore(folder, ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        shapes = {p: jax.ShapeDtypeStruct(tuple(s), np.dtype(d)) for p, (s, d) in meta["arrays"].items()}
        flat = ckptr.restore(folder, ocp.args.Composite(adapters=ocp.args.StandardRestore(shapes)))["adapters"]
    factors = {p: v for p, v in flat.items() if p.rsplit("/", 1)[0] in meta["adapters"]}
    return mt.restore_adapter_state(params, factors, meta["adapters"], source=f"config.init_from={folder}"), folder

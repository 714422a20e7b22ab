"""Training checkpoints in the workdir: Orbax `CheckpointManager` (keep N, atomic), resume, and `init_from`.

Layout: `<workdir>/checkpoints/<step>/{adapters, opt_state, meta}` (the last `keep_checkpoints`), and
`<workdir>/best/<step>/` (the same items at the best evaluation). The items are those of
`mt.save_adapters`, so every step folder is also a valid adapter checkpoint (`mt.load_adapters(folder, params)`):

  adapters   {path: array}: every adapter factor (".../kernel/a") and the trainable head leaves
  opt_state  the optimizer state of the trainable half
  meta       JSON: "adapters" (structure, rank, scale, shapes per adapter, checked on restore), "arrays"
             (shape and dtype per saved leaf), "checksums" (CRC-32 of every saved array's bytes, checked on
             restore), "step", and "train": the loop's own record (epoch, best metrics so far, wall time)
             that a resumed run continues from

Resume takes the newest checkpoint that reads back whole: a step whose files fail to read, whose arrays do not
match their checksums, or whose values are not finite is moved to `<workdir>/checkpoints-corrupt/<step>` with a
warning naming the step, the path and the cause, and the next older one is tried.

Base weights are never written. Batches are a function of (seed, step) and dropout of (rng, step), so the
step is the whole data position.
"""

import os
import shutil
import time
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

import mtlora_jax as mt
from mtlora_jax.checkpoint import adapter_meta, handler_registry

ITEMS = ("adapters", "opt_state", "meta")
BEST = "best"  # <workdir>/best/<step>: the checkpoint of the best evaluation, kept whatever keep_checkpoints says


def manager(workdir: str, keep: int, folder: str = "checkpoints") -> ocp.CheckpointManager:
    """A synchronous CheckpointManager over `<workdir>/<folder>` keeping the last `keep` steps.

    folder: "checkpoints" (the latest ones, to resume) or BEST (the best evaluation's, for predict and export).
    """
    if keep < 1:
        raise ValueError(f"config.keep_checkpoints={keep}: expected >= 1")
    registry = handler_registry()  # the items of mt.save_adapters
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    directory = os.path.join(os.path.abspath(workdir), folder)
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


def _crc(x) -> int:
    return zlib.crc32(np.ascontiguousarray(np.asarray(x)).tobytes())


def checksums(flat: dict, opt_state) -> dict:
    """CRC-32 of each saved array: {"adapters": {path: crc}, "opt_state": [crc per leaf, in tree order]}."""
    leaves = [_crc(x) for x in jax.tree.leaves(opt_state)]
    return {"adapters": {p: _crc(v) for p, v in flat.items()}, "opt_state": leaves}


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
        "checksums": checksums(flat, opt_state),
        "has_opt_state": True,
        "step": step,
        "train": train_meta,
    }
    args = ocp.args.Composite(
        adapters=ocp.args.StandardSave(flat), opt_state=ocp.args.StandardSave(opt_state), meta=ocp.args.JsonSave(meta)
    )
    if step in mngr.all_steps():  # a rerun after a kill redoes steps (the best one included): the new one wins
        mngr.delete(step)
    mngr.save(step, args=args, force=True)
    mngr.wait_until_finished()
    return step


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _verify(folder: str, meta: dict, flat: dict, opt_state) -> None:
    """Raises ValueError naming the first array that differs from its checksum or holds a NaN / inf."""
    want = meta.get("checksums")
    got = checksums(flat, opt_state)
    for path, v in flat.items():
        if want and want["adapters"].get(path) != got["adapters"][path]:
            raise ValueError(f"{folder}: adapters/{path} does not match its checksum (the file was changed)")
        if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all():
            raise ValueError(f"{folder}: adapters/{path} holds non-finite values")
    if want and want["opt_state"] != got["opt_state"]:
        raise ValueError(f"{folder}: opt_state does not match its checksums (the file was changed)")


def _restore_step(mngr: ocp.CheckpointManager, step: int, state, frozen, extra_trainable):
    """(state, train_meta) of one step, verified; raises on a checkpoint that does not read back whole."""
    folder = os.path.join(str(mngr.directory), str(step))
    full = mt.combine(state.params, frozen)
    flat = mt.adapter_state(full, extra_trainable)
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if set(meta["arrays"]) != set(flat):
        extra, missing = sorted(set(meta["arrays"]) - set(flat)), sorted(set(flat) - set(meta["arrays"]))
        raise ConfigMismatch(
            f"{folder}: checkpoint leaves differ from this config's trainable leaves "
            f"(only in checkpoint: {extra[:3]}, only in config: {missing[:3]}); use a new --workdir"
        )
    shapes = {p: [list(v.shape), str(v.dtype)] for p, v in flat.items()}
    differ = [p for p in flat if [list(meta["arrays"][p][0]), meta["arrays"][p][1]] != shapes[p]]
    if differ:
        raise ConfigMismatch(
            f"{folder}: checkpoint shapes differ from this config's ({differ[0]}: {meta['arrays'][differ[0]]} saved, "
            f"{shapes[differ[0]]} now); use a new --workdir"
        )
    args = ocp.args.Composite(
        adapters=ocp.args.StandardRestore(_abstract(flat)),
        opt_state=ocp.args.StandardRestore(_abstract(state.opt_state)),
    )
    restored = mngr.restore(step, args=args)
    _verify(folder, meta, _host(restored["adapters"]), _host(restored["opt_state"]))
    try:
        full = mt.restore_adapter_state(full, restored["adapters"], meta["adapters"], source=folder)
    except ValueError as e:  # other adapters (structure, scale, slices) than this config's
        raise ConfigMismatch(str(e)) from e
    params, _ = mt.split(full, extra_trainable)
    shardings = jax.tree.map(lambda x: x.sharding, state.params)
    state = state.replace(
        step=jax.device_put(np.int32(step), state.step.sharding),
        params=jax.device_put(params, shardings),
        opt_state=restored["opt_state"],
    )
    return state, meta["train"]


class ConfigMismatch(ValueError):
    """A checkpoint of other adapters than this config's (not damage: never skipped)."""


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> str:
    """Moves a damaged step folder to `<workdir>/checkpoints-corrupt/<step>-<time>` (process 0); returns that path."""
    src = os.path.join(str(mngr.directory), str(step))
    dst = os.path.join(os.path.dirname(str(mngr.directory)), "checkpoints-corrupt", f"{step}-{int(time.time())}")
    if jax.process_index() == 0 and os.path.exists(src):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(src, dst)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    mngr.reload()
    return dst


def restore_latest(mngr: ocp.CheckpointManager, state, frozen, extra_trainable):
    """Restores the newest intact checkpoint into `state` (same shardings).

    Returns:
      (state, train_meta), or (state, None) unchanged when the workdir has no checkpoint.

    Raises:
      ConfigMismatch: the checkpoint holds other adapters than this config's.
      RuntimeError: every checkpoint of the workdir is damaged (they are moved aside, not deleted).
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        try:
            return _restore_step(mngr, step, state, frozen, extra_trainable)
        except ConfigMismatch:
            raise
        except Exception as e:  # noqa: BLE001 (any failure to read a step back means it is damaged)
            cause = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            moved = _set_aside(mngr, step)
            logging.warning("checkpoint step %d (%s) is damaged: %s; moved to %s, trying the previous one", step,
                            os.path.join(str(mngr.directory), str(step)), cause, moved)  # fmt: skip
    if steps:
        raise RuntimeError(
            f"{mngr.directory}: no intact checkpoint (steps {steps} were damaged and moved to checkpoints-corrupt/); "
            "use a new --workdir, or remove checkpoints-corrupt/ and rerun to start this run over"
        )
    return state, None


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

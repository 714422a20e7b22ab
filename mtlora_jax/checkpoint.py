"""Adapter-only checkpoints (Orbax); PEFT LoRA interchange lives in peft_format.py.

A checkpoint holds the trainable leaves only (every A, B, C, D and the `extra_trainable` leaves, keyed
by "/"-joined path), optionally the optimizer state and step, plus a JSON description of every adapter
(structure, rank, scale, shapes) that restores are checked against. Base weights are never written.
Orbax writes to a temporary folder and renames it when complete, so a checkpoint is never half-written.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from mtlora_jax import paths
from mtlora_jax.adapted import is_adapted
from mtlora_jax.masks import split

_FACTORS = ("a", "b", "c", "d")


def adapter_state(params, extra_trainable=()) -> dict[str, jax.Array]:
    """The trainable leaves as a flat {path: array} dict (Adapted factors appear as ".../kernel/a")."""
    trainable, _ = split(params, extra_trainable)
    return dict(paths.named_leaves(trainable, adapted_as_leaf=False))


def adapter_meta(params) -> dict[str, dict]:
    """JSON-able description of each adapted leaf: what a restore must agree with."""
    meta = {}
    for path, ad in paths.named_leaves(params):
        if is_adapted(ad):
            meta[path] = {  # checked in this order: the most telling difference is named first
                "structure": ad.structure,
                "rank": ad.rank,
                "slices": ad.slices,
                "enable": list(ad.enable),
                "w_shape": list(ad.w.shape),
                "in_ndim": ad.in_ndim,
                "stack_ndim": ad.stack_ndim,
                "scale": ad.scale,
            }
    return meta


def restore_adapter_state(params, flat: dict, meta: dict | None = None, *, source: str = "checkpoint"):
    """Puts a flat {path: array} state back into `params`, checking structure and shapes.

    Raises:
      ValueError: naming the path, for a missing or unexpected leaf, a shape mismatch, or an adapter
        whose structure/rank/scale differs from the template.
    """
    want = adapter_state(params)
    _check_meta(params, meta or {}, source)
    for path in want:
        if path not in flat and path.rsplit("/", 1)[-1] in _FACTORS:
            raise ValueError(f"{source}: missing adapter leaf {path!r}")
    for path, _value in flat.items():
        if path not in want and not _is_plain_leaf(params, path):
            raise ValueError(f"{source}: leaf {path!r} does not exist in the template (or is not trainable there)")

    def visit(keypath, leaf):
        path = paths.path_str(keypath)
        if is_adapted(leaf):
            new = {f: _take(flat, f"{path}/{f}", getattr(leaf, f), source) for f in _FACTORS}
            return dataclasses.replace(leaf, **new)
        return _take(flat, path, leaf, source) if path in flat else leaf

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_adapted)


def _check_meta(params, meta: dict, source: str) -> None:
    """Each saved adapter must exist in the template with the same structure, rank, scale and layout."""
    expected = adapter_meta(params)
    for path, m in meta.items():
        if path not in expected:
            raise ValueError(f"{source}: adapter {path!r} is not adapted in the template")
        for k, v in m.items():
            if expected[path][k] != v:
                raise ValueError(f"{source}: adapter {path!r} has {k}={v!r}, the template has {expected[path][k]!r}")


def _is_plain_leaf(params, path: str) -> bool:
    return any(p == path and not is_adapted(x) for p, x in paths.named_leaves(params))


def _take(flat, path, like, source):
    if like is None:
        return None
    value = flat[path]
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(f"{source}: {path!r} has shape {tuple(value.shape)}, the template has {tuple(like.shape)}")
    return jax.numpy.asarray(value, dtype=like.dtype)


def handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Orbax handlers of an adapter checkpoint: items "adapters", "opt_state" (Standard) and "meta" (JSON).

    Shared with the training loop's CheckpointManager (train/checkpoints.py), so every training step folder is
    also an adapter checkpoint."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item in ("adapters", "opt_state"):
        registry.add(item, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
        registry.add(item, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    registry.add("meta", ocp.args.JsonSave, ocp.JsonCheckpointHandler)
    registry.add("meta", ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    return registry


def _checkpointer() -> ocp.Checkpointer:
    """A composite checkpointer with the items of `handler_registry`."""
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=handler_registry()))


def save_adapters(path, params, *, extra_trainable=(), opt_state=None, step: int | None = None) -> str:
    """Writes adapters (+ extra trainable leaves, optimizer state, step) to folder `path` with Orbax.

    Returns:
      The absolute path written. An existing checkpoint at `path` is replaced.
    """
    path = os.path.abspath(os.fspath(path))
    flat = adapter_state(params, extra_trainable)
    meta = {
        "adapters": adapter_meta(params),
        "arrays": {p: [list(v.shape), str(v.dtype)] for p, v in flat.items()},
        "has_opt_state": opt_state is not None,
        "step": None if step is None else int(step),
    }
    items = {"adapters": ocp.args.StandardSave(flat), "meta": ocp.args.JsonSave(meta)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    with _checkpointer() as ckptr:
        ckptr.save(path, ocp.args.Composite(**items), force=True)
    return path


def load_training_state(path, params, opt_state=None):
    """Restores a `save_adapters` checkpoint into templates.

    Args:
      path: the checkpoint folder.
      params: the adapted tree to fill (its base weights are kept).
      opt_state: an optimizer-state template, or None to skip it.

    Returns:
      (params, opt_state, step); opt_state and step are None where not requested or not saved.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no adapter checkpoint at {path}")
    with _checkpointer() as ckptr:
        meta = ckptr.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        _check_meta(params, meta["adapters"], path)
        trainable = adapter_state(params)
        for p in meta["arrays"]:
            if p not in trainable and not _is_plain_leaf(params, p):
                raise ValueError(f"{path}: leaf {p!r} does not exist in the template (or is not trainable there)")
        flat = {p: jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype)) for p, (shape, dtype) in meta["arrays"].items()}
        items = {"adapters": ocp.args.StandardRestore(flat)}
        want_opt = opt_state is not None and meta["has_opt_state"]
        if want_opt:
            items["opt_state"] = ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, opt_state))
        restored = ckptr.restore(path, ocp.args.Composite(**items))
    params = restore_adapter_state(params, restored["adapters"], meta["adapters"], source=path)
    return params, restored["opt_state"] if want_opt else None, meta["step"]


def load_adapters(path, params):
    """Restores adapters (and saved extra trainable leaves) from `save_adapters` into `params`."""
    return load_training_state(path, params)[0]

"""Which leaves train, and an optimizer that freezes the rest: one mask, the single source of truth.

Trainable: the factors a, b, c, d of every `Adapted` node, plus any leaf whose "/"-joined path
full-matches one of `extra_trainable` (e.g. a task head r"classifier/.*"). Everything else, every base
weight `w` included, is frozen: it gets no optimizer state, no weight decay and no update.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from mtlora_jax import paths
from mtlora_jax.adapted import is_adapted
from mtlora_jax.quantized import is_quantized

TRAIN, FREEZE = "train", "freeze"


def _mask(tree, extra: tuple, *, check: bool):
    """Bool tree: Adapted nodes get w=False and True factors; other leaves True iff a pattern matches."""
    patterns = paths.compile_patterns(extra, "extra_trainable")
    if check:
        paths.check_all_used(patterns, [p for p, _ in paths.named_leaves(tree)], "extra_trainable")

    def visit(keypath, leaf):
        if is_adapted(leaf):
            on = lambda m: None if m is None else True
            return dataclasses.replace(
                leaf, w=None if leaf.w is None else False, a=on(leaf.a), b=on(leaf.b), c=on(leaf.c), d=on(leaf.d)
            )
        path = paths.path_str(keypath)
        if is_quantized(leaf) and paths.matches_any(patterns, path):
            raise ValueError(f"extra_trainable matches {path}, a quantized base weight: it cannot train")
        return paths.matches_any(patterns, path)

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=lambda x: is_adapted(x) or is_quantized(x))


def trainable_mask(params, extra_trainable=()):
    """A tree of bools shaped like `params` (Adapted nodes hold bools): True where a leaf trains.

    Raises:
      ValueError: a pattern in `extra_trainable` that matches no path.
    """
    return _mask(params, tuple(extra_trainable), check=True)


def split(params, extra_trainable=()):
    """Splits params into (trainable, frozen) trees of the same structure, None where a leaf is absent.

    `jax.grad` w.r.t. `trainable` differentiates only the adapters (and extra trainable leaves).
    """
    mask = trainable_mask(params, extra_trainable)
    none_leaf = lambda x: x is None
    pick = lambda keep: lambda m, x: x if m is keep else None
    trainable = jax.tree.map(pick(True), mask, params, is_leaf=none_leaf)
    frozen = jax.tree.map(pick(False), mask, params, is_leaf=none_leaf)
    return trainable, frozen


def combine(trainable, frozen):
    """Inverse of `split`: takes each leaf from whichever tree has it."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def optimizer(tx: optax.GradientTransformation, params, extra_trainable=()) -> optax.GradientTransformation:
    """`tx` on the trainable leaves, `optax.set_to_zero()` (no state) on every frozen leaf.

    Works on the full params tree or on the trainable half from `split`. Put weight decay inside `tx`
    (e.g. `optax.adamw`): it then reaches only trainable leaves.
    """
    extra = tuple(extra_trainable)
    trainable_mask(params, extra)  # validate the patterns once, against the real tree
    labels = lambda tree: jax.tree.map(lambda m: TRAIN if m else FREEZE, _mask(tree, extra, check=False))
    return optax.partition({TRAIN: tx, FREEZE: optax.set_to_zero()}, labels)

"""Merging adapters into plain weights (zero-overhead inference) and back.

merge:   W' = w + dW,  dW = (scale · B_full · T · A)ᵀ in w's layout (see `adapted`).
unmerge: w  = W' - dW, recovering the adapted tree up to floating-point rounding.
"""

from __future__ import annotations

import dataclasses

import jax

from mtlora_jax.adapted import Adapted, is_adapted
from mtlora_jax.quantized import dequantize_value, is_quantized


def merge(params):
    """Replaces every `Adapted` leaf by the plain array w + dW (in w's dtype), a quantized w dequantized first,
    and every other `Quantized` leaf by its dequantized array.

    Args:
      params: a tree with `Adapted` leaves.

    Returns:
      A tree of plain arrays; leaves that were not adapted are returned as the same objects.
    """
    def fold(x):
        if not is_adapted(x):
            return dequantize_value(x)
        w = dequantize_value(x.w)
        return w + x.delta().astype(w.dtype)

    return jax.tree.map(fold, params, is_leaf=lambda x: is_adapted(x) or is_quantized(x))


def unmerge(plain, params):
    """Inverts `merge`: subtracts dW (from the factors in `params`) from each merged weight.

    Args:
      plain: a merged tree, as returned by `merge(params)` (possibly after edits to non-adapted leaves).
      params: the adapted tree that supplies the factors and the tree structure.

    Returns:
      An adapted tree whose `w` fields are `plain - dW` and whose other leaves come from `plain`.
    """

    def split(ad, w):
        if not is_adapted(ad):
            return w
        if getattr(w, "shape", None) != ad.w.shape:
            raise ValueError(f"unmerge: merged leaf has shape {getattr(w, 'shape', None)}, adapter needs {ad.w.shape}")
        return dataclasses.replace(ad, w=w - ad.delta().astype(w.dtype))

    try:
        return jax.tree.map(split, params, plain, is_leaf=is_adapted)
    except ValueError as e:
        if str(e).startswith("unmerge:"):
            raise
        raise ValueError(f"unmerge: the merged tree does not match the adapted template: {e}") from None


def adapted_leaves(params) -> list[Adapted]:
    """All `Adapted` nodes of a tree, in tree order."""
    return [x for x in jax.tree.leaves(params, is_leaf=is_adapted) if is_adapted(x)]

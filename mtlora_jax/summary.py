"""Parameter counts: trainable vs total, per adapted target, in the style of PEFT's print_trainable_parameters."""

from __future__ import annotations

import math

import jax

from mtlora_jax import paths
from mtlora_jax.adapted import is_adapted
from mtlora_jax.masks import trainable_mask
from mtlora_jax.quantized import is_quantized


def _size(x) -> int:
    return 0 if x is None else math.prod(x.shape)


def count_params(params, extra_trainable=()) -> tuple[int, int]:
    """(trainable, total) parameter counts; total counts the frozen base and the adapters."""
    mask = trainable_mask(params, extra_trainable)
    sizes = jax.tree.leaves(jax.tree.map(_size, params, is_leaf=is_quantized))  # a quantized matrix: its values
    flags = jax.tree.leaves(mask)
    total = sum(sizes)
    return sum(s for s, on in zip(sizes, flags, strict=True) if on), total


def quantized_bytes(params) -> tuple[int, int]:
    """(bytes the `Quantized` base matrices hold, bytes they took in their float dtype), also inside adapters."""
    held = was = 0
    for leaf in jax.tree.leaves(params, is_leaf=is_quantized):
        if is_quantized(leaf):
            held, was = held + leaf.nbytes, was + leaf.size * jax.numpy.dtype(leaf.dtype).itemsize
    return held, was


def summary(params, extra_trainable=()) -> str:
    """A table of adapted targets (shape, structure, rank, adapter parameters) and the totals line.

    Args:
      params: a tree with `Adapted` leaves.
      extra_trainable: regexes of other trainable leaves (task head), counted as trainable.

    Returns:
      Multi-line text ending in "trainable params: T || all params: N || trainable%: P".
    """
    rows = []
    for path, leaf in paths.named_leaves(params):
        if is_adapted(leaf):
            n = sum(_size(m) for m in (leaf.a, leaf.b, leaf.c, leaf.d))
            fused = f" slices={leaf.enable}" if leaf.slices > 1 else ""
            rows.append(f"  {path}  w{tuple(leaf.w.shape)}  {leaf.structure} r={leaf.rank}{fused}  {n:,}")
    trainable, total = count_params(params, extra_trainable)
    lines = [f"MTLoRA adapters on {len(rows)} targets:", *rows]
    held, was = quantized_bytes(params)
    if was:
        lines.append(f"quantized base: {held:,} bytes instead of {was:,} ({held / was:.3f}x, {was - held:,} saved)")
    lines.append(
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )
    return "\n".join(lines)

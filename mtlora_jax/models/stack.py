"""Runs a stack of identical transformer blocks, unrolled or with ``nn.scan``, optionally ``nn.remat``.

Param layout (documented in docs/MODELS.md):
  * unrolled: one subtree per layer, ``{layer_name}_{i}/...`` (e.g. ``encoder/layer_3/attention/query/kernel``);
  * ``scan=True``: one subtree ``{scan_name}/...`` whose leaves carry a leading layer axis
    (e.g. ``encoder/layers/attention/query/kernel`` [L, d, d]); pass ``presets.stack_ndim(family)`` to
    ``MTLoRAConfig(stack_ndim=...)`` so adapters get the same leading axis.
``nn.remat`` recomputes each block's activations in the backward pass (memory for compute).

A block is a Flax module class whose ``__call__(x, layer_cache, *shared)`` returns
``(x, new_layer_cache)``; ``layer_cache`` is a pytree whose leaves have the layer on axis 1
(the cache keeps batch on axis 0) or None, and ``shared`` are arrays every layer reads unchanged.
"""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtlora_jax.adapted import is_adapted
from mtlora_jax.models.hf_names import LAYERS, check_family


def run_layers(
    block: type[nn.Module],
    block_kwargs: dict,
    x: jax.Array,
    layer_cache,
    shared: tuple,
    *,
    num_layers: int,
    scan: bool,
    remat: bool,
    layer_name: str,
    scan_name: str,
):
    """Applies ``num_layers`` blocks to x. Must be called inside a parent's ``@nn.compact`` method.

    Args:
      block: the block class; block_kwargs: its attributes (config, dtype, deterministic, ...).
      x: [b, t, d] hidden states.
      layer_cache: pytree with leaves [b, L, ...] (layer axis 1), or None.
      shared: arrays broadcast to every layer (masks, positions, rotary tables).
      num_layers: L. scan: use ``nn.scan``. remat: wrap the block in ``nn.remat``.
      layer_name: unrolled name prefix (``layer`` -> ``layer_0``...); scan_name: the scanned name.

    Returns:
      (x [b, t, d], new layer cache with leaves [b, L, ...] or None).
    """
    cls = nn.remat(block, prevent_cse=not scan) if remat else block
    if scan:
        stacked = nn.scan(
            cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(1,) + (nn.broadcast,) * len(shared),
            out_axes=1,
            length=num_layers,
        )
        return stacked(**block_kwargs, name=scan_name)(x, layer_cache, *shared)
    new_caches = []
    for i in range(num_layers):
        layer_i = None if layer_cache is None else jax.tree.map(lambda a, i=i: a[:, i], layer_cache)
        x, new_i = cls(**block_kwargs, name=f"{layer_name}_{i}")(x, layer_i, *shared)
        new_caches.append(new_i)
    if layer_cache is None:
        return x, None
    return x, jax.tree.map(lambda *a: jnp.stack(a, axis=1), *new_caches)


def _stack_arrays(*arrays):
    """np.stack for host arrays (they stay on the host), jnp.stack for device arrays."""
    return np.stack(arrays) if all(isinstance(a, np.ndarray) for a in arrays) else jnp.stack(arrays)


def _stack(*leaves):
    """Stacks per-layer leaves on a new axis 0; an ``mt.Adapted`` leaf also gains one ``stack_ndim``."""
    if is_adapted(leaves[0]):
        stacked = jax.tree.map(_stack_arrays, *leaves)
        return dataclasses.replace(stacked, stack_ndim=leaves[0].stack_ndim + 1)
    return _stack_arrays(*leaves)


def _take(leaf, i: int):
    """Layer i of a stacked leaf (the inverse of :func:`_stack`)."""
    if is_adapted(leaf):
        return dataclasses.replace(jax.tree.map(lambda a: a[i], leaf), stack_ndim=leaf.stack_ndim - 1)
    return leaf[i]


def stack_params(params: dict, family: str) -> dict:
    """Unrolled params -> the ``scan_layers`` layout: ``{root}/{layer}_{i}/...`` stacked on a new axis 0.

    Works on plain and on adapted trees (``mt.Adapted`` leaves get ``stack_ndim + 1``, matching what
    ``mt.init`` makes with ``stack_ndim=presets.stack_ndim(family)``).

    Args:
      params: the param tree of an unrolled model of ``family``.
      family: "bert", "roberta", "gpt2" or "llama".

    Returns:
      A new tree where ``{root}/{scan_name}/...`` leaves are [L, ...]; other leaves are unchanged.
    """
    root, layer, scanned = LAYERS[check_family(family)]
    body = dict(params[root])
    keys = sorted((k for k in body if re.fullmatch(rf"{layer}_\d+", k)), key=lambda k: int(k.rsplit("_", 1)[1]))
    if not keys:
        raise ValueError(f"no {root}/{layer}_<i> subtrees to stack in the {family} params")
    body[scanned] = jax.tree.map(_stack, *[body.pop(k) for k in keys], is_leaf=is_adapted)
    return {**params, root: body}


def unstack_params(params: dict, family: str) -> dict:
    """The inverse of :func:`stack_params`: ``{root}/{scan_name}`` [L, ...] -> ``{root}/{layer}_{i}``."""
    root, layer, scanned = LAYERS[check_family(family)]
    body = dict(params[root])
    stacked = body.pop(scanned)
    n = jax.tree.leaves(stacked)[0].shape[0]  # any array: also a trainable half (w None, frozen leaves None)
    body.update(
        {f"{layer}_{i}": jax.tree.map(lambda a, i=i: _take(a, i), stacked, is_leaf=is_adapted) for i in range(n)}
    )
    return {**params, root: body}

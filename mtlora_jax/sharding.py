"""Shardings for adapted trees: each adapter follows its base weight.

For a base weight w whose PartitionSpec splits its input axes over mesh axes X and its output axes over Y:

    a [*stack, R, d_in]   P(*stack, None, X)     (split like W's input)
    b [*stack, d_out, R]  P(*stack, Y, None)     (split like W's output)
    c, d [*stack, R, R]   P(*stack, None, None)  (replicated: r×r is tiny)

so the factored path x·Aᵀ contracts over the same split as x·W and GSPMD adds no all-gather of w. A quantized w
(`mt.quantize`) places its codes and scales like the weight they came from: the stacked axes as w's, the block
axis split like w's input axis when w is split only there and each shard holds whole blocks (blocks run
row-major over [d_in, d_out]), else replicated. A flattened
d_in (several input axes) keeps the split of its leading axis when the others are unsplit (row-major blocks);
otherwise, or when a mesh is given and the size does not divide, the factor axis is replicated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtlora_jax import paths
from mtlora_jax.adapted import Adapted, is_adapted
from mtlora_jax.quantized import Quantized, is_quantized


def _entries(spec: PartitionSpec, ndim: int) -> list:
    spec = tuple(spec)
    if len(spec) > ndim:
        raise ValueError(f"PartitionSpec {spec} has more entries than the weight's {ndim} axes")
    return list(spec) + [None] * (ndim - len(spec))


def _group(entries: list):
    """The split of a row-major flattened group of axes, or None (replicated)."""
    if entries and entries[0] is not None and all(e is None for e in entries[1:]):
        return entries[0]
    return None


def _fits(entry, size: int, mesh: Mesh | None):
    if entry is None or mesh is None:
        return entry
    names = entry if isinstance(entry, tuple) else (entry,)
    return entry if size % math.prod(mesh.shape[n] for n in names) == 0 else None


def quantized_specs(q: Quantized, w_spec: PartitionSpec, mesh: Mesh | None = None) -> Quantized:
    """PartitionSpecs for the codes and scales of a quantized weight, given the float weight's spec."""
    e = _entries(w_spec, q.ndim)
    s = len(q.stack_shape)
    rows, cols = e[s], e[s + 1]
    n_blocks = q.codes.shape[-2]
    x = None
    if rows is not None and cols is None and mesh is not None:
        k = math.prod(mesh.shape[n] for n in (rows if isinstance(rows, tuple) else (rows,)))
        per_shard = q.matrix_shape[0] // k * q.matrix_shape[1]
        x = rows if q.matrix_shape[0] % k == 0 and per_shard % q.block_size == 0 and n_blocks % k == 0 else None
    stack = e[:s]
    opt = lambda v, spec: None if v is None else spec
    return dataclasses.replace(
        q,
        codes=PartitionSpec(*stack, x, None),
        scales=PartitionSpec(*stack, x if q.scale_absmax is None else None),
        scale_absmax=opt(q.scale_absmax, PartitionSpec(*stack, None)),
        scale_mean=opt(q.scale_mean, PartitionSpec(*stack)),
    )


def adapter_specs(ad: Adapted, w_spec: PartitionSpec, mesh: Mesh | None = None) -> Adapted:
    """PartitionSpecs for one adapted leaf, given its base weight's spec.

    Args:
      ad: the adapted leaf.
      w_spec: the PartitionSpec of `ad.w`.
      mesh: optional; factor axes whose size the mesh axes do not divide are replicated.

    Returns:
      An `Adapted` node whose fields are PartitionSpecs (None where the field is None).
    """
    s, n = ad.stack_ndim, ad.in_ndim
    e = _entries(w_spec, ad.w.ndim)
    stack = e[:s]
    x = _fits(_group(e[s : s + n]), ad.a.shape[-1], mesh)
    y = _fits(_group(e[s + n :]), ad.b.shape[-2], mesh)
    square = None if ad.c is None else PartitionSpec(*stack, None, None)
    return dataclasses.replace(
        ad,
        w=quantized_specs(ad.w, w_spec, mesh) if is_quantized(ad.w) else PartitionSpec(*e),
        a=PartitionSpec(*stack, None, x),
        b=PartitionSpec(*stack, y, None),
        c=square,
        d=None if ad.d is None else square,
    )


def partition_specs(params, base_spec: Callable[[str, jax.Array], PartitionSpec], mesh: Mesh | None = None):
    """A PartitionSpec for every leaf; adapted leaves get `adapter_specs` of their base weight's spec.

    Args:
      params: a tree of arrays or `jax.ShapeDtypeStruct`s, with `Adapted` leaves.
      base_spec: (path, weight) -> PartitionSpec for every plain leaf and every base weight w.
      mesh: optional, for the divisibility check of factor axes.
    """

    def visit(keypath, leaf):
        path = paths.path_str(keypath)
        if is_adapted(leaf):
            return adapter_specs(leaf, base_spec(path, leaf.w), mesh)
        if is_quantized(leaf):
            return quantized_specs(leaf, base_spec(path, leaf), mesh)
        return base_spec(path, leaf)

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=lambda x: is_adapted(x) or is_quantized(x))


def named_shardings(specs, mesh: Mesh):
    """PartitionSpec tree -> NamedSharding tree on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))

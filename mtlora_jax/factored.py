"""The factored rules of `apply`: how one use of an adapted weight is computed without forming dW.

Inside `apply`'s evaluation an adapted weight is a `Lazy` value: its `Adapted` factors plus the current
view (cast, transposed, reshaped, or sliced along stacked layers) of the frozen base w, Flax layout
[*stack, d_in, d_out]. Each rule takes one jaxpr equation with a `Lazy` input and returns its outputs, or
None when that use has no factored form; `apply` then materializes W + dW for it, with one warning.
The rules for products (dot_general, conv, gather) add scale · B_full T A applied to the other operand,
as `apply`'s docstring lists; views and stacked-layer slices keep the weight lazy. The control-flow
rules (jit, remat, scan, custom derivatives) recurse into `apply`'s evaluator and live there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mtlora_jax import jax_api
from mtlora_jax import quantized_ops as qops
from mtlora_jax.adapted import Adapted


@functools.partial(jax.tree_util.register_dataclass, data_fields=["ad", "key"], meta_fields=["in_axes", "out_axes"])
@dataclasses.dataclass(frozen=True)
class Lazy:
    """An adapted weight inside the evaluation: `ad.w` is the current view (cast / transposed) of w.

    in_axes[j] is the view axis holding canonical input axis j (row-major order of d_in); likewise
    out_axes. The first `ad.stack_ndim` view axes are the stacked-layer axes, never permuted.
    """

    ad: Adapted
    key: jax.Array | None
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]

    @classmethod
    def of(cls, ad: Adapted, key) -> Lazy:
        s, n = ad.stack_ndim, ad.in_ndim
        return cls(ad, key, tuple(range(s, s + n)), tuple(range(s + n, ad.w.ndim)))

    def view(self, w, in_axes=None, out_axes=None) -> Lazy:
        ad = dataclasses.replace(self.ad, w=w)
        return Lazy(ad, self.key, in_axes or self.in_axes, out_axes or self.out_axes)

    def base(self) -> jax.Array:
        """The frozen base as an array: the view of w (a quantized w dequantized here, at its use)."""
        return qops.value(self.ad.w)

    def shape_of(self, axes) -> tuple[int, ...]:
        return tuple(self.ad.w.shape[ax] for ax in axes)

    def materialize(self) -> jax.Array:
        """w + dW in the view's layout and dtype."""
        s = self.ad.stack_ndim
        m = jnp.swapaxes(self.ad.matrix(), -1, -2)  # [*stack, d_in, d_out]
        m = m.reshape(self.ad.stack_shape + self.shape_of(self.in_axes) + self.shape_of(self.out_axes))
        canon = list(range(s)) + list(self.in_axes) + list(self.out_axes)  # view axis of each canonical axis
        m = jnp.transpose(m, np.argsort(canon))
        w = self.base()
        return w + m.astype(w.dtype)


def adapter_dropout(lz: Lazy, x: jax.Array, salt: int) -> jax.Array:
    """Inverted dropout on the adapter input, only when a key was given."""
    if lz.key is None or lz.ad.dropout == 0.0:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(lz.key, salt), 1.0 - lz.ad.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - lz.ad.dropout), 0).astype(x.dtype)


def bind(eqn, invals):
    """Binds `eqn`'s primitive to plain `invals`; always returns the list of outputs."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def plain(v, prim_name: str, why: str = "no factored rule"):
    """A plain array for `v`: W + dW (with one warning naming the primitive) if `v` is lazy."""
    return materialize([v], prim_name, why)[0]


def materialize(vals, prim_name: str, why: str = "no factored rule"):
    """Materializes every lazy value in `vals` (each distinct one once), warning once for the use; a quantized
    base weight is dequantized (no warning: that is its use)."""
    vals = [qops.value(v) for v in vals]
    done = {}
    for v in vals:
        if isinstance(v, Lazy) and id(v) not in done:
            done[id(v)] = v.materialize()
    if done:
        shapes = ", ".join(str(v.ad.w.shape) for v in vals if isinstance(v, Lazy))
        warnings.warn(
            f"mt.apply: adapted weight {shapes} feeds `{prim_name}` ({why}); materializing W + dW for it",
            stacklevel=4,
        )
    return [done.get(id(v), v) for v in vals]


def _viewed(eqn, lz: Lazy):
    """w after one view equation: a quantized w stays quantized (`quantized_ops.view`)."""
    return qops.view(eqn, lz.ad.w) if qops.is_quantized_weight(lz.ad.w) else bind(eqn, [lz.ad.w])[0]


def _convert(eqn, invals, i):
    (lz,) = invals
    return [lz.view(_viewed(eqn, lz))]


def _transpose(eqn, invals, i):
    (lz,) = invals
    perm = tuple(eqn.params["permutation"])
    if perm[: lz.ad.stack_ndim] != tuple(range(lz.ad.stack_ndim)):
        return None
    new = lambda axes: tuple(perm.index(ax) for ax in axes)
    return [lz.view(_viewed(eqn, lz), new(lz.in_axes), new(lz.out_axes))]


def _reshape(eqn, invals, i):
    lz = invals[0]
    s, w = lz.ad.stack_ndim, lz.ad.w
    if len(invals) != 1 or lz.in_axes + lz.out_axes != tuple(range(s, w.ndim)):
        return None
    new = tuple(eqn.params["new_sizes"])
    d_in = math.prod(lz.shape_of(lz.in_axes))
    splits = [j for j in range(s + 1, len(new)) if math.prod(new[s:j]) == d_in]
    if new[:s] != w.shape[:s] or not splits:
        return None
    j = splits[0]
    return [lz.view(_viewed(eqn, lz), tuple(range(s, j)), tuple(range(j, len(new))))]


def _copy(eqn, invals, i):
    (lz,) = invals
    return [lz.view(_viewed(eqn, lz))]


def _dot_general(eqn, invals, i):
    lhs, rhs = invals
    if isinstance(lhs, Lazy) and isinstance(rhs, Lazy):
        lhs = plain(lhs, "dot_general", "both operands adapted")
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lazy_is_lhs = isinstance(lhs, Lazy)
    lz, x, lz_c, x_c, lz_b = (lhs, rhs, lc, rc, lb) if lazy_is_lhs else (rhs, lhs, rc, lc, rb)
    if lz_b or lz.ad.stack_ndim:
        return None
    if sorted(lz_c) == sorted(lz.in_axes):
        group, free, proj = lz.in_axes, lz.out_axes, lz.ad.project
    elif sorted(lz_c) == sorted(lz.out_axes):
        group, free, proj = lz.out_axes, lz.in_axes, lz.ad.project_t
    else:
        return None
    if qops.is_quantized_weight(lz.ad.w):  # the float weight is recomputed in the backward pass, never kept
        base = qops.product(eqn, lz.ad.w, x, lazy_is_lhs)
    else:
        base = bind(eqn, [lz.ad.w, rhs] if lazy_is_lhs else [lhs, lz.ad.w])[0]
    x_group = [x_c[list(lz_c).index(ax)] for ax in group]  # x's dims in the canonical order of `group`
    x_free = [d for d in range(x.ndim) if d not in x_c]
    x2 = jnp.transpose(x, x_free + x_group).reshape(-1, math.prod(lz.shape_of(group)))  # [n, d_group]
    z = proj(adapter_dropout(lz, x2, i))  # [n, d_free], canonical order of `free`
    z = z.reshape(tuple(x.shape[d] for d in x_free) + lz.shape_of(free))
    nx = len(x_free)
    free_perm = [nx + free.index(ax) for ax in sorted(free)]  # canonical -> the view's ascending order
    perm = free_perm + list(range(nx)) if lazy_is_lhs else list(range(nx)) + free_perm
    return [base + jnp.transpose(z, perm).astype(base.dtype)]


def _to_view_layout(lz: Lazy, a_t: jax.Array) -> jax.Array:
    """Aᵀ [d_in, R] laid out like the view of w, with R in place of the (single) output axis."""
    r = a_t.shape[-1]
    a_canon = a_t.reshape(lz.shape_of(lz.in_axes) + (r,))  # [*in_canon, R]
    src = [lz.in_axes.index(p) if p in lz.in_axes else len(lz.in_axes) for p in range(lz.ad.w.ndim)]
    return jnp.transpose(a_canon, src)


def _mix_out_along(lz: Lazy, u: jax.Array, axis: int) -> jax.Array:
    """Applies scale · Tᵀ B_fullᵀ along `axis` of u (size R -> d_out)."""
    u = jnp.moveaxis(u, axis, -1)
    z = lz.ad.mix_out(u.reshape(-1, u.shape[-1])).reshape(u.shape[:-1] + (-1,))
    return jnp.moveaxis(z, -1, axis)


def _conv(eqn, invals, i):
    lhs, lz = invals
    p = eqn.params
    if isinstance(lhs, Lazy) or lz.ad.stack_ndim or len(lz.out_axes) != 1:
        return None
    _, rhs_spec, out_spec = p["dimension_numbers"]
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1 or lz.out_axes[0] != rhs_spec[0]:
        return None
    base = bind(eqn, [lhs, lz.base()])[0]
    kernel = _to_view_layout(lz, lz.ad.a.T).astype(lhs.dtype)  # [*spatial, in, R] in w's layout
    u = bind(eqn, [adapter_dropout(lz, lhs, i), kernel])[0]  # [batch, *spatial', R] in out_spec's layout
    return [base + _mix_out_along(lz, u, out_spec[1]).astype(base.dtype)]


def _gather(eqn, invals, i):
    lz, idx = invals
    p = eqn.params
    dn = p["dimension_numbers"]
    if isinstance(idx, Lazy) or lz.ad.stack_ndim or len(lz.in_axes) != 1 or len(lz.out_axes) != 1:
        return None
    (ax_in,), (ax_out,) = lz.in_axes, lz.out_axes
    sizes = tuple(p["slice_sizes"])
    if (tuple(dn.collapsed_slice_dims), tuple(dn.start_index_map)) != ((ax_in,), (ax_in,)) or dn.operand_batching_dims:
        return None
    if sizes[ax_in] != 1 or sizes[ax_out] != lz.ad.w.shape[ax_out]:
        return None
    base = bind(eqn, [lz.base(), idx])[0]
    a_view = _to_view_layout(lz, lz.ad.a.T)  # [V, R] or [R, V]
    r_sizes = tuple(lz.ad.total_rank if d == ax_out else s for d, s in enumerate(sizes))
    u = jax_api.primitive("gather").bind(a_view, idx, **{**p, "slice_sizes": r_sizes})  # rows of Aᵀ: [..., R, ...]
    return [base + _mix_out_along(lz, u, dn.offset_dims[0]).astype(base.dtype)]


def _map_stack(lz: Lazy, fn, drop: int = 0) -> Lazy:
    """Applies `fn(array, ndim_after_stack)` to every field's stacked axes; `drop` stack axes vanish."""
    ad = lz.ad
    if isinstance(ad.w, qops.QView):  # views of a stacked quantized weight: slice the float array
        ad = dataclasses.replace(ad, w=ad.w.value())
    rest = lambda x: x.ndim - ad.stack_ndim
    each = lambda x: jax.tree.map(lambda a: fn(a, rest(a)), x)  # also the codes and scales of a quantized w
    new = {f: None if getattr(ad, f) is None else each(getattr(ad, f)) for f in "wabcd"}
    ad = dataclasses.replace(ad, stack_ndim=ad.stack_ndim - drop, **new)
    key = None if lz.key is None else fn(lz.key, rest(lz.key))
    shift = lambda axes: tuple(a - drop for a in axes)
    return Lazy(ad, key, shift(lz.in_axes), shift(lz.out_axes))


def _stack_only(lz: Lazy, starts, sizes) -> bool:
    """Whether a slice touches only the stacked axes (every other axis taken whole)."""
    s = lz.ad.stack_ndim
    return s > 0 and all(sizes[d] == lz.ad.w.shape[d] for d in range(s, lz.ad.w.ndim))


def _slice(eqn, invals, i):
    (lz,) = invals
    p, s = eqn.params, lz.ad.stack_ndim
    start, limit = p["start_indices"], p["limit_indices"]
    if not _stack_only(lz, start, [b - a for a, b in zip(start, limit, strict=True)]) or p["strides"]:
        return None
    return [_map_stack(lz, lambda x, r: lax.slice(x, start[:s] + (0,) * r, limit[:s] + x.shape[s:]))]


def _dynamic_slice(eqn, invals, i):
    lz, *starts = invals
    sizes, s = eqn.params["slice_sizes"], lz.ad.stack_ndim
    if any(isinstance(v, Lazy) for v in starts) or not _stack_only(lz, starts, sizes):
        return None
    return [_map_stack(lz, lambda x, r: lax.dynamic_slice(x, [*starts[:s]] + [0] * r, sizes[:s] + x.shape[s:]))]


def _squeeze(eqn, invals, i):
    (lz,) = invals
    dims = tuple(eqn.params["dimensions"])
    if not dims or max(dims) >= lz.ad.stack_ndim:
        return None
    return [_map_stack(lz, lambda x, r: lax.squeeze(x, dims), drop=len(dims))]


def unstack(lz: Lazy) -> Lazy:
    ad = dataclasses.replace(lz.ad, stack_ndim=lz.ad.stack_ndim - 1)
    return Lazy(ad, lz.key, tuple(a - 1 for a in lz.in_axes), tuple(a - 1 for a in lz.out_axes))


RULES = {
    jax_api.primitive("convert_element_type"): _convert,
    jax_api.primitive("transpose"): _transpose,
    jax_api.primitive("reshape"): _reshape,
    jax_api.primitive("copy"): _copy,
    jax_api.primitive("slice"): _slice,
    jax_api.primitive("dynamic_slice"): _dynamic_slice,
    jax_api.primitive("squeeze"): _squeeze,
    jax_api.primitive("dot_general"): _dot_general,
    jax_api.primitive("conv_general_dilated"): _conv,
    jax_api.primitive("gather"): _gather,
}

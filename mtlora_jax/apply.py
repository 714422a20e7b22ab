"""`apply(fn)`: run any JAX function on a tree with `Adapted` leaves, computing adapters factored.

Each adapted weight W (Flax layout [d_in, d_out]) is traced as its frozen base w. The function's jaxpr
is then evaluated with the adapted weights kept lazy, and every use of one is rewritten:

    dot_general  x·W      -> x·w + scale · ((x Aᵀ) Tᵀ) B_fullᵀ     (x flattened to [n, d_in] first)
                 y·Wᵀ     -> y·wᵀ + scale · ((y B_full) T) A       (e.g. a tied LM head)
    conv         conv(x, W) -> conv(x, w) + (conv(x, A as a kernel into R channels) Tᵀ) B_fullᵀ
    gather       W[ids]   -> w[ids] + scale · (Aᵀ[ids] Tᵀ) B_fullᵀ  (embedding lookups)

so dW [d_in, d_out] is never formed and, under `jax.grad` w.r.t. the factors, neither is its gradient.
Casts and transposes of W stay lazy; `scan` over stacked (nn.scan) weights, `checkpoint` (nn.remat),
`jit` and custom-derivative calls are entered. Any other use materializes W + dW for that use, with
one warning naming the primitive. Works under `jit`, `grad`, `vmap` and `remat`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from jax import lax

from mtlora_jax.adapted import Adapted, is_adapted

P = jcore.primitives


@functools.partial(jax.tree_util.register_dataclass, data_fields=["ad", "key"], meta_fields=["in_axes", "out_axes"])
@dataclasses.dataclass(frozen=True)
class _Lazy:
    """An adapted weight inside the evaluation: `ad.w` is the current view (cast / transposed) of w.

    in_axes[j] is the view axis holding canonical input axis j (row-major order of d_in); likewise
    out_axes. The first `ad.stack_ndim` view axes are the stacked-layer axes, never permuted.
    """

    ad: Adapted
    key: jax.Array | None
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]

    @classmethod
    def of(cls, ad: Adapted, key) -> _Lazy:
        s, n = ad.stack_ndim, ad.in_ndim
        return cls(ad, key, tuple(range(s, s + n)), tuple(range(s + n, ad.w.ndim)))

    def view(self, w, in_axes=None, out_axes=None) -> _Lazy:
        ad = dataclasses.replace(self.ad, w=w)
        return _Lazy(ad, self.key, in_axes or self.in_axes, out_axes or self.out_axes)

    def shape_of(self, axes) -> tuple[int, ...]:
        return tuple(self.ad.w.shape[ax] for ax in axes)

    def materialize(self) -> jax.Array:
        """w + dW in the view's layout and dtype."""
        s = self.ad.stack_ndim
        m = jnp.swapaxes(self.ad.matrix(), -1, -2)  # [*stack, d_in, d_out]
        m = m.reshape(self.ad.stack_shape + self.shape_of(self.in_axes) + self.shape_of(self.out_axes))
        canon = list(range(s)) + list(self.in_axes) + list(self.out_axes)  # view axis of each canonical axis
        m = jnp.transpose(m, np.argsort(canon))
        return self.ad.w + m.astype(self.ad.w.dtype)


def _dropout(lz: _Lazy, x: jax.Array, salt: int) -> jax.Array:
    """Inverted dropout on the adapter input, only when a key was given."""
    if lz.key is None or lz.ad.dropout == 0.0:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(lz.key, salt), 1.0 - lz.ad.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - lz.ad.dropout), 0).astype(x.dtype)


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def _plain(v, prim_name: str, why: str = "no factored rule"):
    """A plain array for `v`: W + dW (with one warning naming the primitive) if `v` is lazy."""
    return _materialize([v], prim_name, why)[0]


def _materialize(vals, prim_name: str, why: str = "no factored rule"):
    """Materializes every lazy value in `vals` (each distinct one once), warning once for the use."""
    done = {}
    for v in vals:
        if isinstance(v, _Lazy) and id(v) not in done:
            done[id(v)] = v.materialize()
    if done:
        shapes = ", ".join(str(v.ad.w.shape) for v in vals if isinstance(v, _Lazy))
        warnings.warn(
            f"mt.apply: adapted weight {shapes} feeds `{prim_name}` ({why}); materializing W + dW for it",
            stacklevel=4,
        )
    return [done.get(id(v), v) for v in vals]


def _eval(jaxpr, consts, args):
    """Evaluates `jaxpr` with `_Lazy` values allowed in the environment."""
    env = {}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        outs = None
        if any(isinstance(v, _Lazy) for v in invals):
            rule = _RULES.get(eqn.primitive)
            outs = rule(eqn, invals, i) if rule else None
            if outs is None:
                outs = _bind(eqn, _materialize(invals, eqn.primitive.name))
        else:
            outs = _bind(eqn, invals)
        for var, val in zip(eqn.outvars, outs, strict=True):
            env[var] = val
    return [read(v) for v in jaxpr.outvars]


def _eval_plain_out(jaxpr, consts, args, name):
    return _materialize(_eval(jaxpr, consts, args), name, "returned")


# --- rules: each returns the list of outputs, or None to fall back to materializing ------------------
def _convert(eqn, invals, i):
    (lz,) = invals
    return [lz.view(_bind(eqn, [lz.ad.w])[0])]


def _transpose(eqn, invals, i):
    (lz,) = invals
    perm = tuple(eqn.params["permutation"])
    if perm[: lz.ad.stack_ndim] != tuple(range(lz.ad.stack_ndim)):
        return None
    new = lambda axes: tuple(perm.index(ax) for ax in axes)
    return [lz.view(_bind(eqn, [lz.ad.w])[0], new(lz.in_axes), new(lz.out_axes))]


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
    return [lz.view(_bind(eqn, [w])[0], tuple(range(s, j)), tuple(range(j, len(new))))]


def _copy(eqn, invals, i):
    (lz,) = invals
    return [lz.view(_bind(eqn, [lz.ad.w])[0])]


def _dot_general(eqn, invals, i):
    lhs, rhs = invals
    if isinstance(lhs, _Lazy) and isinstance(rhs, _Lazy):
        lhs = _plain(lhs, "dot_general", "both operands adapted")
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lazy_is_lhs = isinstance(lhs, _Lazy)
    lz, x, lz_c, x_c, lz_b = (lhs, rhs, lc, rc, lb) if lazy_is_lhs else (rhs, lhs, rc, lc, rb)
    if lz_b or lz.ad.stack_ndim:
        return None
    if sorted(lz_c) == sorted(lz.in_axes):
        group, free, proj = lz.in_axes, lz.out_axes, lz.ad.project
    elif sorted(lz_c) == sorted(lz.out_axes):
        group, free, proj = lz.out_axes, lz.in_axes, lz.ad.project_t
    else:
        return None
    base = _bind(eqn, [lz.ad.w, rhs] if lazy_is_lhs else [lhs, lz.ad.w])[0]
    x_group = [x_c[list(lz_c).index(ax)] for ax in group]  # x's dims in the canonical order of `group`
    x_free = [d for d in range(x.ndim) if d not in x_c]
    x2 = jnp.transpose(x, x_free + x_group).reshape(-1, math.prod(lz.shape_of(group)))  # [n, d_group]
    z = proj(_dropout(lz, x2, i))  # [n, d_free], canonical order of `free`
    z = z.reshape(tuple(x.shape[d] for d in x_free) + lz.shape_of(free))
    nx = len(x_free)
    free_perm = [nx + free.index(ax) for ax in sorted(free)]  # canonical -> the view's ascending order
    perm = free_perm + list(range(nx)) if lazy_is_lhs else list(range(nx)) + free_perm
    return [base + jnp.transpose(z, perm).astype(base.dtype)]


def _to_view_layout(lz: _Lazy, a_t: jax.Array) -> jax.Array:
    """Aᵀ [d_in, R] laid out like the view of w, with R in place of the (single) output axis."""
    r = a_t.shape[-1]
    a_canon = a_t.reshape(lz.shape_of(lz.in_axes) + (r,))  # [*in_canon, R]
    src = [lz.in_axes.index(p) if p in lz.in_axes else len(lz.in_axes) for p in range(lz.ad.w.ndim)]
    return jnp.transpose(a_canon, src)


def _mix_out_along(lz: _Lazy, u: jax.Array, axis: int) -> jax.Array:
    """Applies scale · Tᵀ B_fullᵀ along `axis` of u (size R -> d_out)."""
    u = jnp.moveaxis(u, axis, -1)
    z = lz.ad.mix_out(u.reshape(-1, u.shape[-1])).reshape(u.shape[:-1] + (-1,))
    return jnp.moveaxis(z, -1, axis)


def _conv(eqn, invals, i):
    lhs, lz = invals
    p = eqn.params
    if isinstance(lhs, _Lazy) or lz.ad.stack_ndim or len(lz.out_axes) != 1:
        return None
    _, rhs_spec, out_spec = p["dimension_numbers"]
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1 or lz.out_axes[0] != rhs_spec[0]:
        return None
    base = _bind(eqn, [lhs, lz.ad.w])[0]
    kernel = _to_view_layout(lz, lz.ad.a.T).astype(lhs.dtype)  # [*spatial, in, R] in w's layout
    u = _bind(eqn, [_dropout(lz, lhs, i), kernel])[0]  # [batch, *spatial', R] in out_spec's layout
    return [base + _mix_out_along(lz, u, out_spec[1]).astype(base.dtype)]


def _gather(eqn, invals, i):
    lz, idx = invals
    p = eqn.params
    dn = p["dimension_numbers"]
    if isinstance(idx, _Lazy) or lz.ad.stack_ndim or len(lz.in_axes) != 1 or len(lz.out_axes) != 1:
        return None
    (ax_in,), (ax_out,) = lz.in_axes, lz.out_axes
    sizes = tuple(p["slice_sizes"])
    if (tuple(dn.collapsed_slice_dims), tuple(dn.start_index_map)) != ((ax_in,), (ax_in,)) or dn.operand_batching_dims:
        return None
    if sizes[ax_in] != 1 or sizes[ax_out] != lz.ad.w.shape[ax_out]:
        return None
    base = _bind(eqn, [lz.ad.w, idx])[0]
    a_view = _to_view_layout(lz, lz.ad.a.T)  # [V, R] or [R, V]
    r_sizes = tuple(lz.ad.total_rank if d == ax_out else s for d, s in enumerate(sizes))
    u = P.gather_p.bind(a_view, idx, **{**p, "slice_sizes": r_sizes})  # rows of Aᵀ: [..., R, ...]
    return [base + _mix_out_along(lz, u, dn.offset_dims[0]).astype(base.dtype)]


def _inline(key):
    """Evaluates a call's inner jaxpr in place (its outputs may stay lazy: there is no boundary left)."""

    def rule(eqn, invals, i):
        closed = eqn.params[key]
        return _eval(closed.jaxpr, closed.consts, invals)

    return rule


def _custom(eqn, invals, i):
    # The custom derivative rule is dropped: it was written for the plain weight, not for the factors.
    closed = eqn.params["call_jaxpr"]
    return _eval(closed.jaxpr, closed.consts, invals)


def _remat(eqn, invals, i):
    p = eqn.params
    fn = lambda *vals: _eval_plain_out(p["jaxpr"], [], vals, "checkpoint")
    return jax.checkpoint(fn, prevent_cse=p["prevent_cse"], policy=p["policy"])(*invals)


def _map_stack(lz: _Lazy, fn, drop: int = 0) -> _Lazy:
    """Applies `fn(array, ndim_after_stack)` to every field's stacked axes; `drop` stack axes vanish."""
    ad = lz.ad
    rest = lambda x: x.ndim - ad.stack_ndim
    new = {f: None if getattr(ad, f) is None else fn(getattr(ad, f), rest(getattr(ad, f))) for f in "wabcd"}
    ad = dataclasses.replace(ad, stack_ndim=ad.stack_ndim - drop, **new)
    key = None if lz.key is None else fn(lz.key, rest(lz.key))
    shift = lambda axes: tuple(a - drop for a in axes)
    return _Lazy(ad, key, shift(lz.in_axes), shift(lz.out_axes))


def _stack_only(lz: _Lazy, starts, sizes) -> bool:
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
    if any(isinstance(v, _Lazy) for v in starts) or not _stack_only(lz, starts, sizes):
        return None
    return [_map_stack(lz, lambda x, r: lax.dynamic_slice(x, [*starts[:s]] + [0] * r, sizes[:s] + x.shape[s:]))]


def _squeeze(eqn, invals, i):
    (lz,) = invals
    dims = tuple(eqn.params["dimensions"])
    if not dims or max(dims) >= lz.ad.stack_ndim:
        return None
    return [_map_stack(lz, lambda x, r: lax.squeeze(x, dims), drop=len(dims))]


def _unstack(lz: _Lazy) -> _Lazy:
    ad = dataclasses.replace(lz.ad, stack_ndim=lz.ad.stack_ndim - 1)
    return _Lazy(ad, lz.key, tuple(a - 1 for a in lz.in_axes), tuple(a - 1 for a in lz.out_axes))


def _scan(eqn, invals, i):
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, carry, xs = invals[:nc], invals[nc : nc + ncar], invals[nc + ncar :]
    carry = _materialize(carry, "scan", "adapted weight in the carry")
    for v in xs:
        if isinstance(v, _Lazy) and not v.ad.stack_ndim:
            return None
    closed = p["jaxpr"]

    def body(c, x):
        x = [_unstack(v) if isinstance(v, _Lazy) else v for v in x]
        outs = _eval_plain_out(closed.jaxpr, closed.consts, [*consts, *c, *x], "scan")
        return outs[:ncar], outs[ncar:]

    c, ys = lax.scan(body, carry, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    return [*c, *ys]


_RULES = {
    P.convert_element_type_p: _convert,
    P.transpose_p: _transpose,
    P.reshape_p: _reshape,
    P.copy_p: _copy,
    P.slice_p: _slice,
    P.dynamic_slice_p: _dynamic_slice,
    P.squeeze_p: _squeeze,
    P.dot_general_p: _dot_general,
    P.conv_general_dilated_p: _conv,
    P.gather_p: _gather,
    P.jit_p: _inline("jaxpr"),
    P.closed_call_p: _inline("call_jaxpr"),
    P.custom_jvp_call_p: _custom,
    P.custom_vjp_call_p: _custom,
    P.remat_p: _remat,
    P.scan_p: _scan,
}


def _is_dynamic(x) -> bool:
    return is_adapted(x) or isinstance(x, jax.Array | np.ndarray | np.generic)


def apply(fn, *, rng: jax.Array | None = None):
    """Wraps `fn` so that it runs on trees holding `Adapted` leaves, adapters computed factored.

    Args:
      fn: any JAX-traceable function, e.g. `model.apply` or `lambda p, x: x @ p["w"]`.
      rng: PRNG key for adapter dropout; None (default) means no adapter dropout (evaluation). Each
        adapted leaf folds its own index into it, each stacked layer gets its own split.

    Returns:
      A function with fn's signature. Array arguments and `Adapted` leaves are traced; other
      arguments (flags, strings, callables) are passed through unchanged.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=is_adapted)
        dyn = [i for i, leaf in enumerate(leaves) if _is_dynamic(leaf)]
        if not any(is_adapted(leaves[i]) for i in dyn):
            return fn(*args, **kwargs)

        out_info = {}

        def flat_fn(*vals):
            full = list(leaves)
            for i, v in zip(dyn, vals, strict=True):
                full[i] = v
            a, k = jax.tree.unflatten(treedef, full)
            out_leaves, out_info["tree"] = jax.tree.flatten(fn(*a, **k))
            out_info["static"] = [None if _is_dynamic(o) else o for o in out_leaves]
            return [o for o in out_leaves if _is_dynamic(o)]

        stand_ins = [leaves[i].w if is_adapted(leaves[i]) else leaves[i] for i in dyn]
        closed = jax.make_jaxpr(flat_fn)(*stand_ins)
        vals, n_adapted = [], 0
        for i in dyn:
            leaf = leaves[i]
            if is_adapted(leaf):
                key = None
                if rng is not None and leaf.dropout > 0:
                    key = jax.random.fold_in(rng, n_adapted)
                    if leaf.stack_ndim:
                        n = math.prod(leaf.stack_shape)
                        keys = jax.random.split(key, n)
                        key = keys.reshape(leaf.stack_shape + keys.shape[1:])
                n_adapted += 1
                leaf = _Lazy.of(leaf, key)
            vals.append(leaf)
        outs = iter(_eval_plain_out(closed.jaxpr, closed.consts, vals, "output"))
        static = out_info["static"]
        return jax.tree.unflatten(out_info["tree"], [next(outs) if o is None else o for o in static])

    return wrapped

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

A quantized base (`mt.quantize`: `Quantized` leaves, plain or under an `Adapted` node) is traced as its float
shape. Calls and `scan` pass it through whole (under `nn.scan` each layer's slice goes into the loop body), views
keep it quantized, and a `dot_general` with it dequantizes inside a product whose backward pass dequantizes again
(`quantized_ops`), so no float copy of more than the weight in use is ever held; any other use dequantizes it.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from jax import lax

from mtlora_jax import jax_api
from mtlora_jax import quantized_ops as qops
from mtlora_jax.adapted import is_adapted
from mtlora_jax.factored import RULES as FACTORED_RULES
from mtlora_jax.factored import Lazy, bind, materialize, unstack
from mtlora_jax.quantized import is_quantized


def _eval(jaxpr, consts, args):
    """Evaluates `jaxpr` with `Lazy` values allowed in the environment."""
    env = {}
    read = lambda v: v.val if isinstance(v, jax_api.Literal) else env[v]
    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        outs = None
        if eqn.primitive not in _PASS_QUANTIZED and any(qops.is_quantized_weight(v) for v in invals):
            outs = _quantized(eqn, invals)
            if outs is None:  # any other use of a quantized base weight: dequantized there
                invals = [qops.value(v) for v in invals]
        if outs is None and any(isinstance(v, Lazy) or is_quantized(v) for v in invals):
            rule = _RULES.get(eqn.primitive)
            outs = rule(eqn, invals, i) if rule else None
            if outs is None:
                outs = bind(eqn, materialize(invals, eqn.primitive.name))
        elif outs is None:
            outs = bind(eqn, invals)
        for var, val in zip(eqn.outvars, outs, strict=True):
            env[var] = val
    return [read(v) for v in jaxpr.outvars]


def _quantized(eqn, invals):
    """A plain (not adapted) quantized weight: views stay quantized, a product recomputes it (quantized_ops)."""
    if eqn.primitive in qops.VIEWS and len(invals) == 1:
        return [qops.view(eqn, invals[0])]
    if eqn.primitive is jax_api.primitive("dot_general"):
        lhs, rhs = invals
        w_is_lhs, w_is_rhs = qops.is_quantized_weight(lhs), qops.is_quantized_weight(rhs)
        if w_is_lhs != w_is_rhs and not isinstance(lhs, Lazy) and not isinstance(rhs, Lazy):
            return [qops.product(eqn, lhs if w_is_lhs else rhs, rhs if w_is_lhs else lhs, w_is_lhs)]
    return None


def _eval_plain_out(jaxpr, consts, args, name):
    return materialize(_eval(jaxpr, consts, args), name, "returned")


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


def _scan(eqn, invals, i):
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    consts, carry, xs = invals[:nc], invals[nc : nc + ncar], invals[nc + ncar :]
    carry = materialize(carry, "scan", "adapted weight in the carry")
    xs = [qops.value(v) if isinstance(v, qops.QView) else v for v in xs]  # a view of a stacked weight: float
    for v in xs:
        if isinstance(v, Lazy) and not v.ad.stack_ndim:
            return None
    closed = p["jaxpr"]

    def body(c, x):
        x = [unstack(v) if isinstance(v, Lazy) else v for v in x]
        outs = _eval_plain_out(closed.jaxpr, closed.consts, [*consts, *c, *x], "scan")
        return outs[:ncar], outs[ncar:]

    c, ys = lax.scan(body, carry, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    return [*c, *ys]


_RULES = {
    **FACTORED_RULES,
    jax_api.primitive("jit"): _inline("jaxpr"),
    jax_api.primitive("closed_call"): _inline("call_jaxpr"),
    jax_api.primitive("custom_jvp_call"): _custom,
    jax_api.primitive("custom_vjp_call"): _custom,
    jax_api.primitive("remat"): _remat,
    jax_api.primitive("scan"): _scan,
}


# Calls whose inner jaxpr `_eval` enters: a quantized weight goes in whole (scan slices it per layer).
_PASS_QUANTIZED = frozenset(_RULES) - frozenset(FACTORED_RULES)


def _is_dynamic(x) -> bool:
    return is_adapted(x) or is_quantized(x) or isinstance(x, jax.Array | np.ndarray | np.generic)


def _is_node(x) -> bool:
    return is_adapted(x) or is_quantized(x)


def _stand_in(x):
    """What `fn` is traced with: the base weight of an adapted leaf, a quantized weight's float shape."""
    w = x.w if is_adapted(x) else x
    return jax.ShapeDtypeStruct(w.shape, jax.numpy.dtype(w.dtype)) if is_quantized(w) else w


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
        leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=_is_node)
        dyn = [i for i, leaf in enumerate(leaves) if _is_dynamic(leaf)]
        if not any(_is_node(leaves[i]) for i in dyn):
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

        stand_ins = [_stand_in(leaves[i]) for i in dyn]
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
                leaf = Lazy.of(leaf, key)
            vals.append(leaf)
        outs = iter(_eval_plain_out(closed.jaxpr, closed.consts, vals, "output"))
        static = out_info["static"]
        return jax.tree.unflatten(out_info["tree"], [next(outs) if o is None else o for o in static])

    return wrapped

"""How `mt.apply` uses a quantized base weight: views stay quantized, products recompute the float weight.

A `Quantized` weight seen by a view primitive (a cast, transpose, reshape or copy: what a model does to a kernel
before its matmul) becomes a `QView`: the codes plus the pending view equations, so nothing is dequantized yet.
A `dot_general` with such an operand runs `product`, a `jax.custom_vjp` function: the forward pass dequantizes
the weight, applies the views and multiplies; its residual is the codes, not the float weight, and the backward
pass dequantizes again to give the other operand's cotangent (the frozen base gets none). So neither pass keeps a
float copy of more than the weight in use: without this, a gradient would keep every layer's float weight from
the forward to the backward pass (as `scan` residuals), a whole float model. Any other use dequantizes there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mtlora_jax import jax_api
from mtlora_jax.quantized import Quantized, is_quantized

VIEWS = frozenset(jax_api.primitive(n) for n in ("convert_element_type", "transpose", "reshape", "copy"))


class _Ops(tuple):
    """The pending view equations of a QView (compared by identity: equations hold unhashable params)."""

    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q"], meta_fields=["ops", "shape", "dtype"])
@dataclasses.dataclass(frozen=True)
class QView:
    """A quantized weight with view equations still to apply: shape and dtype are those of the result."""

    q: Quantized
    ops: _Ops
    shape: tuple[int, ...]
    dtype: jnp.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def value(self) -> jax.Array:
        """The float array: dequantized, then every view applied."""
        from mtlora_jax.factored import bind

        w = self.q.dequantize()
        for eqn in self.ops:
            (w,) = bind(eqn, [w])
        return w


def is_quantized_weight(x) -> bool:
    return is_quantized(x) or isinstance(x, QView)


def as_view(x) -> QView:
    return x if isinstance(x, QView) else QView(x, _Ops(), tuple(x.shape), jnp.dtype(x.dtype))


def view(eqn, x) -> QView:
    """The QView of `x` (Quantized or QView) after one view equation."""
    v = as_view(x)
    aval = eqn.outvars[0].aval
    return QView(v.q, _Ops((*v.ops, eqn)), tuple(aval.shape), jnp.dtype(aval.dtype))


def value(x):
    """The float array of a quantized weight (a QView's views applied); anything else unchanged."""
    if isinstance(x, QView):
        return x.value()
    return x.dequantize() if is_quantized(x) else x


def _zero_cotangent(a):
    return jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.inexact) else np.zeros(a.shape, jax.dtypes.float0)


def product(eqn, w, x, w_is_lhs: bool) -> jax.Array:
    """`eqn` (a dot_general) of the quantized weight `w` and the array `x` (module docstring)."""
    from mtlora_jax.factored import bind

    v = as_view(w)
    x_aval = jax.ShapeDtypeStruct(x.shape, x.dtype)
    run = lambda wf, x: bind(eqn, [wf, x] if w_is_lhs else [x, wf])[0]
    weight = lambda q: dataclasses.replace(v, q=q).value()

    @jax.custom_vjp
    def f(x, q):
        return run(weight(q), x)

    def fwd(x, q):
        return run(weight(q), x), q

    def bwd(q, g):
        (dx,) = jax.linear_transpose(lambda x: run(weight(q), x), x_aval)(g)
        return dx, jax.tree.map(_zero_cotangent, q)

    f.defvjp(fwd, bwd)
    return f(x, v.q)

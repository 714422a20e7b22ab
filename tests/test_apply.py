"""mt.apply: factored compute equals the merged weights and an independent float64 numpy formula.

y = f(x; W + dW) with dW = (alpha/r · B T A)ᵀ, for every structure and leaf kind (Dense, DenseGeneral,
Embed lookup, tied head, Conv 1-3-D, fused c_attn, plain jnp / lax functions), gradients included.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_models import D_IN, D_OUT, MLP, RANK, TiedLM, cfg, init_model, np_merged

import mtlora_jax as mt

STRUCTURES = list(mt.STRUCTURES)
TOL = dict(rtol=2e-5, atol=2e-5)


def np_conv(x, k):
    """VALID, stride-1 N-d convolution [n, *sp, c] * [*ksp, c, o] -> [n, *sp', o] in float64."""
    nsp = k.ndim - 2
    win = np.lib.stride_tricks.sliding_window_view(x, k.shape[:nsp], axis=tuple(range(1, 1 + nsp)))
    # win: [n, *sp', c, *ksp]; move c after the window axes
    win = np.moveaxis(win, 1 + nsp, -1)
    letters = "ijk"[:nsp]
    return np.einsum(f"n{'xyz'[:nsp]}{letters}c,{letters}co->n{'xyz'[:nsp]}o", win, k)


class DenseGen(nn.Module):
    """q-style [embed, heads, head_dim] then out-style [heads, head_dim, embed] DenseGeneral kernels."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((3, 5), name="q")(x)  # kernel [13, 3, 5]
        return nn.DenseGeneral(D_OUT, axis=(-2, -1), name="o")(jnp.tanh(h))  # kernel [3, 5, 17]


class Conv(nn.Module):
    ndim: int

    @nn.compact
    def __call__(self, x):
        return nn.Conv(D_OUT, (2,) * self.ndim, padding="VALID", name="conv")(x)


def _case(kind, structure):
    """(fn(params, x), params, x, targets/extra cfg, numpy reference fn(merged_np_params, x))."""
    key = jax.random.key(7)
    if kind == "mlp":
        x = jax.random.normal(key, (4, D_IN))
        m = MLP()

        def ref(p, x):
            h = np.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
            return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]

        return m.apply, init_model(m, x), x, dict(targets=(r"fc1/kernel",)), ref
    if kind == "densegeneral":
        x = jax.random.normal(key, (2, 3, D_IN))
        m = DenseGen()

        def ref(p, x):
            h = np.tanh(np.einsum("bsd,dhk->bshk", x, p["q"]["kernel"]) + p["q"]["bias"])
            return np.einsum("bshk,hko->bso", h, p["o"]["kernel"]) + p["o"]["bias"]

        extra = dict(targets=(r"q/kernel", r"o/kernel"), in_ndim={r"o/kernel": 2, r"q/kernel": 1})
        return m.apply, init_model(m, x), x, extra, ref
    if kind == "tied_embed":
        x = jnp.array([[1, 2, 3, 18, 0], [5, 6, 7, 8, 9]])
        m = TiedLM()

        def ref(p, x):
            e = p["embed"]["embedding"]
            h = np.tanh(e[np.asarray(x)] @ p["proj"]["kernel"] + p["proj"]["bias"])
            return h @ e.T

        return m.apply, init_model(m, x), x, dict(targets=(r"embed/embedding", r"proj/kernel")), ref
    if kind.startswith("conv"):
        n = int(kind[-2])
        x = jax.random.normal(key, (2,) + (4,) * n + (5,))
        m = Conv(n)

        def ref(p, x):
            return np_conv(np.asarray(x, np.float64), p["conv"]["kernel"]) + p["conv"]["bias"]

        return m.apply, init_model(m, x), x, dict(targets=(r"conv/kernel",), in_ndim={r"conv/kernel": n + 1}), ref
    if kind == "fused":
        x = jax.random.normal(key, (2, 3, 8))
        params = {"c_attn": {"kernel": jax.random.normal(key, (8, 24)) / 3}}
        fn = lambda p, x: jnp.split(x @ p["c_attn"]["kernel"], 3, axis=-1)
        ref = lambda p, x: np.split(x @ p["c_attn"]["kernel"], 3, axis=-1)
        extra = dict(targets=(r"c_attn/kernel",), fused={r"c_attn/kernel": (3, (True, False, True))}, rank=2)
        return fn, params, x, extra, ref
    if kind == "take_and_lax_conv":
        ids = jnp.array([[0, 4, 2], [1, 1, 3]])
        params = {"table": jax.random.normal(key, (5, 4)), "k": jax.random.normal(key, (3, 4, 6))}

        def fn(p, ids):
            h = jnp.take(p["table"], ids, axis=0)  # [2, 3, 4]
            dn = ("NWC", "WIO", "NWC")
            return jax.lax.conv_general_dilated(h, p["k"], (1,), "VALID", dimension_numbers=dn)

        ref = lambda p, ids: np_conv(p["table"][np.asarray(ids)], p["k"])
        extra = dict(targets=(r"table", r"k"), in_ndim={r"k": 2}, rank=2)
        return fn, params, ids, extra, ref
    raise ValueError(kind)


KINDS = ["mlp", "densegeneral", "tied_embed", "conv1d", "conv2d", "conv3d", "fused", "take_and_lax_conv"]


def _adapted(kind, structure, **over):
    fn, params, x, extra, ref = _case(kind, structure)
    extra = {**extra, **over}
    ad = mt.init(params, cfg(structure, **extra), jax.random.key(1))
    return fn, params, ad, x, ref


def _wrap(kind):
    """Flax models take {"params": p}; the plain functions take p."""
    flax_kinds = ("mlp", "densegeneral", "tied_embed", "conv1d", "conv2d", "conv3d")
    return (lambda p: {"params": p}) if kind in flax_kinds else (lambda p: p)


def _np_params(ad):
    return jax.tree.map(
        lambda v: np_merged(v) if mt.is_adapted(v) else np.asarray(v, np.float64), ad, is_leaf=mt.is_adapted
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("structure", STRUCTURES)
def test_apply_equals_merged_and_numpy(kind, structure):
    fn, _, ad, x, ref = _adapted(kind, structure)
    wrap = _wrap(kind)
    with jax.default_matmul_precision("float32"):
        y = mt.apply(fn)(wrap(ad), x)
        y_merged = fn(wrap(mt.merge(ad)), x)
    y_np = ref(_np_params(ad), np.asarray(x, np.float64) if x.dtype != jnp.int32 else x)
    for a, b, c in zip(jax.tree.leaves(y), jax.tree.leaves(y_merged), jax.tree.leaves(y_np), strict=True):
        np.testing.assert_allclose(a, b, **TOL)
        np.testing.assert_allclose(a, c, **TOL)
    # the adapters really change the output (b_init="gaussian"), so the comparison is not vacuous
    y_base = fn(wrap(jax.tree.map(lambda v: v.w if mt.is_adapted(v) else v, ad, is_leaf=mt.is_adapted)), x)
    assert (
        max(
            float(np.abs(np.asarray(a) - np.asarray(b)).max())
            for a, b in zip(jax.tree.leaves(y), jax.tree.leaves(y_base), strict=True)
        )
        > 1e-3
    )


@pytest.mark.parametrize("kind", ["mlp", "tied_embed", "conv2d", "fused", "densegeneral"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_factor_gradients_equal_materialized(kind, structure):
    """d/d(a, b, c, d) of <y, g> through mt.apply equals that through merge (the dense formula)."""
    fn, _, ad, x, _ = _adapted(kind, structure)
    wrap = _wrap(kind)
    trainable, frozen = mt.split(ad)
    out = fn(wrap(mt.merge(ad)), x)
    g = [jax.random.normal(jax.random.key(i), o.shape) for i, o in enumerate(jax.tree.leaves(out))]
    dot = lambda y: sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(y), g, strict=True))
    with jax.default_matmul_precision("float32"):
        g_apply = jax.grad(lambda t: dot(mt.apply(fn)(wrap(mt.combine(t, frozen)), x)))(trainable)
        g_dense = jax.grad(lambda t: dot(fn(wrap(mt.merge(mt.combine(t, frozen))), x)))(trainable)
    for a, b in zip(jax.tree.leaves(g_apply), jax.tree.leaves(g_dense), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert sum(float(jnp.abs(a).sum()) for a in jax.tree.leaves(g_apply)) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_zero_init_is_the_base_exactly(kind):
    fn, params, x, extra, _ = _case(kind, "ctcm")
    ad = mt.init(params, mt.MTLoRAConfig(structure="ctcm", **{"rank": RANK, **extra}), jax.random.key(0))
    wrap = _wrap(kind)
    for a, b in zip(jax.tree.leaves(mt.apply(fn)(wrap(ad), x)), jax.tree.leaves(fn(wrap(params), x)), strict=True):
        np.testing.assert_array_equal(a, b)

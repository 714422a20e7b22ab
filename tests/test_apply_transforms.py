"""mt.apply under jit, grad, vmap, remat and scan; mixed precision; dropout; fallback; no dense dW in a step."""

import dataclasses
import warnings

import flax.linen as nn
import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from core_models import D_IN, D_OUT, MLP, cfg, init_model

import mtlora_jax as mt

TOL = dict(rtol=2e-5, atol=2e-5)


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(D_IN, name="dense")(h)), None


class Stack(nn.Module):
    """Three Blocks, either unrolled, nn.scan-ned (stacked params) or nn.remat-ed."""

    mode: str = "scan"

    @nn.compact
    def __call__(self, x):
        if self.mode == "scan":
            scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scan(name="layers")(x, None)[0]
        block = nn.remat(Block) if self.mode == "remat" else Block
        for i in range(3):
            x, _ = block(name=f"layers_{i}")(x, None)
        return x


@pytest.mark.parametrize("mode", ["scan", "remat"])
def test_scan_and_remat_models(mode):
    x = jax.random.normal(jax.random.key(0), (4, D_IN))
    m = Stack(mode)
    params = init_model(m, x)
    target = r"layers/dense/kernel" if mode == "scan" else r"layers_\d/dense/kernel"
    ad = mt.init(params, cfg("icfm", target, stack_ndim={r"layers/.*": 1}), jax.random.key(1))
    if mode == "scan":
        assert ad["layers"]["dense"]["kernel"].a.shape == (3, 3, D_IN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to a materialized weight
        y = jax.jit(mt.apply(m.apply))({"params": ad}, x)
    np.testing.assert_allclose(y, m.apply({"params": mt.merge(ad)}, x), **TOL)
    tr, fr = mt.split(ad)
    loss = lambda f: lambda t: jnp.sum(f({"params": mt.combine(t, fr)}, x) ** 2)
    g1 = jax.grad(loss(mt.apply(m.apply)))(tr)
    g2 = jax.grad(lambda t: jnp.sum(m.apply({"params": mt.merge(mt.combine(t, fr))}, x) ** 2))(tr)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_scan_and_unrolled_agree():
    """The same stacked adapters, run by nn.scan or layer by layer, give the same output."""
    x = jax.random.normal(jax.random.key(0), (4, D_IN))
    scan, unrolled = Stack("scan"), Stack("unrolled")
    ad = mt.init(
        init_model(scan, x), cfg("dtsm", r"layers/dense/kernel", stack_ndim={r"layers/.*": 1}), jax.random.key(1)
    )
    stacked = ad["layers"]["dense"]

    def layer(i):
        k = stacked["kernel"]
        kernel = dataclasses.replace(k, w=k.w[i], a=k.a[i], b=k.b[i], c=k.c[i], d=k.d[i], stack_ndim=0)
        return {"dense": {"bias": stacked["bias"][i], "kernel": kernel}}

    per_layer = {f"layers_{i}": layer(i) for i in range(3)}
    y_scan = mt.apply(scan.apply)({"params": ad}, x)
    y_unrolled = mt.apply(unrolled.apply)({"params": per_layer}, x)
    np.testing.assert_allclose(y_scan, y_unrolled, **TOL)


def test_plain_lax_scan_and_checkpoint_and_vmap():
    w = jax.random.normal(jax.random.key(0), (3, D_IN, D_IN)) / 4
    params = {"w": w}
    ad = mt.init(params, cfg("ctcm", r"w", stack_ndim={r"w": 1}), jax.random.key(1))

    def fn(p, x):
        body = jax.checkpoint(lambda h, wi: (jnp.tanh(h @ wi), None))
        return jax.lax.scan(body, x, p["w"])[0]

    x = jax.random.normal(jax.random.key(2), (5, D_IN))
    want = fn(mt.merge(ad), x)
    np.testing.assert_allclose(mt.apply(fn)(ad, x), want, **TOL)
    per_example = jax.vmap(mt.apply(fn), in_axes=(None, 0))(ad, x)
    np.testing.assert_allclose(per_example, want, **TOL)


def test_bf16_base_fp32_adapters():
    """A bf16 frozen base with fp32 master adapters: bf16 compute, fp32 adapter gradients."""
    x = jax.random.normal(jax.random.key(0), (4, D_IN)).astype(jnp.bfloat16)
    m = nn.Dense(D_OUT, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = init_model(m, x)
    ad = mt.init(params, cfg("shim", r"kernel"), jax.random.key(1))
    assert ad["kernel"].w.dtype == jnp.bfloat16 and ad["kernel"].a.dtype == jnp.float32
    y = mt.apply(m.apply)({"params": ad}, x)
    assert y.dtype == jnp.bfloat16
    ref = np.asarray(x, np.float32) @ (np.asarray(ad["kernel"].w, np.float32) + np.asarray(mt.delta(ad["kernel"])))
    np.testing.assert_allclose(
        np.asarray(y, np.float32), ref + np.asarray(params["bias"], np.float32), rtol=3e-2, atol=3e-2
    )
    tr, fr = mt.split(ad)
    g = jax.grad(lambda t: jnp.sum(mt.apply(m.apply)({"params": mt.combine(t, fr)}, x).astype(jnp.float32)))(tr)
    assert g["kernel"].a.dtype == jnp.float32


def test_dropout_uses_rng_and_only_the_adapter_path():
    x = jax.random.normal(jax.random.key(0), (64, D_IN))
    m = MLP()
    params = init_model(m, x)
    ad = mt.init(params, cfg("shim", r"fc1/kernel", dropout=0.5), jax.random.key(1))
    plain = mt.apply(m.apply)({"params": ad}, x)
    np.testing.assert_allclose(plain, m.apply({"params": mt.merge(ad)}, x), **TOL)  # no rng: no dropout
    d1 = mt.apply(m.apply, rng=jax.random.key(5))({"params": ad}, x)
    d1_again = mt.apply(m.apply, rng=jax.random.key(5))({"params": ad}, x)
    d2 = mt.apply(m.apply, rng=jax.random.key(6))({"params": ad}, x)
    np.testing.assert_array_equal(d1, d1_again)
    assert float(jnp.abs(d1 - plain).max()) > 1e-3 and float(jnp.abs(d1 - d2).max()) > 1e-3
    # with B = 0 the adapter path is zero, dropout or not: the base path is never dropped
    fresh = mt.init(params, mt.MTLoRAConfig(rank=3, targets=r"fc1/kernel", dropout=0.5), jax.random.key(1))
    np.testing.assert_array_equal(
        mt.apply(m.apply, rng=jax.random.key(5))({"params": fresh}, x), m.apply({"params": params}, x)
    )


def test_unsupported_use_materializes_with_one_warning():
    params = {"w": jax.random.normal(jax.random.key(0), (D_IN, D_OUT))}
    ad = mt.init(params, cfg("dtsm", r"w"), jax.random.key(1))
    fn = lambda p, x: x @ p["w"] + jnp.sum(p["w"] * p["w"])
    x = jnp.ones((2, D_IN))
    with pytest.warns(UserWarning, match="feeds `mul`") as rec:
        y = mt.apply(fn)(ad, x)
    assert len([r for r in rec if "materializing" in str(r.message)]) == 1
    np.testing.assert_allclose(y, fn(mt.merge(ad), x), rtol=1e-5, atol=1e-3)


def test_non_array_arguments_pass_through():
    m = nn.Dropout(0.5)
    ad = {"w": mt.init({"w": jnp.ones((D_IN, D_OUT))}, cfg("shim", r"w"), jax.random.key(0))["w"]}
    fn = lambda p, x, *, deterministic, name: (x @ p["w"], name) if deterministic else None
    y, name = mt.apply(fn)(ad, jnp.ones((1, D_IN)), deterministic=True, name="ok")
    assert name == "ok" and y.shape == (1, D_OUT)
    assert mt.apply(m.apply)({}, jnp.ones(3), deterministic=True).shape == (3,)


def _all_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield tuple(v.aval.shape)
    for sub in jcore.subjaxprs(jaxpr):
        yield from _all_shapes(sub)


@pytest.mark.parametrize("merged", [False, True])
def test_no_dense_update_in_the_training_step(merged):
    """The jitted step (forward, grads w.r.t. the adapters, Adam) has no [d_in, d_out] intermediate.

    The naive path that materializes W + dW inside the step does, which shows the check can fail.
    """
    x = jax.random.normal(jax.random.key(0), (8, D_IN))
    m = MLP()
    ad = mt.init(init_model(m, x), cfg("ctcm", r"fc1/kernel"), jax.random.key(1))
    tr, fr = mt.split(ad, extra_trainable=(r"fc2/.*",))
    tx = mt.optimizer(optax.adamw(1e-3), tr, extra_trainable=(r"fc2/.*",))

    def step(tr, opt, fr, x):
        def loss(t):
            p = mt.combine(t, fr)
            y = m.apply({"params": mt.merge(p)}, x) if merged else mt.apply(m.apply)({"params": p}, x)
            return jnp.mean(y**2)

        g = jax.grad(loss)(tr)
        upd, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, upd), opt

    jaxpr = jax.make_jaxpr(jax.jit(step))(tr, tx.init(tr), fr, x).jaxpr
    shapes = set(_all_shapes(jaxpr))
    dense = {(D_IN, D_OUT), (D_OUT, D_IN)}
    assert bool(shapes & dense) == merged, sorted(shapes)


def test_indexing_stacked_weights_stays_factored():
    """w[i] (slice + squeeze) and lax.dynamic_index_in_dim on a stacked adapted weight, under fori_loop."""
    w = jax.random.normal(jax.random.key(0), (3, D_IN, D_IN)) / 4
    ad = mt.init({"w": w}, cfg("ctcm", r"w", stack_ndim={r"w": 1}, dropout=0.1), jax.random.key(1))

    def fn(p, x):
        x = jnp.tanh(x @ p["w"][1])
        body = lambda i, h: jnp.tanh(h @ jax.lax.dynamic_index_in_dim(p["w"], i, keepdims=False))
        return jax.lax.fori_loop(0, 3, body, x)

    x = jax.random.normal(jax.random.key(2), (5, D_IN))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = jax.jit(mt.apply(fn))(ad, x)
        mt.apply(fn, rng=jax.random.key(3))(ad, x)  # stacked dropout keys are sliced alike
    np.testing.assert_allclose(y, fn(mt.merge(ad), x), **TOL)

"""merge / unmerge: W' = w + dW and back; untouched leaves keep their identity."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_models import D_IN, TiedLM, cfg, init_model, np_merged

import mtlora_jax as mt


@pytest.mark.parametrize("structure", list(mt.STRUCTURES))
def test_merge_forward_and_unmerge(structure):
    ids = jnp.array([[1, 2, 3], [4, 5, 6]])
    m = TiedLM()
    params = init_model(m, ids)
    ad = mt.init(params, cfg(structure, (r"proj/kernel", r"embed/embedding")), jax.random.key(3))
    merged = mt.merge(ad)
    np.testing.assert_allclose(merged["proj"]["kernel"], np_merged(ad["proj"]["kernel"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        m.apply({"params": merged}, ids), mt.apply(m.apply)({"params": ad}, ids), rtol=2e-5, atol=2e-5
    )
    assert merged["proj"]["bias"] is ad["proj"]["bias"]  # non-targets: the same objects
    back = mt.unmerge(merged, ad)
    for p in ("proj/kernel", "embed/embedding"):
        a, b = p.split("/")
        np.testing.assert_allclose(back[a][b].w, params[a][b], rtol=1e-5, atol=1e-6)
        assert back[a][b].a is ad[a][b].a
    assert back["proj"]["bias"] is merged["proj"]["bias"]


def test_delta_for_fused_and_stacked_layouts():
    w = jnp.arange(3 * 8 * 24, dtype=jnp.float32).reshape(3, 8, 24) / 100
    ad = mt.init(
        {"c_attn": w},
        cfg("ctcm", r"c_attn", rank=2, stack_ndim={r"c_attn": 1}, fused={r"c_attn": (3, (True, False, True))}),
        jax.random.key(0),
    )["c_attn"]
    dw = np.asarray(mt.delta(ad))
    assert dw.shape == w.shape
    for layer in range(3):
        one = dataclasses.replace(
            ad, w=ad.w[layer], a=ad.a[layer], b=ad.b[layer], c=ad.c[layer], d=ad.d[layer], stack_ndim=0
        )
        np.testing.assert_allclose(dw[layer], np_merged(one) - np.asarray(one.w, np.float64), rtol=1e-5, atol=1e-6)
    assert not np.any(dw[:, :, 8:16])  # the disabled k slice stays exactly unadapted


def test_unmerge_rejects_mismatched_trees():
    ad = mt.init({"w": jnp.ones((D_IN, 5))}, cfg("shim", r"w"), jax.random.key(0))
    with pytest.raises(ValueError, match=r"unmerge: merged leaf has shape \(5, 5\), adapter needs \(13, 5\)"):
        mt.unmerge({"w": jnp.ones((5, 5))}, ad)
    with pytest.raises(ValueError, match="unmerge: the merged tree does not match"):
        mt.unmerge({"v": jnp.ones((D_IN, 5))}, ad)

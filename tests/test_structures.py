"""T structures and dW = (alpha/r) · B · T · A against float64 numpy (REFERENCE.md, "The math")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_models import D_IN, D_OUT, RANK, cfg, np_delta_torch, np_t

import mtlora_jax as mt
from mtlora_jax import structures


@pytest.mark.parametrize("structure", list(mt.STRUCTURES))
def test_delta_matches_numpy(structure):
    """delta(w) == (alpha/r · B T A)ᵀ for d_in != d_out, rank > 1, in w's [d_in, d_out] layout."""
    params = {"layer": {"kernel": jnp.ones((D_IN, D_OUT))}}
    ad = mt.init(params, cfg(structure, r"layer/kernel"), jax.random.key(0))["layer"]["kernel"]
    with jax.default_matmul_precision("float32"):
        dw = np.asarray(mt.delta(ad), np.float64)
    assert dw.shape == (D_IN, D_OUT)
    np.testing.assert_allclose(dw, np_delta_torch(ad).T, rtol=1e-5, atol=1e-6)
    assert np.abs(dw).max() > 1e-3  # b_init="gaussian": a real, nonzero update


@pytest.mark.parametrize("structure", ["shim", "icfm", "ctcm", "dtsm"])
def test_transform_formula(structure):
    kc, kd = jax.random.split(jax.random.key(1))
    c, d = jax.random.normal(kc, (RANK, RANK)), jax.random.normal(kd, (RANK, RANK))
    t = structures.transform(structure, c, d if structures.STRUCTURES[structure].num_mats == 2 else None)
    np.testing.assert_allclose(t, np_t(structure, c, d), rtol=1e-5, atol=1e-6)


def test_icfm_is_symmetric_psd():
    c = jax.random.normal(jax.random.key(2), (5, 5))
    t = np.asarray(structures.transform("icfm", c, None), np.float64)
    np.testing.assert_allclose(t, t.T, atol=1e-6)
    assert np.linalg.eigvalsh(t).min() > -1e-5


def test_lora_has_no_t_and_stacked_transform():
    assert structures.transform("lora", None, None) is None
    c = jax.random.normal(jax.random.key(3), (4, RANK, RANK))
    stacked = structures.transform("icfm", c, None)
    np.testing.assert_allclose(stacked[2], c[2] @ c[2].T, rtol=1e-5, atol=1e-6)


def test_init_ranges_follow_kaiming_uniform():
    """A ~ U(±1/sqrt(d_in)), C, D ~ U(±1/sqrt(r)), B = 0 (the reference's init)."""
    params = {"x": {"kernel": jnp.ones((400, 300))}}
    ad = mt.init(params, mt.MTLoRAConfig(rank=16, structure="ctcm", targets="x/kernel"), jax.random.key(0))["x"][
        "kernel"
    ]
    for m, bound in ((ad.a, 1 / 20), (ad.c, 1 / 4), (ad.d, 1 / 4)):
        m = np.asarray(m)
        assert np.abs(m).max() <= bound and np.abs(m).max() > 0.9 * bound
        assert abs(m.mean()) < bound / 5
    assert not np.any(np.asarray(ad.b))
    assert not np.any(np.asarray(mt.delta(ad)))


def test_identity_inits_give_t_identity():
    for structure in ("shim", "icfm", "ctcm", "dtsm"):
        c, d = structures.init_cd(structure, jax.random.key(0), (RANK, RANK), jnp.float32, "identity")
        np.testing.assert_array_equal(structures.transform(structure, c, d), np.eye(RANK))
        c, d = structures.init_cd(structure, jax.random.key(0), (RANK, RANK), jnp.float32, "near_identity")
        t = np.asarray(structures.transform(structure, c, d))
        assert 0 < np.abs(t - np.eye(RANK)).max() < 0.5


def test_errors_name_the_cause():
    with pytest.raises(ValueError, match=r"unknown MTLoRA structure 'loha'; valid: lora, shim, icfm, ctcm, dtsm"):
        mt.MTLoRAConfig(structure="loha", targets="x")
    with pytest.raises(ValueError, match="zero gradients"):
        structures.init_cd("icfm", jax.random.key(0), (2, 2), jnp.float32, "zeros")
    with pytest.raises(ValueError, match="gradient exactly zero"):
        mt.MTLoRAConfig(structure="ctcm", targets="x", c_init="zeros", b_init="gaussian")
    with pytest.raises(ValueError, match="gradient exactly zero"):
        mt.MTLoRAConfig(structure="shim", targets="x", c_init="zeros")  # B = 0 too: dead
    mt.MTLoRAConfig(structure="shim", targets="x", c_init="zeros", b_init="gaussian")  # allowed: B carries it
    with pytest.raises(ValueError, match="needs square c"):
        structures.transform("shim", jnp.ones((2, 3)), None)

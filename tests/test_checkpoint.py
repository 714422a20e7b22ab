"""Adapter-only Orbax checkpoints (round trip, no base weights, fresh process, clear errors) and PEFT export."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from core_models import D_IN, MLP, cfg, init_model

import mtlora_jax as mt

EXTRA = (r"fc2/.*",)


def _trained(structure="ctcm"):
    x = jax.random.normal(jax.random.key(0), (8, D_IN))
    m = MLP()
    base = init_model(m, x)
    ad = mt.init(base, cfg(structure, r"fc1/kernel"), jax.random.key(1))
    tx = mt.optimizer(optax.adam(1e-2), ad, EXTRA)
    opt = tx.init(ad)
    g = jax.grad(lambda p: jnp.sum(mt.apply(m.apply)({"params": p}, x) ** 2))(ad)
    upd, opt = tx.update(g, opt, ad)
    return m, base, optax.apply_updates(ad, upd), tx, opt, x


def test_round_trip_with_optimizer_state(tmp_path):
    m, base, ad, tx, opt, x = _trained()
    path = mt.save_adapters(tmp_path / "ckpt", ad, extra_trainable=EXTRA, opt_state=opt, step=7)
    assert os.path.isabs(path)
    fresh = mt.init(base, cfg("ctcm", r"fc1/kernel"), jax.random.key(99))  # different factors
    loaded, loaded_opt, step = mt.load_training_state(path, fresh, tx.init(fresh))
    chex.assert_trees_all_equal(mt.adapter_state(loaded, EXTRA), mt.adapter_state(ad, EXTRA))
    chex.assert_trees_all_equal(loaded_opt, opt)
    assert step == 7
    assert loaded["fc1"]["kernel"].w is fresh["fc1"]["kernel"].w  # the base is the template's, not the file's
    np.testing.assert_array_equal(mt.apply(m.apply)({"params": loaded}, x), mt.apply(m.apply)({"params": ad}, x))
    assert mt.load_adapters(path, fresh)["fc2"]["kernel"] is not fresh["fc2"]["kernel"]


def test_folder_holds_no_base_weights(tmp_path):
    base = {"big": {"kernel": jnp.ones((256, 512)), "bias": jnp.ones(512)}}
    ad = mt.init(base, cfg("ctcm", r"big/kernel"), jax.random.key(0))
    path = mt.save_adapters(tmp_path / "ckpt", ad)
    with ocp.StandardCheckpointer() as ck:  # read the stored array item back, whatever it holds
        stored = ck.restore(os.path.join(path, "adapters"))
    assert {k: tuple(v.shape) for k, v in stored.items()} == {
        "big/kernel/a": (3, 256),
        "big/kernel/b": (512, 3),
        "big/kernel/c": (3, 3),
        "big/kernel/d": (3, 3),
    }
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    assert size < base["big"]["kernel"].nbytes / 8, size


def test_restore_in_a_fresh_process(tmp_path):
    m, base, ad, *_ = _trained("icfm")
    path = mt.save_adapters(tmp_path / "ckpt", ad, extra_trainable=EXTRA)
    np.save(tmp_path / "x.npy", np.asarray(jax.random.normal(jax.random.key(0), (8, D_IN))))
    want = mt.apply(m.apply)({"params": ad}, jnp.asarray(np.load(tmp_path / "x.npy")))
    np.save(tmp_path / "want.npy", np.asarray(want))
    script = f"""
import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
import jax, jax.numpy as jnp, numpy as np
import mtlora_jax as mt
from core_models import MLP, cfg, init_model
x = jnp.asarray(np.load({str(tmp_path / "x.npy")!r}))
m = MLP(); base = init_model(m, x)
ad = mt.load_adapters({path!r}, mt.init(base, cfg("icfm", r"fc1/kernel"), jax.random.key(5)))
np.testing.assert_array_equal(mt.apply(m.apply)({{"params": ad}}, x), np.load({str(tmp_path / "want.npy")!r}))
print("restored ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "restored ok" in out.stdout


def test_mismatched_template_names_the_path(tmp_path):
    _, base, ad, *_ = _trained()
    path = mt.save_adapters(tmp_path / "ckpt", ad)
    with pytest.raises(ValueError, match=r"adapter 'fc1/kernel' has structure='ctcm', the template has 'shim'"):
        mt.load_adapters(path, mt.init(base, cfg("shim", r"fc1/kernel"), jax.random.key(0)))
    with pytest.raises(ValueError, match=r"adapter 'fc1/kernel' has rank=3, the template has 2"):
        mt.load_adapters(path, mt.init(base, cfg("ctcm", r"fc1/kernel", rank=2), jax.random.key(0)))
    with pytest.raises(ValueError, match=r"missing adapter leaf 'fc2/kernel/a'"):
        two = cfg("ctcm", r"fc(1|2)/kernel", rank_pattern={r"fc2/.*": 2})
        mt.load_adapters(path, mt.init(base, two, jax.random.key(0)))
    with pytest.raises(FileNotFoundError, match="no adapter checkpoint at"):
        mt.load_adapters(tmp_path / "nope", ad)


def test_peft_export_is_exact():
    """lora_B · lora_A · (lora_alpha / r) == scale · B_full · T · A, the fused joint T included."""
    params = {"attn": {"c_attn": {"kernel": jnp.ones((8, 24))}}, "mlp": {"c_fc": {"kernel": jnp.ones((8, 12))}}}
    fused = {r".*/c_attn/kernel": (3, (True, False, True))}
    c = cfg("ctcm", (r".*/c_attn/kernel", r".*/c_fc/kernel"), rank=2, fused=fused)
    ad = mt.init(params, c, jax.random.key(0))
    state, config = mt.peft_lora_state(ad, lambda p: p.rsplit("/", 1)[0].replace("/", "."), fan_in_fan_out=True)
    assert config["r"] in (2, 4) and config["fan_in_fan_out"] is True
    for path, name in (("attn/c_attn/kernel", "attn.c_attn"), ("mlp/c_fc/kernel", "mlp.c_fc")):
        a = state[f"base_model.model.{name}.lora_A.weight"]
        b = state[f"base_model.model.{name}.lora_B.weight"]
        r = config["rank_pattern"].get(name, config["r"])
        alpha = config["alpha_pattern"].get(name, config["lora_alpha"])
        leaf = ad[path.split("/")[0]][path.split("/")[1]]["kernel"]
        np.testing.assert_allclose((alpha / r) * b @ a, np.asarray(mt.delta(leaf)).T, rtol=1e-5, atol=1e-6)
    assert state["base_model.model.attn.c_attn.lora_A.weight"].shape == (4, 8)  # k·r rows, joint T
    assert state["base_model.model.attn.c_attn.lora_B.weight"].shape == (24, 4)

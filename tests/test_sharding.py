"""Adapters are placed like their base weight: A split like W's input axis, B like its output, T replicated.

On 8 simulated CPU devices (tests/conftest.py), the factored step keeps those shardings, gives the same
numbers as one device, and its compiled HLO has no all-gather of a base weight on a tensor-parallel mesh.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import mtlora_jax as mt
from mtlora_jax import sharding

D, F = 16, 32


def _params():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "up": {"kernel": jax.random.normal(k[0], (D, F)) / 4},
        "down": {"kernel": jax.random.normal(k[1], (F, D)) / 4},
        "c_attn": {"kernel": jax.random.normal(k[2], (D, 3 * D)) / 4},
    }


def _adapted():
    cfg = mt.MTLoRAConfig(
        rank=4,
        structure="ctcm",
        targets=(r"up/kernel", r"down/kernel", r"c_attn/kernel"),
        fused={r"c_attn/kernel": (3, (True, False, True))},
        b_init="gaussian",
    )
    return mt.init(_params(), cfg, jax.random.key(1))


def _base_spec(path, w):
    """Megatron-style tensor parallelism: column-split up and c_attn, row-split down."""
    return {"up/kernel": P(None, "tensor"), "down/kernel": P("tensor", None), "c_attn/kernel": P(None, "tensor")}[path]


def test_specs_follow_the_base_weight():
    specs = sharding.partition_specs(_adapted(), _base_spec)
    up, down = specs["up"]["kernel"], specs["down"]["kernel"]
    assert (up.w, up.a, up.b, up.c, up.d) == (
        P(None, "tensor"),
        P(None, None),
        P("tensor", None),
        P(None, None),
        P(None, None),
    )
    assert (down.a, down.b) == (P(None, "tensor"), P(None, None))
    stacked = mt.init(
        {"w": jnp.ones((3, D, F))},
        mt.MTLoRAConfig(rank=2, structure="icfm", targets="w", stack_ndim={"w": 1}),
        jax.random.key(0),
    )
    s = sharding.partition_specs(stacked, lambda p, w: P(None, "fsdp", "tensor"))["w"]
    assert (s.a, s.b, s.c, s.d) == (P(None, None, "fsdp"), P(None, "tensor", None), P(None, None, None), None)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(8), ("tensor",))
    odd = mt.init({"w": jnp.ones((D, 12))}, mt.MTLoRAConfig(rank=2, targets="w"), jax.random.key(0))
    assert sharding.partition_specs(odd, lambda p, w: P(None, "tensor"), mesh)["w"].b == P(None, None)  # 12 % 8


def _step_fn(ad_like):
    fwd = lambda p, x: (
        jnp.tanh(jnp.tanh(x @ p["up"]["kernel"]) @ p["down"]["kernel"]) + (x @ p["c_attn"]["kernel"])[:, :D]
    )

    def step(tr, fr, x):
        loss = lambda t: jnp.mean(mt.apply(fwd)(mt.combine(t, fr), x) ** 2)
        value, g = jax.value_and_grad(loss)(tr)
        return value, jax.tree.map(lambda a, b: a - 0.1 * b, tr, g)

    return step


def test_sharded_step_matches_one_device_and_gathers_no_weight():
    ad = _adapted()
    tr, fr = mt.split(ad)
    x = jax.random.normal(jax.random.key(2), (8, D))
    step = _step_fn(ad)
    want_loss, want_tr = jax.jit(step)(tr, fr, x)

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
    specs = sharding.partition_specs(ad, _base_spec, mesh)
    tr_s, fr_s = (sharding.named_shardings(t, mesh) for t in mt.split(specs))
    x_s = NamedSharding(mesh, P("data", None))
    jitted = jax.jit(step, in_shardings=(tr_s, fr_s, x_s), out_shardings=(NamedSharding(mesh, P()), tr_s))
    args = (jax.device_put(tr, tr_s), jax.device_put(fr, fr_s), jax.device_put(x, x_s))
    assert args[1]["up"]["kernel"].w.sharding.spec == P(None, "tensor")
    assert len(args[1]["up"]["kernel"].w.addressable_shards[0].data.shape) == 2
    assert args[1]["up"]["kernel"].w.addressable_shards[0].data.shape == (D, F // 4)  # really split
    loss, new_tr = jitted(*args)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_tr), jax.tree.leaves(want_tr), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert new_tr["up"]["kernel"].b.sharding.spec == P("tensor", None)
    hlo = jitted.lower(*args).compile().as_text()
    gathered = [
        line
        for line in hlo.splitlines()
        if "all-gather" in line and ("[16,32]" in line or "[32,16]" in line or "[16,48]" in line)
    ]
    assert not gathered, gathered[:3]

"""A frozen random MLP plus MTLoRA learns XOR (the library alone, no training framework)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import mtlora_jax as mt


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(32, name="hidden")(x))
        return nn.Dense(1, name="out")(h)[:, 0]


@pytest.mark.parametrize("structure", list(mt.STRUCTURES))
def test_frozen_mlp_learns_xor(structure):
    x = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = jnp.array([0.0, 1.0, 1.0, 0.0])
    net = Net()
    params = net.init(jax.random.key(0), x)["params"]
    cfg = mt.MTLoRAConfig(
        rank=2,
        alpha=2.0,
        structure=structure,
        targets=(r"hidden/kernel", r"out/kernel"),
        rank_pattern={r"out/kernel": 1},
    )  # out is [32, 1]: rank 1 at most
    ad = mt.init(params, cfg, jax.random.key(1))
    # Biases start at zero: frozen, the input (0, 0) would map to logit 0 forever, so they train too.
    trainable, frozen = mt.split(ad, extra_trainable=(r".*/bias",))
    tx = mt.optimizer(optax.adam(0.05), trainable, extra_trainable=(r".*/bias",))
    opt = tx.init(trainable)
    loss = lambda t: optax.sigmoid_binary_cross_entropy(
        mt.apply(net.apply)({"params": mt.combine(t, frozen)}, x), y
    ).mean()

    @jax.jit
    def step(t, opt):
        value, g = jax.value_and_grad(loss)(t)
        upd, opt = tx.update(g, opt, t)
        return optax.apply_updates(t, upd), opt, value

    first = loss(trainable)
    for _ in range(500):
        trainable, opt, value = step(trainable, opt)
    pred = mt.apply(net.apply)({"params": mt.combine(trainable, frozen)}, x) > 0
    assert value < 0.05 < 0.5 < first, (float(value), float(first))
    assert (pred == (y > 0.5)).all()

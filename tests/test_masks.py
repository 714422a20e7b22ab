"""One trainable mask drives split/combine and the optimizer: frozen leaves never move, carry no state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from core_models import D_IN, MLP, cfg, init_model

import mtlora_jax as mt

EXTRA = (r"fc2/.*",)


def _setup():
    x = jax.random.normal(jax.random.key(0), (16, D_IN))
    y = (x[:, 0] > 0).astype(jnp.int32)
    m = MLP()
    ad = mt.init(init_model(m, x), cfg("icfm", r"fc1/kernel"), jax.random.key(1))
    return m, ad, x, y


def test_split_combine_roundtrip_and_mask():
    _, ad, _, _ = _setup()
    mask = mt.trainable_mask(ad, EXTRA)
    k = mask["fc1"]["kernel"]
    assert (k.w, k.a, k.b, k.c, k.d) == (False, True, True, True, None)
    assert mask["fc1"]["bias"] is False and mask["fc2"]["kernel"] is True
    trainable, frozen = mt.split(ad, EXTRA)
    assert trainable["fc1"]["kernel"].w is None and frozen["fc1"]["kernel"].a is None
    assert trainable["fc1"]["bias"] is None and frozen["fc2"]["bias"] is None
    back = mt.combine(trainable, frozen)
    assert jax.tree.structure(back, is_leaf=mt.is_adapted) == jax.tree.structure(ad, is_leaf=mt.is_adapted)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(ad), strict=True):
        assert a is b
    with pytest.raises(ValueError, match=r"extra_trainable pattern 'head/\.\*' matches no parameter path"):
        mt.split(ad, (r"head/.*",))


@pytest.mark.parametrize("on", ["full", "trainable"])
def test_three_adamw_steps_freeze_exactly(on):
    """Frozen leaves bit-identical after 3 AdamW steps (weight decay 0.1); every trainable leaf moved."""
    m, ad, x, y = _setup()
    tx = mt.optimizer(optax.adamw(1e-2, weight_decay=0.1), ad, EXTRA)
    tree = ad if on == "full" else mt.split(ad, EXTRA)[0]
    frozen = mt.split(ad, EXTRA)[1]
    opt = tx.init(tree)

    def loss(t):
        p = t if on == "full" else mt.combine(t, frozen)
        logits = mt.apply(m.apply)({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    new = tree
    for _ in range(3):
        g = jax.grad(loss)(new)
        upd, opt = tx.update(g, opt, new)
        new = optax.apply_updates(new, upd)
    mask = mt.trainable_mask(tree, EXTRA) if on == "full" else mt.trainable_mask(ad, EXTRA)
    flags = jax.tree.leaves(mask)
    before, after = jax.tree.leaves(tree), jax.tree.leaves(new)
    if on == "trainable":
        flags = [f for f in flags if f]
    for f, b, a in zip(flags, before, after, strict=True):
        if f:
            assert not np.array_equal(a, b)
        else:
            np.testing.assert_array_equal(a, b)
    # no Adam moments for frozen leaves: the state holds exactly the trainable sizes (mu and nu)
    n_state = sum(x.size for x in jax.tree.leaves(opt) if x.ndim > 0)
    n_trainable = mt.count_params(ad, EXTRA)[0]
    assert n_state == 2 * n_trainable

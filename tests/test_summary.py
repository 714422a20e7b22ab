"""summary / count_params: PEFT-style counts, checked by hand."""

import jax
import jax.numpy as jnp

import mtlora_jax as mt


def test_counts_and_text():
    params = {"q": {"kernel": jnp.zeros((10, 6)), "bias": jnp.zeros(6)}, "head": {"kernel": jnp.zeros((6, 2))}}
    ad = mt.init(params, mt.MTLoRAConfig(rank=2, structure="ctcm", targets=r"q/kernel"), jax.random.key(0))
    adapter = 2 * 10 + 6 * 2 + 2 * 2 * 2  # a, b, c, d
    total = 60 + 6 + 12 + adapter
    assert mt.count_params(ad) == (adapter, total)
    assert mt.count_params(ad, (r"head/.*",)) == (adapter + 12, total)
    text = mt.summary(ad, (r"head/.*",))
    assert "q/kernel  w(10, 6)  ctcm r=2  40" in text
    assert text.endswith(f"trainable params: 52 || all params: {total} || trainable%: {100 * 52 / total:.4f}")

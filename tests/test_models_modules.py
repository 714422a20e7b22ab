"""Module behaviour without a reference framework: KV cache semantics, dropout rngs, argument errors.

The reference for the cache is the same model without a cache: decoding a left-padded batch in
chunks (prefill, a 2-token chunk, single tokens) must give the logits of one causal forward over
the whole sequence, and reordering cache rows (beam search) must equal decoding reordered prompts.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlora_jax import models

LLAMA = models.LlamaConfig(
    vocab_size=40, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, intermediate_size=24
)
BERT = models.EncoderConfig("bert", vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24)
IDS = jnp.asarray(np.random.default_rng(0).integers(1, 40, (3, 8)), jnp.int32)
LEFT = jnp.asarray([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1], [0] * 5 + [1] * 3], jnp.int32)  # left-padded prompts


def _random_params(module, scale=0.3):
    shapes = jax.eval_shape(module.init, jax.random.key(0), IDS[:, :2])["params"]
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, scale, s.shape), jnp.float32), shapes)


@pytest.fixture(scope="module")
def llama():
    """(module, params, jitted forward, jitted cached step), shared so each shape compiles once."""
    module = models.Llama(LLAMA, head="lm")
    params = {"params": _random_params(module)}
    step = jax.jit(lambda ids, m, c: module.apply(params, ids, m, cache=c))
    return module, params, jax.jit(module.apply), step


def test_chunked_cached_decoding_equals_full_forward(llama):
    """Prefill 3 + a 2-token chunk + 3 single tokens through the cache == one forward over all 8 tokens."""
    module, params, forward, step = llama
    full = forward(params, IDS, LEFT)
    cache = models.init_cache(module, 3, 8)
    outs = []
    for lo, hi in ((0, 3), (3, 5), (5, 6), (6, 7), (7, 8)):
        logits, cache = step(IDS[:, lo:hi], LEFT[:, lo:hi], cache)
        outs.append(logits)
    got = jnp.concatenate(outs, axis=1)
    real = np.asarray(LEFT) == 1
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(full)[real], atol=1e-5)
    np.testing.assert_array_equal(cache["index"], [8, 8, 8])
    np.testing.assert_array_equal(cache["position"], LEFT.sum(1))
    np.testing.assert_array_equal(cache["mask"], LEFT.astype(bool))


def test_left_padded_rows_decode_as_alone(llama):
    """A row's logits in a left-padded batch == the same prompt decoded alone without padding."""
    _, params, forward, _ = llama
    batch = forward(params, IDS, LEFT)
    alone = forward(params, IDS[2:, 5:])  # row 2's 3 real tokens, unpadded
    np.testing.assert_allclose(batch[2, 5:], alone[0], atol=1e-5)


def test_cache_rows_reorder_like_beams(llama):
    """Every cache leaf has batch axis 0; tree_map(x[idx]) then decoding == decoding reordered prompts."""
    module, _, _, step = llama
    _, cache = step(IDS[:, :3], LEFT[:, :3], models.init_cache(module, 3, 8))
    assert all(x.shape[0] == 3 for x in jax.tree.leaves(cache))
    idx = jnp.asarray([2, 0, 0])
    real = jnp.ones((3, 2), jnp.int32)
    logits, _ = step(IDS[idx, 3:5], real, jax.tree.map(lambda x: x[idx], cache))
    _, ref_cache = step(IDS[idx, :3], LEFT[idx, :3], models.init_cache(module, 3, 8))
    ref, _ = step(IDS[idx, 3:5], real, ref_cache)
    np.testing.assert_allclose(logits, ref, atol=1e-6)
    assert not np.allclose(logits[0], logits[1])  # rows really were reordered (row 2 != row 0)


def test_dropout_uses_explicit_rngs():
    """deterministic=False needs a "dropout" rng; the same key repeats, another key differs.

    Checked on the scanned encoder (its rngs are split per layer by nn.scan); the unrolled layers are
    the same modules. Keys use the "rbg" PRNG: threefry dropout masks take ~10 s to compile on this CPU.
    """
    module = models.Encoder(BERT, scan_layers=True)
    params = {"params": _random_params(module)}
    run = jax.jit(lambda p, key: module.apply(p, IDS, deterministic=False, rngs={"dropout": key}))
    a, b, c = (run(params, jax.random.key(k, impl="rbg")) for k in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    no_drop = jax.jit(lambda p: module.apply(p, IDS, rngs={"dropout": jax.random.key(1, impl="rbg")}))(params)
    assert not np.allclose(a, no_drop)
    with pytest.raises(flax.errors.InvalidRngError):
        jax.eval_shape(lambda p: module.apply(p, IDS, deterministic=False), params)


def test_argument_errors():
    """Bad heads, bad mask shapes and encoders in init_cache raise clear errors."""
    with pytest.raises(ValueError, match="head 'lm' is not valid for an encoder"):
        models.build("bert", BERT, "lm", None)
    with pytest.raises(ValueError, match="not valid for a llama decoder"):
        models.build("llama", LLAMA, "classification", 2)
    with pytest.raises(TypeError, match="decoder module"):
        models.init_cache(models.Encoder(BERT), 1, 4)
    module = models.Llama(LLAMA)
    with pytest.raises(ValueError, match="attention_mask shape"):
        jax.eval_shape(module.init, jax.random.key(0), IDS, LEFT[:, :3])

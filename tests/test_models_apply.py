"""MTLoRA on our models: ``mt.apply`` (factored adapters) == the forward pass on ``mt.merge`` (W + dW).

For each family (BERT with its classification head, GPT-2 with the fused c_attn spec, Llama with GQA;
RoBERTa shares BERT's modules), on random tiny params (numpy, no torch needed):
  * unrolled: mt.apply output == merged output within 1e-5, with no "materializing" warning from
    mt.apply (every adapted kernel went through a factored rule), and the adapters change the output;
  * nn.scan + nn.remat: the same adapters stacked with ``stack_params`` give the same output through
    mt.apply, and ``mt.init`` with ``presets.stack_ndim`` adapts exactly the stacked paths;
  * gradients w.r.t. the adapter factors under scan + remat == the unrolled gradients (GPT-2: fused
    c_attn, tied head);
  * Llama: mt.apply with a KV cache == merged; bf16 compute keeps fp32 params and stays close.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtlora_jax as mt
from mtlora_jax import models

CONFIGS = {
    "bert": models.EncoderConfig(
        "bert", vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24
    ),
    "roberta": models.EncoderConfig(
        "roberta", vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24, pad_token_id=1
    ),
    "gpt2": models.GPT2Config(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24),
    "llama": models.LlamaConfig(
        vocab_size=50, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, intermediate_size=24
    ),
}
HEADS = {"bert": "classification", "roberta": "regression", "gpt2": "lm", "llama": "lm"}
IDS = jnp.asarray(np.random.default_rng(1).integers(2, 50, (2, 7)), jnp.int32)
MASK = jnp.ones((2, 7), jnp.int32).at[1, 5:].set(0)


def _model(family, **kwargs):
    """(unrolled module, random params): N(0, 0.2) everywhere, norm scales 1 + N(0, 0.1)."""
    module = models.build(family, CONFIGS[family], HEADS[family], 3, scan_layers=False, **kwargs)
    shapes = jax.eval_shape(module.init, jax.random.key(0), IDS, MASK)["params"]
    rng = np.random.default_rng(0)
    draw = lambda path, s: (path[-1].key == "scale") + rng.normal(0, 0.1 if path[-1].key == "scale" else 0.2, s.shape)
    return module, jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(draw(p, s), jnp.float32), shapes)


def _cfg(family, scan, preset="mtlora-paper"):
    """Adapters with nonzero B (b_init="gaussian"), so the adapted model differs from the base."""
    return mt.MTLoRAConfig(
        rank=2, alpha=4.0, structure="shim", targets=models.targets(preset, family), fused=models.fused(preset, family),
        stack_ndim=models.stack_ndim(family) if scan else (), b_init="gaussian",
    )  # fmt: skip


def _no_materializing(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mt.apply warns when it has to materialize W + dW
        return fn(*args)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_apply_equals_merged_unrolled_and_scan_remat(family):
    """mt.apply(module.apply)({"params": adapted}, ids, mask) == module.apply({"params": merge(adapted)}, ...)."""
    module, params = _model(family)
    adapted = mt.init(params, _cfg(family, scan=False), jax.random.key(2))
    out = _no_materializing(jax.jit(mt.apply(module.apply)), {"params": adapted}, IDS, MASK)
    fwd = jax.jit(module.apply)
    merged, base = fwd({"params": mt.merge(adapted)}, IDS, MASK), fwd({"params": params}, IDS, MASK)
    np.testing.assert_allclose(out, merged, atol=1e-5)
    assert jnp.abs(merged - base).max() > 1e-2 * jnp.abs(base).max()  # the adapters really change the output

    scan = module.clone(scan_layers=True, remat=True)
    stacked = models.stack_params(adapted, family)
    out_scan = _no_materializing(jax.jit(mt.apply(scan.apply)), {"params": stacked}, IDS, MASK)
    np.testing.assert_allclose(out_scan, out, atol=1e-5)
    fresh = jax.eval_shape(
        lambda p: mt.init(p, _cfg(family, scan=True), jax.random.key(2)), models.stack_params(params, family)
    )
    assert jax.tree.structure(fresh) == jax.tree.structure(stacked)
    assert jax.tree.map(lambda x: x.shape, fresh) == jax.tree.map(lambda x: x.shape, stacked)


def test_scan_remat_adapter_grads_match_unrolled():
    """d loss / d (A, B, C) through mt.apply with scan + remat == the unrolled gradients, stacked (GPT-2)."""
    module, params = _model("gpt2")
    scan = module.clone(scan_layers=True, remat=True)
    adapted = mt.init(params, _cfg("gpt2", scan=False), jax.random.key(2))

    def grads(mod, tree):
        train, frozen = mt.split(tree)
        loss = lambda t: jnp.sum(mt.apply(mod.apply)({"params": mt.combine(t, frozen)}, IDS, MASK) ** 2)
        return jax.jit(jax.grad(loss))(train)

    g_unrolled = models.stack_params(grads(module, adapted), "gpt2")
    g_scan = grads(scan, models.stack_params(adapted, "gpt2"))
    assert jax.tree.structure(g_unrolled) == jax.tree.structure(g_scan)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_unrolled, g_scan)
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g_scan))


def test_apply_with_kv_cache_and_bf16():
    """Llama (scan layout): cached decoding under mt.apply == merged; bf16 compute keeps fp32 params."""
    module, params = _model("llama")
    module = module.clone(scan_layers=True)
    adapted = models.stack_params(mt.init(params, _cfg("llama", scan=False), jax.random.key(3)), "llama")
    cache = models.init_cache(module, 2, 10)
    step = lambda v, c: module.apply(v, IDS, MASK, cache=c)
    logits, new = jax.jit(step)({"params": mt.merge(adapted)}, cache)
    got, got_cache = _no_materializing(jax.jit(mt.apply(step)), {"params": adapted}, cache)
    np.testing.assert_allclose(got, logits, atol=1e-5)
    np.testing.assert_allclose(got_cache["k"], new["k"], atol=1e-5)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(adapted))
    low = _no_materializing(jax.jit(mt.apply(module.clone(dtype=jnp.bfloat16).apply)), {"params": adapted}, IDS, MASK)
    assert low.dtype == jnp.float32  # logits are returned in float32
    np.testing.assert_allclose(low, got, atol=0.1)  # a prefill with a cache == the plain forward

"""Target presets: the exact params each preset selects, unrolled and scanned, and the GPT-2 fused spec.

Paths come from ``jax.eval_shape`` of 2-layer models (nothing is computed); the expected sets are
literals written from the LoRA / MTLoRA papers' choices.
"""

import re

import jax
import jax.numpy as jnp
import pytest

import mtlora_jax as mt
from mtlora_jax import models

CONFIGS = {
    "bert": models.EncoderConfig("bert", vocab_size=20, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=12),
    "gpt2": models.GPT2Config(vocab_size=20, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=12),
    "llama": models.LlamaConfig(
        vocab_size=20, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=12
    ),
}
HEAD = {"bert": "classification", "gpt2": "lm", "llama": "lm"}


def _paths(family, scan=False):
    module = models.build(family, CONFIGS[family], HEAD[family], 2, scan_layers=scan)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return {"/".join(k.key for k in p): s.shape for p, s in jax.tree_util.tree_leaves_with_path(shapes)}, shapes


def _selected(patterns, paths):
    return {p for p in paths if any(re.fullmatch(t, p) for t in patterns)}


EXPECTED = {
    ("bert", "lora-qv"): {f"encoder/layer_{i}/attention/{m}/kernel" for i in (0, 1) for m in ("query", "value")},
    ("bert", "mtlora-paper"): {
        f"encoder/layer_{i}/{m}/kernel"
        for i in (0, 1)
        for m in ("attention/query", "attention/value", "intermediate/dense", "output/dense")
    },
    ("bert", "all-linear"): {
        f"encoder/layer_{i}/{m}/kernel"
        for i in (0, 1)
        for m in (
            "attention/query",
            "attention/key",
            "attention/value",
            "attention/output/dense",
            "intermediate/dense",
            "output/dense",
        )
    },  # fmt: skip
    ("gpt2", "lora-qv"): {f"transformer/h_{i}/attn/c_attn/kernel" for i in (0, 1)},
    ("gpt2", "mtlora-paper"): {f"transformer/h_{i}/{m}/kernel" for i in (0, 1) for m in ("attn/c_attn", "mlp/c_fc")},
    ("gpt2", "all-linear"): {
        f"transformer/h_{i}/{m}/kernel"
        for i in (0, 1)
        for m in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
    },
    ("llama", "lora-qv"): {f"model/layers_{i}/self_attn/{m}/kernel" for i in (0, 1) for m in ("q_proj", "v_proj")},
    ("llama", "mtlora-paper"): {
        f"model/layers_{i}/{m}/kernel"
        for i in (0, 1)
        for m in ("self_attn/q_proj", "self_attn/v_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
    },
    ("llama", "all-linear"): {
        f"model/layers_{i}/{a}/{m}/kernel"
        for i in (0, 1)
        for a, ms in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        )
        for m in ms
    },
}


@pytest.mark.parametrize("family,preset", sorted(EXPECTED))
def test_targets_select_exactly(family, preset):
    """targets(preset, family) full-matches exactly the expected kernels, and the same modules when scanned."""
    patterns = models.targets(preset, family)
    paths, _ = _paths(family)
    assert _selected(patterns, paths) == EXPECTED[(family, preset)]
    scanned, _ = _paths(family, scan=True)
    layer = {"bert": "layer", "gpt2": "h", "llama": "layers"}[family]
    scan_name = {"bert": "layers", "gpt2": "h", "llama": "layers"}[family]
    want = {re.sub(rf"/{layer}_\d+/", f"/{scan_name}/", p) for p in EXPECTED[(family, preset)]}
    assert _selected(patterns, scanned) == want
    assert all(scanned[p][0] == 2 for p in want)  # leading layer axis


def test_gpt2_fused_spec_and_mt_init():
    """GPT-2's c_attn as 3 slices: the MTLoRA authors' q, k and v under one joint T; LoRA's q and v, k frozen."""
    assert models.fused("mtlora-paper", "gpt2") == {
        r"transformer/(h_\d+|h)/attn/c_attn/kernel": (3, (True, True, True))
    }
    assert models.fused("lora-qv", "gpt2") == {r"transformer/(h_\d+|h)/attn/c_attn/kernel": (3, (True, False, True))}
    assert models.fused("all-linear", "gpt2") == {} and models.fused("lora-qv", "bert") == {}
    _, shapes = _paths("gpt2")
    cfg = mt.MTLoRAConfig(
        rank=2, targets=models.targets("mtlora-paper", "gpt2"), fused=models.fused("mtlora-paper", "gpt2")
    )
    adapted = jax.eval_shape(lambda p: mt.init(p, cfg, jax.random.key(0)), shapes)
    c_attn = adapted["transformer"]["h_0"]["attn"]["c_attn"]["kernel"]
    assert mt.is_adapted(c_attn) and c_attn.slices == 3 and c_attn.enable == (True, True, True)
    assert c_attn.a.shape == (6, 8) and c_attn.c.shape == (6, 6)  # joint T over 3 enabled slices x rank 2


def test_stack_ndim_and_heads():
    """stack_ndim matches only scanned layer params; head regexes select the task heads."""
    assert models.stack_ndim("llama") == {r"model/layers/.*": 1}
    paths, _ = _paths("bert", scan=True)
    assert _selected(models.stack_ndim("bert"), paths) == {p for p in paths if p.startswith("encoder/layers/")}
    paths, _ = _paths("bert")
    heads = _selected(models.head_targets("bert", "classification"), paths)
    assert heads == {"pooler/dense/kernel", "pooler/dense/bias", "classifier/kernel", "classifier/bias"}
    assert models.head_targets("roberta", "regression") == (r"classifier/.*",)
    assert models.head_targets("gpt2", "lm") == () and models.head_targets("bert", None) == ()
    with pytest.raises(ValueError, match="unknown preset"):
        models.targets("qkv", "bert")

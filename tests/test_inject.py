"""mt.init: which leaves get adapters, their exact shapes, and clear errors for bad configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_models import MLP, TiedLM, init_model

import mtlora_jax as mt
from mtlora_jax import paths


def adapted_shapes(params):
    return {
        p: {f: None if getattr(x, f) is None else tuple(getattr(x, f).shape) for f in ("w", "a", "b", "c", "d")}
        for p, x in paths.named_leaves(params)
        if mt.is_adapted(x)
    }


def test_exact_paths_and_shapes():
    params = init_model(TiedLM(), jnp.zeros((2, 5), jnp.int32))
    cfg = mt.MTLoRAConfig(rank=4, structure="ctcm", targets=(r"proj/kernel", r"embed/embedding"))
    out = mt.init(params, cfg, jax.random.key(0))
    assert adapted_shapes(out) == {
        "embed/embedding": {"w": (19, 13), "a": (4, 19), "b": (13, 4), "c": (4, 4), "d": (4, 4)},
        "proj/kernel": {"w": (13, 13), "a": (4, 13), "b": (13, 4), "c": (4, 4), "d": (4, 4)},
    }
    assert out["proj"]["bias"] is params["proj"]["bias"]  # untouched leaves are the same objects
    assert out["proj"]["kernel"].w is params["proj"]["kernel"]
    assert out["proj"]["kernel"].scale == 16.0 / 4


def test_fused_stacked_densegeneral_and_patterns():
    params = {
        "c_attn": {"kernel": jnp.zeros((8, 24))},
        "layers": {"query": {"kernel": jnp.zeros((3, 8, 2, 4))}},  # nn.scan: [L, embed, heads, head_dim]
        "out": {"kernel": jnp.zeros((2, 4, 8))},  # DenseGeneral [heads, head_dim, embed]
    }
    cfg = mt.MTLoRAConfig(
        rank=2,
        alpha=8.0,
        structure="icfm",
        targets=(r"c_attn/kernel", r"layers/query/kernel", r"out/kernel"),
        fused={r"c_attn/kernel": (3, (True, False, True))},
        stack_ndim={r"layers/.*": 1},
        in_ndim={r"out/kernel": 2, r"layers/query/kernel": 1},
        rank_pattern={r"out/.*": 3},
        alpha_pattern={r"out/.*": 3.0},
    )
    out = mt.init(params, cfg, jax.random.key(0))
    assert adapted_shapes(out) == {
        "c_attn/kernel": {"w": (8, 24), "a": (4, 8), "b": (16, 2), "c": (4, 4), "d": None},
        "layers/query/kernel": {"w": (3, 8, 2, 4), "a": (3, 2, 8), "b": (3, 8, 2), "c": (3, 2, 2), "d": None},
        "out/kernel": {"w": (2, 4, 8), "a": (3, 8), "b": (8, 3), "c": (3, 3), "d": None},
    }
    assert out["out"]["kernel"].scale == 1.0 and out["c_attn"]["kernel"].scale == 4.0
    assert out["layers"]["query"]["kernel"].stack_ndim == 1
    # every stacked layer gets its own random A
    a = np.asarray(out["layers"]["query"]["kernel"].a)
    assert not np.allclose(a[0], a[1])


def test_lora_structure_has_no_c():
    params = init_model(MLP(), jnp.zeros((1, 13)))
    out = mt.init(params, mt.MTLoRAConfig(rank=2, structure="lora", targets=r"fc1/kernel"), jax.random.key(0))
    assert out["fc1"]["kernel"].c is None and out["fc1"]["kernel"].d is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(targets=r"nothing/.*"), r"targets pattern 'nothing/\.\*' matches no parameter path"),
        (dict(targets=r"fc1/bias"), r"target 'fc1/bias' has shape \(17,\), not a matrix-like weight"),
        (dict(targets=r"fc2/kernel", rank=3), r"target 'fc2/kernel': rank 3 must be in \[1, min\(d_in=17, d_out=2\)\]"),
        (dict(targets=r"fc1/kernel", rank=0), r"rank must be a positive integer, got 0"),
        (dict(targets=r"fc1/kernel", structure="svd"), r"unknown MTLoRA structure 'svd'; valid: lora, shim"),
        (dict(targets=r"fc1/kernel", fused={r"fc1/kernel": (4, (True,) * 4)}), r"does not fit d_out=17"),
        (dict(targets=r"fc1/kernel", dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(targets=r"fc1/(kernel"), r"invalid regex 'fc1/\(kernel'"),
        (dict(targets=()), r"targets is empty"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    params = init_model(MLP(), jnp.zeros((1, 13)))
    kwargs = {"rank": 2, "structure": "shim", **kwargs}
    with pytest.raises(ValueError, match=match):
        mt.init(params, mt.MTLoRAConfig(**kwargs), jax.random.key(0))


def test_multi_axis_weight_needs_in_ndim():
    params = {"conv": {"kernel": jnp.zeros((3, 3, 4, 8))}}
    with pytest.raises(ValueError, match=r"say which leading axes form d_in .*in_ndim=\{'conv/kernel': n\}"):
        mt.init(params, mt.MTLoRAConfig(rank=2, targets=r"conv/kernel"), jax.random.key(0))


def test_init_twice_is_refused():
    params = init_model(MLP(), jnp.zeros((1, 13)))
    cfg = mt.MTLoRAConfig(rank=2, targets=r"fc1/kernel")
    once = mt.init(params, cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="already adapted"):
        mt.init(once, cfg, jax.random.key(0))

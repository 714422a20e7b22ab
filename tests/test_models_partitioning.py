"""Logical axes per family: every block weight gets FSDP/tensor axes, scanned stacks keep "layers" whole."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mtlora_jax import models, paths
from mtlora_jax.models import partitioning
from mtlora_jax.models.config import EncoderConfig, GPT2Config, LlamaConfig

CONFIGS = {
    "bert": EncoderConfig("bert", vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32),
    "gpt2": GPT2Config(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32),
    "llama": LlamaConfig(
        vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=32
    ),
}
HEAD = {"bert": "classification", "gpt2": "lm", "llama": "lm"}


def _specs(family, scan):
    module = models.build(family, CONFIGS[family], HEAD[family], None, scan_layers=scan)
    ids = jnp.ones((1, 4), jnp.int32)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), ids)["params"])
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    return {p: partitioning.param_spec(p, leaf.shape, family, mesh) for p, leaf in paths.named_leaves(params)}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("scan", [False, True])
def test_every_block_kernel_is_split(family, scan):
    specs = _specs(family, scan)
    lead = (None,) if scan else ()
    block_kernels = models.targets("all-linear", family)
    assert any(re.fullmatch(t, p) for t in block_kernels for p in specs)
    for path, spec in specs.items():
        if any(re.fullmatch(t, path) for t in block_kernels):
            assert spec[: len(lead)] == lead and set(spec[len(lead) :]) == {"fsdp", "tensor"}, (path, spec)
        if path.endswith(("LayerNorm/scale", "norm/scale", "ln_1/scale")):
            assert all(a is None for a in spec), (path, spec)
    q = {"bert": "attention/query/kernel", "gpt2": "attn/c_attn/kernel", "llama": "self_attn/q_proj/kernel"}[family]
    assert [s for p, s in specs.items() if p.endswith(q)][0] == P(*lead, "fsdp", "tensor")


def test_rules_that_do_not_divide_stay_replicated():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 8), ("fsdp", "tensor"))
    down = "model/layers_0/mlp/down_proj/kernel"  # ("mlp", "embed"): mlp -> tensor (8), embed -> fsdp (1)
    assert partitioning.param_spec(down, (12, 16), "llama", mesh) == P(None, "fsdp")  # 12 % 8: replicated
    assert partitioning.param_spec(down, (16, 12), "llama", mesh) == P("tensor", "fsdp")
    with pytest.raises(ValueError, match="has 3 axes; the llama partitioning table expects 2"):
        partitioning.logical_axes("model/layers_0/mlp/down_proj/kernel", 3, "llama")


@pytest.mark.parametrize("scan", [False, True])
def test_from_pretrained_places_weights_sharded(tmp_path, scan):
    """Loading onto a mesh: each weight lands split by its spec (host -> shards), same values as unsharded."""
    from tiny_models import tiny_bert

    folder = tiny_bert(tmp_path / "bert")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    module, sharded = models.from_pretrained(folder, head="classification", mesh=mesh, scan_layers=scan)
    _, plain = models.from_pretrained(folder, head="classification", scan_layers=scan)
    q = sharded["encoder"]["layers" if scan else "layer_0"]["attention"]["query"]["kernel"]
    assert q.sharding.spec == (P(None, "fsdp", "tensor") if scan else P("fsdp", "tensor"))
    assert q.addressable_shards[0].data.shape == ((2, 16, 16) if scan else (16, 16))  # [.., 32, 32] split 2 x 2
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(a, b)
    ids = jnp.array([[101, 2023, 2003, 102]])
    np.testing.assert_allclose(module.apply({"params": sharded}, ids), module.apply({"params": plain}, ids), atol=1e-5)

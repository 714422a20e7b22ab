"""mt.quantize / mt.dequantize against an independent numpy implementation, and a quantized base under the adapters:
apply (per use, also under scan), merge, split / optimizer (only the adapters move), summary, sharding, a job."""

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec

import mtlora_jax as mt
from mtlora_jax import models

# QLoRA's NF4 code book (bitsandbytes' values), written out here independently of the library.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)  # fmt: skip


def np_quantize(w: np.ndarray, method: str, block: int, double: bool = False) -> np.ndarray:
    """The dequantized values of numpy's own quantization, matrix by matrix over the leading axes."""
    if w.ndim > 2:
        return np.stack([np_quantize(m, method, block, double) for m in w])
    flat = w.astype(np.float32).ravel()
    n = flat.size
    pad = -n % block
    blocks = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1)
    safe = np.where(absmax > 0, absmax, 1.0)[:, None]
    if method == "int8":
        q = np.clip(np.round(blocks * np.where(absmax > 0, 127 / safe[:, 0], 0)[:, None]), -127, 127) / 127
    else:
        q = NF4[np.abs(blocks[..., None] / safe[..., None] - NF4).argmin(-1)]
    if double:  # the codes keep the exact absmax; the stored absmax is itself quantized (centred, int8 per 256)
        mean = absmax.mean()
        groups = np.concatenate([absmax - mean, np.zeros(-len(absmax) % 256, np.float32)]).reshape(-1, 256)
        gmax = np.abs(groups).max(axis=1)
        codes = np.clip(np.round(groups * np.where(gmax > 0, 127 / np.where(gmax > 0, gmax, 1), 0)[:, None]), -127, 127)
        absmax = (codes * gmax[:, None] / 127).ravel()[: len(absmax)] + mean
    values = q * absmax[:, None]
    return values.ravel()[:n].reshape(w.shape)


@pytest.mark.parametrize("method", ["int8", "nf4"])
@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("shape", [(48, 40), (3, 20, 13)])  # 13 * 20 = 260: a tail block of 4 values
def test_dequantize_matches_numpy(method, double, shape):
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    w[..., 0, :5] = 0.0  # a block of zeros among others
    q = mt.quantize({"k": w}, method, targets=("k",), block_size=64, double_quant=double)["k"]
    assert mt.is_quantized(q) and q.shape == shape and q.stack_shape == shape[:-2]
    got = np.asarray(mt.dequantize({"k": q})["k"])
    np.testing.assert_allclose(got, np_quantize(w, method, 64, double), rtol=1e-6, atol=1e-6)
    if not double:  # the rounding error is bounded per block
        step = 1 / 127 if method == "int8" else np.diff(NF4).max()
        assert np.abs(got - w).max() <= np.abs(w).max() * step / 2 + 1e-6


def test_bytes_are_a_fraction_of_float32():
    w = np.random.default_rng(1).normal(size=(576, 1536)).astype(np.float32)
    ratio = {m: mt.quantize({"k": w}, m, targets=("k",))["k"].nbytes / w.nbytes for m in ("int8", "nf4")}
    assert ratio["nf4"] <= 0.16 and ratio["int8"] <= 0.27, ratio
    dq = mt.quantize({"k": w}, "nf4", targets=("k",), double_quant=True)["k"].nbytes / w.nbytes
    assert dq < ratio["nf4"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="int4"), "unknown method 'int4'"),
        (dict(method="int8", block_size=0), "block_size=0: expected a positive int"),
        (dict(method="nf4", block_size=63), "block_size=63 does not divide"),
        (dict(method="int8", targets=("enc/bias",)), "enc/bias is not a floating-point matrix"),
        (dict(method="int8", targets=("nothing",)), "'nothing' matches no parameter path"),
    ],
)
def test_bad_inputs_name_the_cause(kwargs, message):
    tree = {"enc": {"kernel": np.ones((8, 8), np.float32), "bias": np.ones(8, np.float32)}}
    kwargs = {"targets": ("enc/kernel",), **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        mt.quantize(tree, kwargs.pop("method"), **kwargs)


def test_quantize_after_init_is_refused():
    adapted = mt.init({"k": np.ones((8, 8), np.float32)}, mt.MTLoRAConfig(rank=2, targets=("k",)), jax.random.key(0))
    with pytest.raises(ValueError, match="k is already adapted; quantize the base first"):
        mt.quantize(adapted, "nf4", targets=("k",))


def test_extra_trainable_cannot_train_a_quantized_weight():
    q = mt.quantize({"k": np.ones((8, 8), np.float32)}, "int8", targets=("k",))
    with pytest.raises(ValueError, match="k, a quantized base weight"):
        mt.split(q, ("k",))


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scan"])
def llama(request, tiny_llama):
    module, params = models.from_pretrained(tiny_llama, head="lm", scan_layers=request.param)
    targets = models.targets("all-linear", "llama")
    cfg = mt.MTLoRAConfig(rank=4, alpha=8.0, structure="ctcm", targets=targets, b_init="gaussian",
                          stack_ndim=models.stack_ndim("llama") if request.param else {})  # fmt: skip
    return module, params, targets, cfg


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_adapters_over_a_quantized_base(llama, method):
    """apply on the quantized adapted tree == the model on dequantized W + dW; no weight is materialized by
    apply's fallback; only the adapters get gradients and move."""
    module, params, targets, cfg = llama
    ids = jnp.array([[5, 9, 2, 7, 1, 3, 8]])
    quantized = mt.quantize(params, method, targets=targets)
    adapted = mt.init(quantized, cfg, jax.random.key(0))
    assert "quantized base:" in mt.summary(adapted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # apply's materialization warning would fail the test
        out = jax.jit(mt.apply(module.apply))({"params": adapted}, ids)
    ref = module.apply({"params": mt.merge(adapted)}, ids)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
    dequantized = jax.tree.map(np.asarray, mt.dequantize(quantized))
    plain = mt.merge(mt.init(dequantized, cfg, jax.random.key(0)))  # the same adapters on the float copy
    np.testing.assert_allclose(np.asarray(module.apply({"params": plain}, ids)), np.asarray(ref), atol=2e-5)

    trainable, frozen = mt.split(adapted)
    assert not any(mt.is_quantized(x) for x in jax.tree.leaves(trainable, is_leaf=mt.is_quantized))
    tx = mt.optimizer(optax.adam(1e-2), trainable)
    state = tx.init(trainable)
    loss = lambda t: mt.apply(module.apply)({"params": mt.combine(t, frozen)}, ids).std()
    grads = jax.jit(jax.grad(loss))(trainable)
    updates, state = tx.update(grads, state, trainable)
    moved = optax.apply_updates(trainable, updates)
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(trainable),
                                                            strict=True)) > 0  # fmt: skip
    saved = mt.adapter_state(mt.combine(moved, frozen))
    assert saved and all(k.rsplit("/", 1)[-1] in "abcd" for k in saved), sorted(saved)[:4]


def test_quantized_codes_are_placed_like_their_weight():
    mesh = Mesh(np.array(jax.devices()[:4]), ("fsdp",))
    w = np.random.default_rng(2).normal(size=(64, 32)).astype(np.float32)
    tree = mt.init(mt.quantize({"k": w, "v": w}, "nf4", targets=("k", "v")), mt.MTLoRAConfig(rank=2, targets=("k",)),
                   jax.random.key(0))  # fmt: skip
    specs = mt.partition_specs(tree, lambda path, x: PartitionSpec("fsdp", None), mesh)
    assert specs["k"].w.codes == PartitionSpec("fsdp", None) and specs["k"].w.scales == PartitionSpec("fsdp")
    assert specs["v"].codes == PartitionSpec("fsdp", None) and specs["k"].a == PartitionSpec(None, "fsdp")
    placed = jax.device_put(tree, mt.named_shardings(specs, mesh))
    assert placed["v"].codes.sharding.spec == PartitionSpec("fsdp", None)
    np.testing.assert_array_equal(np.asarray(mt.dequantize(placed)["v"]), np.asarray(mt.dequantize(tree)["v"]))
    odd = mt.partition_specs(tree, lambda path, x: PartitionSpec(None, "fsdp"), mesh)  # split on d_out: not blocks
    assert odd["v"].codes == PartitionSpec(None, None)


def test_sft_job_over_an_nf4_base(tiny_llama, tmp_path):
    from configs import sft
    from train.sft import train as sft_train

    config = sft.get_config("smoke")
    config.model, config.base_quant, config.num_train_steps = tiny_llama, "nf4", 2
    summary = sft_train.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(summary["metrics"]["eval_loss"])
    saved = json.loads((tmp_path / "fingerprint.json").read_text())
    assert saved["base_quant"] == "nf4"
    config.base_quant = "int8"
    with pytest.raises(ValueError, match="base_quant"):
        sft_train.train_and_evaluate(config, str(tmp_path))  # another base: refused, not resumed


@pytest.mark.parametrize("adapt", ["all-linear", "lora-qv"])  # lora-qv: k, o and the FFN stay plain quantized
def test_gradients_through_a_quantized_base_equal_the_float_ones(llama, adapt):
    """The quantized products' backward pass (quantized_ops.product) gives the adapters the gradients they get on
    the dequantized float base."""
    module, params, targets, cfg = llama
    cfg = dataclasses.replace(cfg, targets=models.targets(adapt, "llama"))
    ids = jnp.array([[5, 9, 2, 7, 1, 3, 8], [4, 4, 6, 1, 2, 0, 9]])
    quantized = mt.quantize(params, "nf4", targets=targets)
    grads = []
    for base in (quantized, jax.tree.map(np.asarray, mt.dequantize(quantized))):
        trainable, frozen = mt.split(mt.init(base, cfg, jax.random.key(1)))
        loss = lambda t, frozen=frozen: jnp.mean(mt.apply(module.apply)({"params": mt.combine(t, frozen)}, ids) ** 2)
        grads.append(jax.jit(jax.grad(loss))(trainable))
    flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in grads]
    assert np.abs(flat[1]).max() > 0
    np.testing.assert_allclose(flat[0], flat[1], rtol=1e-4, atol=1e-6)


def test_the_train_step_keeps_no_float_copy_of_the_quantized_base():
    """XLA's memory analysis of the jobs' train step: NF4 holds far fewer argument bytes and no more temporaries
    than the float base (the float weights are recomputed in the backward pass, not kept as residuals)."""
    from train import lm, loop
    from train import mesh as mesh_lib

    cfg = models.config.LlamaConfig(vocab_size=256, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                    head_dim=32, intermediate_size=512)  # fmt: skip
    module = models.build("llama", cfg, "lm", None, scan_layers=True)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    targets = models.targets("all-linear", "llama")
    qv = models.targets("lora-qv", "llama")
    adapters = mt.MTLoRAConfig(rank=4, targets=qv, stack_ndim=models.stack_ndim("llama"))
    mesh = mesh_lib.make_mesh({"data": 1})
    batch = {k: jax.ShapeDtypeStruct((2, 64), jnp.float32 if k == "weights" else jnp.int32)
             for k in ("input_ids", "labels", "attention_mask", "weights")}  # fmt: skip
    memory = {}
    for method in ("none", "nf4"):
        quantize = (lambda p: p) if method == "none" else (lambda p: mt.quantize(p, "nf4", targets=targets))
        trainable, frozen = jax.eval_shape(lambda p, q=quantize: mt.split(mt.init(q(p), adapters, jax.random.key(0))),
                                           shapes)  # fmt: skip
        tx = loop.make_optimizer(loop.make_schedule(1e-3, 10, 0), 0.0, trainable, ())
        init = lambda p, r, tx=tx: loop.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=r)
        state = jax.eval_shape(init, trainable, jax.random.key(0))
        step = loop.make_train_step(lm.make_loss_fn(module), tx, loop.make_schedule(1e-3, 10, 0), mesh=mesh,
                                    state_shardings=mesh_lib.tree_shardings(mesh, state),
                                    frozen_shardings=mesh_lib.tree_shardings(mesh, frozen))  # fmt: skip
        memory[method] = step.lower(state, frozen, batch).compile().memory_analysis()
    assert memory["nf4"].argument_size_in_bytes < 0.5 * memory["none"].argument_size_in_bytes
    assert memory["nf4"].temp_size_in_bytes <= 1.02 * memory["none"].temp_size_in_bytes, (
        memory["nf4"].temp_size_in_bytes,
        memory["none"].temp_size_in_bytes,
    )

"""The task-agnostic train pieces (train/loop.py, mesh.py, checkpoints.py, run_log.py) on a toy MLP + MTLoRA.

Checked against independent references: the HF linear warmup/decay formula, a full-batch step vs gradient
accumulation, one device vs an 8-device mesh, and checkpoint round trips compared leaf by leaf.
"""

import dataclasses
import json
import os
import signal

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtlora_jax as mt
from train import checkpoints, loop, run_log
from train import mesh as mesh_lib

HEAD = (r"head/.*",)


class Toy(nn.Module):
    """x [b, t, 5] -> mean over t -> Dense 16 (adapted) -> relu -> head Dense 3."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16, name="hidden")(x.mean(axis=1)))
        return nn.Dense(3, name="head")(h)


def _params(structure="shim", seed=0):
    params = Toy().init(jax.random.key(seed), jnp.zeros((1, 2, 5)))["params"]
    cfg = mt.MTLoRAConfig(rank=2, alpha=4.0, structure=structure, targets=(r"hidden/kernel",))
    params = mt.init(params, cfg, jax.random.key(seed + 1))
    # B = 0 at init makes the adapter gradient of A, C vanish on step 1; a nonzero B exercises every factor.
    ad = params["hidden"]["kernel"]
    params["hidden"]["kernel"] = dataclasses.replace(
        ad, b=jax.random.normal(jax.random.key(seed + 2), ad.b.shape) * 0.1
    )
    return mt.split(params, HEAD)


def loss_fn(params, frozen, batch, rng):
    """Weighted cross-entropy sum; deterministic (rng unused) so accumulation can be compared exactly."""
    del rng
    logits = mt.apply(Toy().apply)({"params": mt.combine(params, frozen)}, batch["x"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return jnp.sum(batch["weights"] * losses), {"weight": jnp.sum(batch["weights"])}


def _batch(seed, size=8, seq=4, weights=None):
    rng = np.random.default_rng(seed)
    w = np.ones(size, np.float32) if weights is None else np.asarray(weights, np.float32)
    return {
        "x": rng.normal(size=(size, seq, 5)).astype(np.float32),
        "labels": rng.integers(0, 3, size).astype(np.int32),
        "weights": w,
    }


def _run(mesh, batches, *, accum=1, structure="shim", lr=0.05, fn=loss_fn):
    """Steps a fresh state through `batches`; returns (state, frozen, [host metrics])."""
    trainable, frozen = _params(structure)
    schedule = loop.make_schedule(lr, 10, 2)
    tx = loop.make_optimizer(schedule, 0.01, trainable, HEAD)
    state, shardings = loop.create_train_state(trainable, tx, loop.rng_key(0), mesh)
    frozen_shardings = mesh_lib.tree_shardings(mesh, frozen)
    frozen = jax.device_put(frozen, frozen_shardings)
    step = loop.make_train_step(
        fn,
        tx,
        schedule,
        mesh=mesh,
        state_shardings=shardings,
        frozen_shardings=frozen_shardings,
        grad_accum_steps=accum,
    )
    history = []
    for b in batches:
        with jax.transfer_guard("disallow"):  # the step moves nothing implicitly between host and devices
            state, m = step(state, frozen, mesh_lib.shard_batch(b, mesh))
            history.append(jax.device_get(m))
    return state, frozen, history


@pytest.mark.parametrize("warmup", [0, 3])
def test_schedule_is_hf_linear_warmup_then_decay(warmup):
    """lr(s) = lr s / w for s < w, else lr max(0, (T - s) / (T - w)) (transformers' get_linear_schedule_with_warmup)."""
    total, lr = 10, 0.5
    schedule = loop.make_schedule(lr, total, warmup)
    for s in range(total + 2):
        want = lr * s / warmup if s < warmup else lr * max(0.0, (total - s) / (total - warmup))
        np.testing.assert_allclose(float(schedule(s)), want, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="warmup steps 10"):
        loop.make_schedule(lr, total, total)


def test_total_steps_prefers_num_train_steps():
    assert loop.total_steps(7, 3.0, 100) == 7
    assert loop.total_steps(-1, 2.5, 3) == 8  # ceil(7.5)
    assert loop.total_steps(0, 0.01, 3) == 1


def test_grad_accumulation_equals_one_full_batch():
    """accum=2 over half batches == accum=1 over the full batch (loss sum / total weight), padding rows included."""
    mesh = mesh_lib.make_mesh({"data": 2})
    # Padding rows (weight 0) all fall in one micro-batch: a mean of micro-batch means would differ.
    batches = [_batch(0, weights=[1, 1, 1, 1, 1, 1, 0, 0]), _batch(1), _batch(2, weights=[1, 0, 1, 0, 1, 1, 1, 1])]
    with jax.default_matmul_precision("float32"):
        full, _, m_full = _run(mesh, batches, accum=1)
        acc, _, m_acc = _run(mesh, batches, accum=2)
    chex.assert_trees_all_close(acc.params, full.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(acc.opt_state, full.opt_state, rtol=1e-5, atol=1e-6)
    for a, f in zip(m_acc, m_full, strict=True):
        np.testing.assert_allclose([a["loss"], a["weight"], a["grad_norm"]], [f["loss"], f["weight"], f["grad_norm"]],
                                   rtol=1e-5)  # fmt: skip
    assert [m["weight"] for m in m_full] == [6.0, 8.0, 6.0]


def test_eight_device_step_matches_one_device():
    """The batch split over an 8-device data axis gives the one-device result (allclose)."""
    assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
    batches = [_batch(i) for i in range(3)]
    with jax.default_matmul_precision("float32"):
        one, _, m_one = _run(mesh_lib.make_mesh({"data": 1}), batches)
        eight, _, m_eight = _run(mesh_lib.make_mesh({"data": -1}), batches)
    assert eight.params["head"]["kernel"].sharding.mesh.shape == {"data": 8}
    chex.assert_trees_all_close(eight.params, one.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([m["loss"] for m in m_eight], [m["loss"] for m in m_one], rtol=1e-5)


def test_step_traces_once_per_batch_shape():
    """Two bucket shapes, four steps: exactly two traces (no retrace from the state or the step counter)."""
    traces = []

    def counting(params, frozen, batch, rng):
        traces.append(batch["x"].shape)
        return loss_fn(params, frozen, batch, rng)

    batches = [_batch(0, seq=4), _batch(1, seq=6), _batch(2, seq=4), _batch(3, seq=6)]
    _run(mesh_lib.make_mesh({"data": -1}), batches, fn=counting)
    assert traces == [(8, 4, 5), (8, 6, 5)]


def test_only_adapters_and_head_train_and_hold_moments():
    """After 3 steps every trainable leaf moved; the state holds no base weight and Adam moments only for them."""
    trainable, frozen = _params()
    state, frozen2, history = _run(mesh_lib.make_mesh({"data": -1}), [_batch(i) for i in range(3)])
    before, after = mt.adapter_state(trainable, HEAD), mt.adapter_state(state.params, HEAD)
    assert set(after) == {"hidden/kernel/a", "hidden/kernel/b", "hidden/kernel/c", "head/kernel", "head/bias"}
    for path in after:
        assert not np.allclose(before[path], after[path]), path
    assert state.params["hidden"]["kernel"].w is None and state.params["hidden"]["bias"] is None
    np.testing.assert_array_equal(frozen2["hidden"]["kernel"].w, frozen["hidden"]["kernel"].w)
    n_train = sum(x.size for x in jax.tree.leaves(state.params))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_train  # mu and nu, nothing for the frozen base
    assert [float(m["learning_rate"]) for m in history] == pytest.approx([0.0, 0.025, 0.05])


def test_non_finite_loss_raises_with_step():
    loop.check_finite({"loss": np.float32(0.5)}, 3)
    with pytest.raises(FloatingPointError, match=r"non-finite train loss nan at step 7.*learning_rate"):
        loop.check_finite({"loss": np.float32("nan")}, 7)
    with pytest.raises(FloatingPointError, match="inf at step 2"):
        loop.check_finite({"loss": np.float32("inf")}, 2)


def _fresh_state(mesh, structure="shim", seed=0):
    trainable, frozen = _params(structure, seed)
    tx = loop.make_optimizer(loop.make_schedule(0.05, 10, 0), 0.0, trainable, HEAD)
    state, _ = loop.create_train_state(trainable, tx, loop.rng_key(0), mesh)
    return state, jax.device_put(frozen, mesh_lib.tree_shardings(mesh, frozen))


def test_checkpoint_round_trip_keep_n_and_adapter_format(tmp_path):
    """restore_latest gives back the saved trainable leaves, opt_state and step; only `keep` steps stay; a step
    folder is an mt.save_adapters checkpoint without base weights."""
    mesh = mesh_lib.make_mesh({"data": -1})
    state, frozen, _ = _run(mesh, [_batch(i) for i in range(3)])
    mngr = checkpoints.manager(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        checkpoints.save(mngr, state.replace(step=jnp.int32(step)), frozen, HEAD, {"best": {"accuracy": step / 10}})
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]

    blank, frozen_b = _fresh_state(mesh, seed=0)
    restored, record = checkpoints.restore_latest(mngr, blank, frozen_b, HEAD)
    assert record == {"best": {"accuracy": 0.3}} and int(restored.step) == 3
    chex.assert_trees_all_equal(restored.params, state.params)
    chex.assert_trees_all_equal(restored.opt_state, state.opt_state)
    assert jax.tree.leaves(restored.params)[0].sharding == jax.tree.leaves(blank.params)[0].sharding

    loaded = mt.load_adapters(tmp_path / "checkpoints" / "3", mt.combine(*_params(seed=5)))
    chex.assert_trees_all_equal(mt.split(loaded, HEAD)[0], jax.device_get(state.params))
    meta = json.loads((tmp_path / "checkpoints" / "3" / "meta" / "metadata").read_text())
    assert set(meta["arrays"]) == {"hidden/kernel/a", "hidden/kernel/b", "hidden/kernel/c", "head/kernel", "head/bias"}


def test_restore_into_another_structure_fails_clearly(tmp_path):
    mesh = mesh_lib.make_mesh({"data": 1})
    state, frozen = _fresh_state(mesh, "shim")
    mngr = checkpoints.manager(str(tmp_path), keep=1)
    checkpoints.save(mngr, state, frozen, HEAD, {})
    other, frozen_o = _fresh_state(mesh, "ctcm")
    with pytest.raises(ValueError, match=r"only in config: \['hidden/kernel/d'\].*new --workdir"):
        checkpoints.restore_latest(mngr, other, frozen_o, HEAD)
    lora, frozen_l = _fresh_state(mesh, "lora")
    with pytest.raises(ValueError, match="checkpoint leaves differ"):
        checkpoints.restore_latest(mngr, lora, frozen_l, HEAD)


def test_load_adapter_factors_keeps_the_head(tmp_path):
    """init_from copies A, B, C of a run (its workdir) but leaves the new head as initialised."""
    mesh = mesh_lib.make_mesh({"data": 1})
    state, frozen, _ = _run(mesh, [_batch(0)])
    checkpoints.save(checkpoints.manager(str(tmp_path), 1), state, frozen, HEAD, {})
    template = mt.combine(*_params(seed=7))
    loaded, folder = checkpoints.load_adapter_factors(str(tmp_path), template)
    assert folder == str(tmp_path / "checkpoints" / "1")
    for f in ("a", "b", "c"):
        np.testing.assert_array_equal(
            getattr(loaded["hidden"]["kernel"], f), getattr(state.params["hidden"]["kernel"], f)
        )
    np.testing.assert_array_equal(loaded["head"]["kernel"], template["head"]["kernel"])
    np.testing.assert_array_equal(loaded["hidden"]["kernel"].w, template["hidden"]["kernel"].w)
    with pytest.raises(FileNotFoundError, match="config.init_from="):
        checkpoints.load_adapter_factors(str(tmp_path / "nothing"), template)


def test_metric_writer_drops_records_after_the_resumed_step(tmp_path):
    w = run_log.MetricWriter(str(tmp_path))
    for s in range(1, 6):
        w.write(s, "train", {"loss": 1.0 / s})
    w.write(4, "eval", {"accuracy": 0.5})
    w.close()
    w = run_log.MetricWriter(str(tmp_path), start_step=3)
    w.write(4, "train", {"loss": 9.0})
    w.close()
    records = run_log.read_metrics(str(tmp_path))
    assert [(r["step"], r["kind"]) for r in records] == [(1, "train"), (2, "train"), (3, "train"), (4, "train")]
    assert records[-1]["loss"] == 9.0
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tb"))


def test_sigterm_sets_the_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with run_log.sigterm_flag() as flag:
        assert not flag.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.wait(5)
    assert signal.getsignal(signal.SIGTERM) is before


def test_mesh_axes_and_batch_checks():
    mesh = mesh_lib.make_mesh({"data": -1})
    assert dict(mesh.shape) == {"data": 8} and mesh_lib.data_size(mesh) == 8
    mesh2 = mesh_lib.make_mesh({"data": 2, "fsdp": -1})
    assert dict(mesh2.shape) == {"data": 2, "fsdp": 4} and mesh_lib.batch_axes(mesh2) == ("data", "fsdp")
    assert dict(mesh_lib.make_mesh({"data": 2}).shape) == {"data": 2}  # a subset of the devices
    with pytest.raises(ValueError, match=r"config.mesh=\{'data': 16\} needs 16 devices, found 8"):
        mesh_lib.make_mesh({"data": 16})
    with pytest.raises(ValueError, match="at most one -1"):
        mesh_lib.make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match=r"config.batch_size=12 must be divisible by the 8 devices"):
        mesh_lib.check_batch_size(12, mesh)
    batch = mesh_lib.shard_batch(_batch(0), mesh)
    assert batch["x"].sharding.spec == jax.sharding.PartitionSpec(("data",))
    assert {s.data.shape for s in batch["x"].addressable_shards} == {(1, 4, 5)}

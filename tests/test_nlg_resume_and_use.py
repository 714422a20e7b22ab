"""Using and resuming a finished table-to-text run (the tiny GPT-2 smoke run of tests/conftest.py): SIGTERM, a
hard kill and a kill inside a checkpoint save resume to the uninterrupted run; train.predict decodes like the
run's own evaluation; train.export's merged and PEFT folders load in transformers and peft with our logits."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
from nlg_helpers import checkpoint_arrays, smoke_config, train_losses

import mtlora_jax as mt
from mtlora_jax import models
from train import run_log
from train.nlg import train as nlg_train

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_resume_after_sigterm_and_a_kill_gives_the_same_result(gpt2_cli_run, tiny_gpt2, tmp_path, monkeypatch, no_jvm):
    """SIGTERM at step 2 (checkpoint, return None), a hard kill at step 5 (last checkpoint 3), then a rerun:
    the same losses, adapters, predictions and metrics as the uninterrupted run."""

    class Killed(Exception):
        pass

    original = run_log.Progress.update

    def interrupt_at(step_to_stop, how):
        def update(self, step, metrics=None):
            if step == step_to_stop:
                if how == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)
                else:
                    raise Killed
            return original(self, step, metrics)

        monkeypatch.setattr(run_log.Progress, "update", update)

    config = smoke_config("webnlg", tiny_gpt2)
    interrupt_at(2, "sigterm")
    assert nlg_train.train_and_evaluate(config, str(tmp_path)) is None
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    interrupt_at(5, "kill")
    with pytest.raises(Killed):
        nlg_train.train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
    monkeypatch.setattr(run_log.Progress, "update", original)
    summary = nlg_train.train_and_evaluate(config, str(tmp_path))
    want = json.loads((gpt2_cli_run / "summary.json").read_text())
    np.testing.assert_allclose(train_losses(tmp_path), train_losses(gpt2_cli_run), rtol=1e-6)
    got_arrays, want_arrays = checkpoint_arrays(tmp_path, 6), checkpoint_arrays(gpt2_cli_run, 6)
    assert set(got_arrays) == set(want_arrays)
    for path in want_arrays:
        np.testing.assert_allclose(got_arrays[path], want_arrays[path], rtol=1e-5, atol=1e-7, err_msg=path)
    assert (tmp_path / "test.predictions.txt").read_text() == (gpt2_cli_run / "test.predictions.txt").read_text()
    assert {k: v for k, v in summary["metrics"].items() if "meteor" not in k} == pytest.approx(
        {k: v for k, v in want["metrics"].items() if "meteor" not in k}
    )


def test_export_of_a_gpt2_run_loads_in_transformers_and_peft(gpt2_cli_run, tiny_gpt2, tmp_path):
    """train.export on the finished GPT-2 run (scanned layers, c_attn q, k, v under one joint T): the merged HF
    folder and the PEFT adapter (fan_in_fan_out, lora_B = B·T) give our merged model's logits in PyTorch."""
    torch, peft = pytest.importorskip("torch"), pytest.importorskip("peft")
    import transformers

    from train import export, saved_run

    run = saved_run.load(str(gpt2_cli_run), head={"head": "lm"})
    ids = np.array([[15496, 995, 11, 428, 318, 257, 1332, 13]], np.int32)
    ours = np.asarray(run.model.module.apply({"params": run.merged}, ids, np.ones_like(ids)))
    merged = export.export(str(gpt2_cli_run), "merged", str(tmp_path / "merged"))
    with torch.no_grad():
        got = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, ours, atol=1e-4)
    out = export.export(str(gpt2_cli_run), "peft", str(tmp_path / "peft"))
    cfg = json.loads((pathlib.Path(out) / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] and cfg["task_type"] == "CAUSAL_LM" and cfg["modules_to_save"] is None
    base = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        lora = peft.PeftModel.from_pretrained(base, out).eval()(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(lora, ours, atol=1e-4)

    from mtlora_jax.paths import named_leaves
    from train import model as model_lib

    base = model_lib.load(saved_run.read_config(str(gpt2_cli_run)), head="lm").params
    back = mt.load_peft(out, models.unstack_params(base, "gpt2"))  # fan_in_fan_out; fused c_attn as one LoRA
    got, want = named_leaves(mt.merge(back)), named_leaves(models.unstack_params(run.merged, "gpt2"))
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=path)


@pytest.mark.slow
def test_kill_while_a_checkpoint_is_written_resumes_like_the_uninterrupted_run(gpt2_cli_run, tiny_gpt2, tmp_path,
                                                                               monkeypatch, no_jvm):  # fmt: skip
    """Killed inside the save of step 6 (its items half written under Orbax's temporary name), then rerun: it
    resumes from step 3 and ends with the losses, adapters and predictions of the uninterrupted run."""
    import orbax.checkpoint as ocp

    class Killed(BaseException):
        pass

    original = ocp.JsonCheckpointHandler.async_save

    async def die_at_6(self, directory, *args, **kwargs):
        if "/checkpoints/6" in str(directory):
            raise Killed
        return await original(self, directory, *args, **kwargs)

    config = smoke_config("webnlg", tiny_gpt2)
    with monkeypatch.context() as m:
        m.setattr(ocp.JsonCheckpointHandler, "async_save", die_at_6)
        with pytest.raises(Killed):
            nlg_train.train_and_evaluate(config, str(tmp_path))
    assert "3" in os.listdir(tmp_path / "checkpoints")
    nlg_train.train_and_evaluate(config, str(tmp_path))
    np.testing.assert_allclose(train_losses(tmp_path), train_losses(gpt2_cli_run), rtol=1e-6)
    got, want = checkpoint_arrays(tmp_path, 6), checkpoint_arrays(gpt2_cli_run, 6)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-7, err_msg=path)
    assert (tmp_path / "test.predictions.txt").read_text() == (gpt2_cli_run / "test.predictions.txt").read_text()


def test_predict_decodes_like_the_run_s_own_evaluation(gpt2_cli_run, tmp_path):
    """train.predict on a table-to-text workdir: --input JSONL of the eval contexts gives the run's own test
    predictions (same best checkpoint, same decoding settings), in order; --text prints one."""
    rows = [json.loads(line) for line in (gpt2_cli_run / "test.jsonl").read_text().splitlines()]
    src = tmp_path / "contexts.jsonl"
    src.write_text("".join(json.dumps({"context": r["context"]}) + "\n" for r in rows))
    dst = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "train.predict", f"--workdir={gpt2_cli_run}", f"--input={src}", f"--output={dst}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [json.loads(line)["prediction"] for line in dst.read_text().splitlines()] == [r["prediction"] for r in rows]
    cmd = [sys.executable, "-m", "train.predict", f"--workdir={gpt2_cli_run}", f"--text={rows[0]['context']}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == rows[0]["prediction"], out.stderr[-2000:]

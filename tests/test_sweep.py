"""The learning-rate sweep of the round-2 grid: its rates, the best rate chosen on held-out scores (edge
extension, ties, divergence), the plan that grows as runs are collected, and the driver collecting a diverged run."""

import itertools
import json
import os

import pytest

from configs import study as study_config
from train.study import grid as study
from train.study import report, sweep


def test_lr_text_and_ladder_steps():
    assert [sweep.lr_text(x) for x in (3e-4, 1e-3, 3e-3, 1e-2)] == ["3e-4", "1e-3", "3e-3", "1e-2"]
    rates = [3e-4, 1e-3, 3e-3]
    assert (sweep.beyond(3e-3, rates), sweep.beyond(3e-4, rates), sweep.beyond(1e-3, rates)) == (1e-2, 1e-4, None)
    with pytest.raises(ValueError, match="not on the sweep ladder"):
        sweep.beyond(2e-3, [2e-3])


@pytest.mark.parametrize(
    "scores, max_extra, want",
    [
        ({3e-4: 70, 1e-3: 80, 3e-3: 75}, 1, (1e-3, [3e-4, 1e-3, 3e-3])),  # an inner optimum: no extension
        ({3e-4: 70, 1e-3: 75, 3e-3: 80}, 1, (None, [3e-4, 1e-3, 3e-3, 1e-2])),  # the top edge: 1e-2 is missing
        ({3e-4: 70, 1e-3: 75, 3e-3: 80, 1e-2: 79}, 1, (3e-3, [3e-4, 1e-3, 3e-3, 1e-2])),
        ({3e-4: 70, 1e-3: 75, 3e-3: 80, 1e-2: 85}, 1, (1e-2, [3e-4, 1e-3, 3e-3, 1e-2])),  # at most 1 extra rate
        ({3e-4: 70, 1e-3: 75, 3e-3: 80}, 0, (3e-3, [3e-4, 1e-3, 3e-3])),
        ({3e-4: 80, 1e-3: 75, 3e-3: sweep.DIVERGED, 1e-4: 79}, 1, (3e-4, [1e-4, 3e-4, 1e-3, 3e-3])),
        ({3e-4: 80, 1e-3: 80, 3e-3: 70, 1e-4: 60}, 1, (3e-4, [1e-4, 3e-4, 1e-3, 3e-3])),  # a tie: the smaller rate
        ({3e-4: 70, 1e-3: None, 3e-3: 80}, 1, (None, [3e-4, 1e-3, 3e-3])),  # a sweep run not collected yet
    ],
)
def test_select_takes_the_best_held_out_score_and_extends_past_an_edge(scores, max_extra, want):
    assert sweep.select([1e-3, 3e-4, 3e-3], scores.get, max_extra) == want


def _config(tmp_path):
    c = study_config.get_config("round2")
    c.runs_dir, c.results_dir, c.cache_dir = (str(tmp_path / d) for d in ("runs", "results", "cache"))
    return c


def _collect(results, run_id, metrics=None, diverged=None):
    os.makedirs(results / run_id)
    summary = {"diverged": diverged, "metrics": {}} if diverged else {"metrics": metrics}
    json.dump(summary, open(results / run_id / "summary.json", "w"))


def test_round2_plan_sweeps_every_row_then_runs_the_seeds_at_its_best_rate(tmp_path):
    c = _config(tmp_path)
    rows = study_config.ROUND2_ROWS
    assert rows == ("lora", "shim", "icfm", "ctcm", "dtsm", "ctcm-id", "dtsm-id")
    runs = study.plan(c)
    want = {f"{t}-{r}-lr{lr}-s0" for t, r, lr in itertools.product(c.tasks, rows, ("3e-4", "1e-3", "3e-3"))}
    assert {r.run_id for r in runs} == want and len(runs) == 4 * 7 * 3 and study.undecided(c) == 4 * 7
    assert runs[0].run_id == "mrpc-lora-lr3e-4-s0" and runs[7].run_id == "mrpc-lora-lr1e-3-s0"  # rate-major
    flags = {r.run_id: dict(f.split("=", 1) for f in r.flags) for r in runs}
    mrpc = flags["mrpc-ctcm-id-lr3e-3-s0"]
    assert (mrpc["mtlora.structure"], mrpc["mtlora.c_init"], mrpc["learning_rate"]) == ("ctcm", "identity", "3e-3")
    assert (mrpc["num_epochs"], mrpc["num_train_steps"], mrpc["holdout_examples"]) == ("2", "-1", "400")
    assert "mtlora.c_init" not in flags["mrpc-ctcm-lr3e-3-s0"]
    assert flags["webnlg-lora-lr1e-3-s0"]["holdout_examples"] == "50"
    assert all(f["holdout_seed"] == "0" for f in flags.values())  # one held-out set for every run of a task
    for task in c.tasks:  # the runs of a task differ only in the row's flags, the rate and the seed
        strip = lambda f: {k: v for k, v in f.items() if not k.startswith(("mtlora.structure", "mtlora.c_init",
                                                                          "learning_rate", "seed"))}  # fmt: skip
        cell = [strip(f) for i, f in flags.items() if i.startswith(task + "-")]
        assert all(f == cell[0] for f in cell)
    # MRPC lora's sweep is collected: 1e-3 is best on the held-out part (not on dev, whose order is the reverse).
    results = tmp_path / "results"
    for lr, held, dev in (("3e-4", 0.70, 0.90), ("1e-3", 0.80, 0.70), ("3e-3", 0.75, 0.60)):
        _collect(results, f"mrpc-lora-lr{lr}-s0", {"heldout_accuracy": held, "accuracy": dev})
    ids = [r.run_id for r in study.plan(c)]
    assert {"mrpc-lora-lr1e-3-s1", "mrpc-lora-lr1e-3-s2"} <= set(ids) and study.undecided(c) == 4 * 7 - 1
    assert ids.index("mrpc-lora-lr1e-3-s1") < ids.index("sst2-lora-lr3e-4-s0")  # a task finishes before the next
    # MRPC shim is best at the top edge: 1e-2 joins its sweep; it diverges there, so 3e-3 is its best rate.
    for lr, held in (("3e-4", 0.6), ("1e-3", 0.7), ("3e-3", 0.8)):
        _collect(results, f"mrpc-shim-lr{lr}-s0", {"heldout_accuracy": held})
    ids = [r.run_id for r in study.plan(c)]
    assert "mrpc-shim-lr1e-2-s0" in ids and not any(i.startswith("mrpc-shim-lr3e-3-s1") for i in ids)
    _collect(results, "mrpc-shim-lr1e-2-s0", diverged="FloatingPointError: non-finite train loss nan at step 9")
    ids = [r.run_id for r in study.plan(c)]
    assert {"mrpc-shim-lr3e-3-s1", "mrpc-shim-lr3e-3-s2"} <= set(ids)


def test_a_summary_without_the_held_out_metric_is_an_error(tmp_path):
    c = _config(tmp_path)
    _collect(tmp_path / "results", "sst2-lora-lr3e-4-s0", {"accuracy": 0.8})
    with pytest.raises(ValueError, match="no metric 'heldout_accuracy'"):
        study.plan(c)


def test_driver_collects_a_diverged_run_and_plans_as_runs_finish(tmp_path):
    """Only SST-2 lora and shim: each run's held-out score is decided by its rate; 3e-3 diverges for shim."""
    c = _config(tmp_path)
    c.structures = ("lora", "shim")
    c.tasks = {"sst2": c.tasks.sst2}
    score = {"3e-4": 0.7, "1e-3": 0.9, "3e-3": 0.8}
    calls = []

    def runner(cmd, env, log_path, stop):
        workdir = cmd[cmd.index("--workdir") + 1]
        calls.append(os.path.basename(workdir))
        flags = dict(a[len("--config.") :].split("=", 1) for a in cmd if a.startswith("--config."))
        if flags["mtlora.structure"] == "shim" and flags["learning_rate"] == "3e-3":
            with open(log_path, "a") as f:
                f.write("Traceback ...\nFloatingPointError: non-finite train loss nan at step 7: the run diverged\n")
            return 1
        os.makedirs(workdir, exist_ok=True)
        held = score[flags["learning_rate"]]
        summary = {"metrics": {"accuracy": held, "heldout_accuracy": held}, "trainable_params": 1000}
        json.dump(summary, open(f"{workdir}/summary.json", "w"))
        return 0

    counts = study.run_grid(c, runner=runner)
    assert counts["diverged"] == ["sst2-shim-lr3e-3-s0"] and not counts["failed"]
    assert calls[6:] == ["sst2-lora-lr1e-3-s1", "sst2-lora-lr1e-3-s2", "sst2-shim-lr1e-3-s1", "sst2-shim-lr1e-3-s2"]
    diverged = json.load(open(tmp_path / "results" / "sst2-shim-lr3e-3-s0" / "summary.json"))
    assert diverged["diverged"].startswith("FloatingPointError") and diverged["metrics"] == {}
    run = json.load(open(tmp_path / "results" / "sst2-shim-lr3e-3-s0" / study.RUN_JSON))
    assert run["lr"] == 3e-3 and run["step_time_s"] is None
    assert study.run_grid(c, runner=runner)["skipped"] == calls  # everything collected: a rerun runs nothing
    # The report: the sweep table (held-out / dev per rate, the chosen rate in bold), the tests at the chosen rates.
    text = report.write_report(c, str(tmp_path / "results"), str(tmp_path / "R.md"), str(tmp_path / "figs"))
    assert (
        "## What changed against round one" in text
        and "| lora | 70.0 / 70.0 | **90.0 / 90.0** | 80.0 / 80.0 | 1e-3 |" in text
    )
    assert "| shim | 70.0 / 70.0 | **90.0 / 90.0** | diverged | 1e-3 |" in text
    assert "SST2: shim 90.0 vs LoRA 90.0 (Δ +0.0, 3 paired seeds" in text  # seeds 0, 1, 2 at 1e-3
    assert os.path.isfile(tmp_path / "figs" / "lr_sst2.png") and "Missing runs (0 of 10)" in text

"""train.study.report renders RESULTS.md and the figures from fake result folders: mean/std and the paired t-test equal
scipy's, Holm's adjustment equals the textbook formula, each comparison gets its plain sentence, the missing runs of
the plan are listed, and every PNG is written."""

import dataclasses
import json
import os

import numpy as np
import pytest
from scipy import stats

import mtlora_jax as mt
from configs import study as study_config
from train import analyze
from train.study import grid as study
from train.study import report
from train.study import stats as study_stats

# (task, row) -> final metric per seed (0..2), in [0, 1] as the entries write them.
SCORES = {
    ("cola", "lora"): [0.40, 0.42, 0.38],
    ("cola", "shim"): [0.41, 0.45, 0.40],
    ("cola", "icfm"): [0.30, 0.31, 0.29],
    ("cola", "lora-qv-r28"): [0.35, 0.36, 0.30],
    ("rte", "lora"): [0.60, 0.62, 0.61],
    ("rte", "shim"): [0.60, 0.61, 0.63],
    ("rte", "icfm"): [0.58, 0.64],  # seed 2 missing
    ("rte", "lora-qv-r28"): [0.55, 0.57, 0.56],
}
METRIC = {"cola": "mcc", "rte": "accuracy"}


def _analysis(structure: str, seed: int) -> dict:
    """A real train.analyze result of random 2-layer adapters of `structure`."""
    rng = np.random.default_rng(seed)
    leaves = {}
    for layer in range(2):
        for module, (d_in, d_out) in {"attention/query": (6, 6), "intermediate/dense": (6, 10)}.items():
            c = rng.normal(size=(3, 3)) if structure != "lora" else None
            leaves[f"encoder/layer_{layer}/{module}/kernel"] = mt.Adapted(
                w=np.zeros((d_in, d_out), np.float32), a=rng.normal(size=(3, d_in)), b=rng.normal(size=(d_out, 3)),
                c=c, structure=structure, scale=2.0,
            )  # fmt: skip
    records, _ = analyze.analyze_adapters(leaves)
    return {"checkpoint": "x", "step": 300, "structures": [structure], "adapters": records}


def _write(folder, task, row, seed, value):
    structure = "lora" if row.startswith("lora") else row
    run = study.Run(f"{task}-{row}-s{seed}", task, row, structure, seed, "glue", f"configs/{task}.py:minilm", ())
    os.makedirs(folder)
    info = {
        "step_time_s": 0.5 + 0.1 * (structure != "lora") + 0.01 * seed,
        "finished_utc": f"2026-01-0{seed + 1}T00:00:00Z",
        "git_commit": "abcdef0123",
        "machine": {"cpu": "Test CPU", "cpus": 2, "load_avg": [1.0, 1.0, 1.0]},
    }
    json.dump({**dataclasses.asdict(run), **info}, open(folder / study.RUN_JSON, "w"))
    json.dump({"task": task, "metrics": {METRIC[task]: value}, "trainable_params": 1000 + len(row)},
              open(folder / "summary.json", "w"))  # fmt: skip
    with open(folder / "metrics.jsonl", "w") as f:
        for step, frac in ((100, 0.5), (300, 1.0)):
            f.write(json.dumps({"step": step, "kind": "eval", METRIC[task]: value * frac}) + "\n")
    json.dump(_analysis(structure, seed), open(folder / analyze.ANALYSIS_JSON, "w"))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    for (task, row), values in SCORES.items():
        for seed, value in enumerate(values):
            _write(root / "results" / f"{task}-{row}-s{seed}", task, row, seed, value)
    os.makedirs(root / "results" / "cola-dtsm-s0.tmp")  # an interrupted collect: ignored
    config = study_config.get_config("offline")
    text = report.write_report(config, str(root / "results"), str(root / "docs" / "RESULTS.md"), str(root / "figs"))
    return root, text, config


def test_mean_std_and_paired_test_match_scipy():
    a, b = {0: 1.0, 1: 2.5, 2: 2.0}, {0: 0.5, 1: 2.0, 2: 2.2, 3: 9.0}
    diff, p, n = study_stats.paired_test(a, b)
    assert n == 3 and diff == pytest.approx(np.mean([0.5, 0.5, -0.2]))
    assert p == pytest.approx(stats.ttest_rel([1.0, 2.5, 2.0], [0.5, 2.0, 2.2]).pvalue)
    m, s, k = study_stats.mean_std([1.0, 2.0, 4.0])
    assert (m, k) == (pytest.approx(7 / 3), 3) and s == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert np.isnan(study_stats.mean_std([3.0])[1]) and np.isnan(study_stats.paired_test({0: 1.0}, {0: 2.0})[1])


def test_holm_adjustment():
    """Holm: sorted p_(k) times (m - k), running maximum, capped at 1; nan is skipped."""
    want = [0.03, 0.06, float("nan"), 0.06]
    assert study_stats.holm([0.01, 0.04, float("nan"), 0.03]) == pytest.approx(want, nan_ok=True)
    assert study_stats.holm([0.5, 0.9]) == [1.0, 1.0]


def test_tables_hold_the_scipy_numbers(rendered):
    _, text, _ = rendered
    lora, shim = np.array(SCORES[("cola", "lora")]) * 100, np.array(SCORES[("cola", "shim")]) * 100
    assert f"{shim.mean():.1f} ± {shim.std(ddof=1):.1f}" in text
    p = stats.ttest_rel(shim, lora).pvalue
    assert f"{(shim - lora).mean():+.1f} (p {p:.3f})" in text
    icfm_rte = np.array(SCORES[("rte", "icfm")]) * 100
    assert f"{icfm_rte.mean():.1f} ± {icfm_rte.std(ddof=1):.1f} (n=2)" in text  # fewer seeds are flagged
    # The average over tasks is tested on per-seed averages over tasks.
    per_seed = lambda row: [(SCORES[("cola", row)][s] + SCORES[("rte", row)][s]) * 50 for s in range(3)]
    p_avg = stats.ttest_rel(per_seed("shim"), per_seed("lora")).pvalue
    assert f"the average: shim {np.mean(per_seed('shim')):.1f} vs LoRA {np.mean(per_seed('lora')):.1f}" in text
    assert f"p = {p_avg:.3f}" in text


def test_sentences_say_where_mtlora_does_not_win(rendered):
    _, text, _ = rendered
    icfm, lora = np.array(SCORES[("cola", "icfm")]) * 100, np.array(SCORES[("cola", "lora")]) * 100
    assert stats.ttest_rel(icfm, lora).pvalue < 0.05  # the fixture's clear loss
    assert f"COLA: icfm {icfm.mean():.1f} vs LoRA {lora.mean():.1f}" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("- COLA: icfm"))
    assert "significantly worse than LoRA" in line
    assert "no significant difference" in next(ln for ln in text.splitlines() if ln.startswith("- RTE: shim"))
    assert "Of 4 MTLoRA-vs-LoRA comparisons" in text and "significantly worse in 1" in text
    assert "| LoRA q,v (matched rank) |" in text and "matched LoRA q,v r=28 43,008" in text


def test_tasks_no_row_learned_are_flagged(rendered):
    """Each task is set against its constant prediction; one whose best row does not clear it by 1 point is flagged."""
    _, text, config = rendered
    assert "| constant prediction | 0.0 | 52.7 | — |" in text  # cola MCC 0, rte majority 146 / 277
    assert "- COLA: best row shim 42.0, constant prediction 0.0: learned (+42.0 points)." in text
    c = {("rte", "lora"): {0: 52.0, 1: 53.0}, ("rte", "shim"): {0: 54.0, 1: 53.0}, ("rte", "icfm"): {0: 50.0}}
    (line,) = study_stats.constant_text(c, ["rte"], config)
    assert line.startswith("RTE: best row shim 53.5, constant prediction 52.7: no row beats it by more than 1 point")
    c[("rte", "shim")] = {0: 54.0, 1: 53.5}
    want = "RTE: best row shim 53.8, constant prediction 52.7: learned (+1.0 points)."
    assert study_stats.constant_text(c, ["rte"], config) == [want]


def test_grid_machine_cost_and_missing_runs(rendered):
    _, text, config = rendered
    planned = study.plan(config)
    assert f"Missing runs ({len(planned) - 23} of {len(planned)})" in text
    assert "`rte-icfm-s2`" in text and "`webnlg-base-s0`" in text and "`cola-shim-s0`" not in text.split("Missing")[1]
    assert "Test CPU (2 CPUs)" in text and "2026-01-01T00:00:00Z to 2026-01-03T00:00:00Z" in text
    assert "LoRA 43,008, SHIM/ICFM 43,264, CTCM/DTSM 43,520, LoRA r=9 48,384" in text
    assert "0.61 s, 1.20x" in text  # shim step time: median over seeds 0.61 vs LoRA 0.51
    assert "do not edit by hand" in text


def test_figures_are_written(rendered):
    root, text, _ = rendered
    names = sorted(os.listdir(root / "figs"))
    assert names == sorted(["curves.png", "spectra.png", "norms_layers.png", "eigenvalues.png",
                            "spectra_layers_cola.png", "spectra_layers_rte.png"])  # fmt: skip
    for name in names:
        assert (root / "figs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](../figs/{name})" in text


def test_spectrum_table_reads_the_analysis(rendered):
    _, text, _ = rendered
    rec = _analysis("icfm", 0)["adapters"]
    assert all(a["t_eig_min_real"] >= -1e-9 and a["t_eig_max_abs_imag"] == 0 for a in rec)  # C Cᵀ: real, >= 0
    row = next(ln for ln in text.splitlines() if ln.startswith("| cola | icfm |"))
    stable = np.mean([np.mean([a["stable_rank"] for a in _analysis("icfm", s)["adapters"]]) for s in range(3)])
    assert f"| {stable:.2f} |" in row and row.endswith("| 0.00 | 3 |")


def test_a_task_no_row_learned_is_left_out_of_the_verdict_and_the_average(tmp_path):
    """RTE at chance (every row within 1 point of the majority class): its rows stay in the score table, but the
    verdict, the per-seed average and the Holm correction are over CoLA alone."""
    chance = {("rte", row): [0.52, 0.53, 0.52] for row in ("lora", "shim", "icfm")}
    for (task, row), values in {**{k: v for k, v in SCORES.items() if k[0] == "cola"}, **chance}.items():
        for seed, value in enumerate(values):
            _write(tmp_path / "results" / f"{task}-{row}-s{seed}", task, row, seed, value)
    config = study_config.get_config("offline")
    text = report.write_report(config, str(tmp_path / "results"), str(tmp_path / "R.md"), str(tmp_path / "figs"))
    assert study_stats.unlearned(study_stats.cells(report.load_results(str(tmp_path / "results")), config),
                                 ["cola", "rte"], config) == ["rte"]  # fmt: skip
    assert "Of 2 MTLoRA-vs-LoRA comparisons" in text and "not learned" in text
    assert not any(ln.startswith("- RTE: shim") for ln in text.splitlines())
    shim = np.mean(SCORES[("cola", "shim")]) * 100
    assert f"the average: shim {shim:.1f} vs LoRA" in text  # the average of CoLA alone
    assert "| 52.3 ± 0.6 |" in text  # RTE's scores are still shown

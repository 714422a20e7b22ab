"""docs/RESULTS.md and docs/figures/*.png of the structure study, generated from the committed results folders.

  python -m train.study.report --config configs/study.py        # reads results/offline/*/, never the workdirs

Per task and row (structure, parameter-matched LoRA, base): mean ± std over seeds of the task's metric (in points, final
evaluation), the average over tasks, the difference to LoRA on the same targets with a paired t-test across seeds
(scipy.stats.ttest_rel; Holm-corrected over all MTLoRA-vs-LoRA tests as well), trainable parameters, median step time,
the ΔW spectrum summaries and eigenvalues of T from train.analyze, one plain sentence per comparison, and the runs
still missing from the plan. Figures: dev metric vs step, normalized ΔW singular-value spectra (averaged and per
layer), ‖ΔW‖_F per layer, eigenvalues of T in the complex plane. RESULTS.md is never edited by hand.
"""

import dataclasses
import datetime
import json
import os

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from train import analyze, run_log
from train.study import figures as study_figures
from train.study import grid as study
from train.study import sweep_report, tables
from train.study.figures import T_STRUCTURES
from train.study.stats import (  # noqa: F401 (the report's numbers, re-exported for its readers)
    ALPHA,
    LEARNED_MARGIN,
    _fmt_p,
    cells,
    comparisons,
    constant_text,
    holm,
    mean_std,
    paired_test,
    row_kind,
    row_label,
    seed_average,
    unlearned,
    verdict,
)


@dataclasses.dataclass
class Result:
    """One collected run: run.json, summary.json, metrics.jsonl records and analysis.json (None for base runs)."""

    run: dict
    summary: dict
    records: list
    analysis: dict | None


def load_results(results_dir: str) -> list[Result]:
    """Every complete `<results_dir>/<run_id>/` (summary.json and run.json present), sorted by run id."""
    out = []
    for name in sorted(os.listdir(results_dir)) if os.path.isdir(results_dir) else []:
        folder = os.path.join(results_dir, name)
        if name.endswith(".tmp") or not os.path.isfile(os.path.join(folder, "summary.json")):
            continue
        load = lambda f, folder=folder: json.load(open(os.path.join(folder, f)))
        has_analysis = os.path.isfile(os.path.join(folder, analyze.ANALYSIS_JSON))
        analysis = load(analyze.ANALYSIS_JSON) if has_analysis else None
        out.append(Result(load(study.RUN_JSON), load("summary.json"), run_log.read_metrics(folder), analysis))
    return out


def _fmt(m: float, s: float, n: int, full: int) -> str:
    text = f"{m:.1f}" + ("" if np.isnan(s) else f" ± {s:.1f}")
    return text + (f" (n={n})" if n != full else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _med(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else float("nan")


def _grid_text(config, results: list[Result], planned: list[study.Run], undecided: int = 0) -> list[str]:
    machines = sorted({f"{r.run['machine']['cpu']} ({r.run['machine']['cpus']} CPUs)" for r in results})
    dates = sorted(r.run["finished_utc"] for r in results)
    loads = [r.run["machine"]["load_avg"][0] for r in results]
    lines = [
        f"Grid `{config.grid}` (configs/study.py): structures {', '.join(config.structures)}; seeds "
        f"{', '.join(map(str, config.seeds))}; {len(planned)} planned runs, {len(results)} finished."
        + (f" The seeds of {undecided} rows are planned once their sweep decides their rate." if undecided else "")
    ]
    for task, t in config.tasks.items():
        unit = " x 100" if t.scale == 100 else ""
        lines.append(
            f"- **{task}** ({t.entry}, `{t.config}`, metric `{t.metric}`{unit}): {t.description.rstrip('.')}. "
            f"Flags: `{' '.join(t.flags)}`."
        )
    lines.append(
        f"- Machine: {'; '.join(machines) or '—'}; 1-minute load average at the end of the runs: "
        f"median {_med(loads):.1f}, max {max(loads, default=float('nan')):.1f} (shared machine: step "
        f"times are indicative, ratios within one task are the comparable part)."
    )
    lines.append(
        f"- Runs finished {dates[0] if dates else '—'} to {dates[-1] if dates else '—'} (UTC); commits "
        f"{', '.join(sorted({r.run['git_commit'][:7] for r in results})) or '—'}."
    )
    return lines


def _results_sections(config, results: list[Result], c: dict, tasks, kinds, sweeping: bool) -> list[str]:
    """The verdict, the score and difference tables, the cost and the spectra of the compared runs."""
    full, out = len(config.seeds), []
    learned_tasks = [t for t in tasks if t not in unlearned(c, tasks, config)]
    cmp = comparisons(c, learned_tasks, kinds)  # a task no row learned says nothing about the structures
    out += ["## Where MTLoRA does and does not beat LoRA", ""]
    mt_cmp = [x for x in cmp if x["kind"].split("-")[0] in T_STRUCTURES and x["task"] != "average"]
    if mt_cmp:
        better = [x for x in mt_cmp if not np.isnan(x["p"]) and x["p"] < ALPHA and x["diff"] > 0]
        worse = [x for x in mt_cmp if not np.isnan(x["p"]) and x["p"] < ALPHA and x["diff"] < 0]
        holm_better = [x for x in better if x.get("p_holm", 1) < ALPHA]
        untested = [x for x in mt_cmp if np.isnan(x["p"])]
        out.append(
            f"Of {len(mt_cmp)} MTLoRA-vs-LoRA comparisons (structure x task, paired over seeds, same targets, "
            f"rank, {'each row at its own chosen lr' if sweeping else 'lr'} and steps), MTLoRA was significantly "
            f"better in {len(better)} ({len(holm_better)} after "
            f"Holm correction over all {len(mt_cmp)}), significantly worse in {len(worse)}, not "
            f"distinguishable from LoRA in {len(mt_cmp) - len(better) - len(worse) - len(untested)}, and not yet "
            f"testable (fewer than 2 paired seeds) in {len(untested)}. With 3 seeds a paired t-test detects only "
            "differences that are large against the seed-to-seed spread."
        )
        out.append("")
    learned = constant_text(c, tasks, config)
    if learned:
        out += ["Was each task learned at all? Against always predicting the dev set's majority class (MCC 0):", ""]
        out += [f"- {s}" for s in learned] + [""]
    for task in [*tasks, "average"]:
        sentences = [verdict(x) for x in cmp if x["task"] == task]
        out += [f"- {s}" for s in sentences]
    left_out = [t for t in tasks if t not in learned_tasks]
    out += ["", f"## Scores (final evaluation in points, mean ± std over seeds; n shown when < {full})", ""]
    if left_out:
        out += [f"The average is over the learned tasks; {', '.join(left_out)} left out (not learned).", ""]
    table = []
    for kind in kinds:
        cols = [_fmt(*mean_std(c[(t, kind)].values()), full) if (t, kind) in c else "—" for t in tasks]
        avg = seed_average(c, kind, learned_tasks)
        table.append([row_label(kind), *cols, _fmt(*mean_std(avg.values()), full) if avg else "—"])
    consts = [config.tasks[t].get("constant") for t in tasks]
    if any(x is not None for x in consts):
        table.append(["constant prediction", *("—" if x is None else f"{x:.1f}" for x in consts), "—"])
    out += _table(["row", *tasks, "average"], table)
    out += ["", "## Difference to LoRA (same targets), paired t-test across seeds", ""]
    diff_rows = []
    for kind in [k for k in kinds if k not in ("lora", "base")]:
        cols = []
        for task in [*tasks, "average"]:
            x = next((x for x in cmp if x["task"] == task and x["kind"] == kind), None)
            cols.append("—" if x is None else f"{x['diff']:+.1f} (p {_fmt_p(x['p'])})")
        diff_rows.append([row_label(kind), *cols])
    out += _table(["row", *tasks, "average"], diff_rows)
    out += ["", "## Cost: trainable parameters and median step time", "", tables.matched_text(config, tasks), ""]
    cost = []
    for kind in kinds:
        cols = []
        for task in tasks:
            runs = [r for r in results if r.run["task"] == task and row_kind(r.run["row"]) == kind]
            lora = [r.run["step_time_s"] for r in results if r.run["task"] == task and r.run["row"] == "lora"]
            t_step, t_lora = _med(r.run["step_time_s"] for r in runs), _med(lora)
            ratio = f", {t_step / t_lora:.2f}x" if kind != "lora" and t_lora > 0 and not np.isnan(t_step) else ""
            params = f"{runs[0].summary['trainable_params']:,}" if runs else "—"
            cols.append("—" if not runs else f"{params}; {t_step:.2f} s{ratio}" if not np.isnan(t_step) else params)
        cost.append([row_label(kind), *cols])
    out += _table(["row", *tasks], cost)
    out += [
        "",
        "Trainable parameters include the task head; step time is the median over a run's log intervals "
        "(compile excluded), median over seeds, and the ratio to LoRA on the same task. The runs shared the "
        "machine with other work (load averages above), so these step times move with the load of the hour a run "
        "happened to get and are no comparison of the structures' cost: the controlled one (every variant "
        "interleaved in one process) is `bench/step_time.py` in docs/BENCHMARKS.md.",
        "",
    ]
    out += [
        "## ΔW spectra and eigenvalues of T (train.analyze on the final adapters)",
        "",
        "Every structure parameterizes the same set of updates (rank <= r matrices: an invertible T can be "
        "absorbed into B), so any difference in the learned spectra comes from the optimization path, not from "
        "what the structures can express. Means over all adapted matrices and layers, then over seeds; "
        "'complex λ(T)' is the fraction of eigenvalues with a non-zero imaginary part.",
        "",
    ]
    header = ["task", "row", "stable rank", "effective rank", "‖ΔW‖_F", "min Re λ(T)", "complex λ(T)", "runs"]
    out += _table(header, tables.spectrum_table(results, tasks, kinds))
    return out + [""]


def render(
    config, results: list[Result], figures: dict[str, str], planned: list[study.Run], all_results=None, best=None
) -> str:
    """The markdown of RESULTS.md (figures: name -> path relative to the report). A sweep grid passes the runs at
    each row's chosen rate as `results`, every collected run as `all_results` and grid.best_rates as `best`."""
    tasks = [t for t in config.tasks if any(r.run["task"] == t for r in results)]
    c = cells(results, config)
    kinds = [k for k in [*config.structures, "lora-qv-matched", "base"] if any(k == kk for _, kk in c)]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    arg = "" if config.grid == "offline" else f":{config.grid}"
    sweeping = best is not None
    out = [
        "# Structure study: MTLoRA structures vs LoRA"
        + (f" ({config.grid}: each row at its own learning rate)" if sweeping else ""),  # fmt: skip
        "",
        f"Generated by `python -m train.study.report --config configs/study.py{arg}` on {now} from "
        f"`{config.results_dir}/` (do not edit by hand; rerun the command).",
        "",
        *_grid_text(
            config,
            all_results if sweeping else results,
            planned,
            sum(b is None for b, _ in best.values()) if sweeping else 0,
        ),  # fmt: skip
        "",
    ]
    if sweeping:
        out += ["## What changed against round one (docs/RESULTS.md)", "", *sweep_report.changes_text(config), ""]
        out += ["## The learning-rate sweep", "", sweep_report.best_text(config, best), ""]
        out += sweep_report.sweep_tables(config, all_results, best)
    if results:
        out += _results_sections(config, results, c, tasks, kinds, sweeping)
    else:
        out += ["## Scores", "", "No run to compare yet" + (" at a chosen rate." if sweeping else "."), ""]
    out += ["## Figures", ""] + [f"![{name}]({path})" for name, path in figures.items()]
    collected = {x.run["run_id"] for x in (all_results if sweeping else results)}
    missing = [r.run_id for r in planned if r.run_id not in collected]
    out += ["", f"## Missing runs ({len(missing)} of {len(planned)})", ""]
    out.append("None: the grid is complete." if not missing else ", ".join(f"`{m}`" for m in missing))
    return "\n".join(out) + "\n"


def write_report(config, results_dir: str, out: str, figures_dir: str) -> str:
    """Renders `out` (markdown) and the figures from `results_dir`; returns the markdown."""
    results = load_results(results_dir)
    best, final = None, results
    if config.get("learning_rates"):  # a sweep grid: tables and tests see each row's runs at its chosen rate
        best = study.best_rates(config, results_dir)
        final = sweep_report.at_best(results, best)
    sweep_runs = sweep_report.first_seed(config, results) if best is not None else ()
    figures = study_figures.plot_all(config, final, figures_dir, sweep_runs, best) if results else {}
    rel = {k: os.path.relpath(v, os.path.dirname(os.path.abspath(out))) for k, v in figures.items()}
    text = render(config, final, rel, study.plan(config, results_dir), all_results=results, best=best)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    return text


def define_flags() -> None:
    """Defines the command-line flags (only when run as a script: importing the module defines none)."""
    config_flags.DEFINE_config_file("config", "configs/study.py", "Study config, e.g. configs/study.py:offline.")
    flags.DEFINE_string("results_dir", None, "Override config.results_dir.")
    flags.DEFINE_string("out", None, "Override config.report (the markdown file).")
    flags.DEFINE_string("figures_dir", None, "Override config.figures_dir.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    c = flags.FLAGS.config
    results_dir = flags.FLAGS.results_dir or os.path.join(study.REPO, c.results_dir)
    out = flags.FLAGS.out or os.path.join(study.REPO, c.report)
    write_report(c, results_dir, out, flags.FLAGS.figures_dir or os.path.join(study.REPO, c.figures_dir))
    print(f"wrote {out}")


if __name__ == "__main__":
    define_flags()
    app.run(main)

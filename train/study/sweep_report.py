"""The learning-rate sweep's part of a study report (configs/study.py:round2): which runs the tables use, the
sweep tables, and what changed against round one.

The tables and tests of train/study/report.py then see only the runs at each row's chosen rate (`at_best`), so
"mean ± std over seeds" and the paired tests compare every row at its own best rate.
"""

from train.study import sweep


def at_best(results: list, best: dict) -> list:
    """The runs at their row's chosen rate (`best`: {(task, row): (rate or None, rates)} of grid.best_rates)."""
    chosen = lambda r: best.get((r.run["task"], r.run["row"]), (None,))[0]
    return [r for r in results if r.run.get("lr") is not None and r.run["lr"] == chosen(r)]


def first_seed(config, results: list) -> list:
    """The sweep runs: every rate of every row, first seed."""
    return [r for r in results if r.run.get("lr") is not None and r.run["seed"] == config.seeds[0]]


def _cell(r, key: str, scale: float) -> str:
    value = r.summary["metrics"].get(key)
    return "—" if value is None else f"{scale * value:.1f}"


def sweep_tables(config, results: list, best: dict) -> list[str]:
    """Per task: held-out score / dev score of every row at every rate (first seed), the chosen rate in bold."""
    out = []
    sweep_runs = first_seed(config, results)
    for task, t in config.tasks.items():
        runs = [r for r in sweep_runs if r.run["task"] == task]
        if not runs:
            continue
        rates = sorted({r.run["lr"] for r in runs})
        key = config.select_prefix + t.metric
        out += [f"**{task}** ({t.metric}, held-out / dev, points; the chosen rate in bold)", ""]
        out += ["| row | " + " | ".join(map(sweep.lr_text, rates)) + " | chosen |", "|" + "---|" * (len(rates) + 2)]
        for row in config.structures:
            cells = []
            for lr in rates:
                r = next((r for r in runs if r.run["row"] == row and r.run["lr"] == lr), None)
                text = "—" if r is None else f"{_cell(r, key, t.scale)} / {_cell(r, t.metric, t.scale)}"
                text = "diverged" if r is not None and r.summary.get("diverged") else text
                chosen = best.get((task, row), (None,))[0] == lr
                cells.append(f"**{text}**" if chosen and r is not None else text)
            chosen = best.get((task, row), (None,))[0]
            cells.append("undecided" if chosen is None else sweep.lr_text(chosen))
            out.append(f"| {row} | " + " | ".join(cells) + " |")
        edge = [row for row in config.structures if _at_edge(best.get((task, row)))]
        if edge:
            out.append("")
            out.append(
                f"Chosen at the edge of all the rates tried (the optimum may lie beyond, the sweep added at most "
                f"{config.max_extra_rates} rate per row): {', '.join(edge)}."
            )
        out.append("")
    return out


def _at_edge(choice) -> bool:
    if not choice or choice[0] is None:
        return False
    best, rates = choice
    return best in (min(rates), max(rates))


def changes_text(config) -> list[str]:
    """What round two changed against round one (docs/RESULTS.md), as bullet lines."""
    rates = ", ".join(map(sweep.lr_text, sorted(config.learning_rates)))
    return [
        f"- **Learning rate per row.** Round one ran every row at 1e-3. Here every row ran {rates} (seed "
        f"{config.seeds[0]}); its rate is the best on a held-out part of the training split (`holdout_examples`, the "
        "same examples for every run of a task), never the dev set, with one more rate added when the best was at an "
        f"edge (at most {config.max_extra_rates} per row); the seeds {', '.join(map(str, config.seeds[1:]))} then "
        f"ran at that rate and seed {config.seeds[0]}'s sweep run at it is reused. Tables, tests and curves below "
        "use the runs at each row's chosen rate.",
        "- **Budgets in epochs.** 2 epochs for MRPC and STS-B and 1 epoch of the 5,000-sentence SST-2 subset, "
        "instead of 200 steps (under 1 epoch); WebNLG keeps round one's 60 steps.",
        "- **T = I start.** Two new rows, ctcm-id and dtsm-id: CTCM and DTSM with `mtlora.c_init=identity` (C = I, "
        "D = I for CTCM, D = 0 for DTSM), as the authors' newer README advises; the other rows keep the reference "
        "U(±1/sqrt(r)) start.",
        "- **Tasks.** CoLA and RTE are left out: no row of round one learned them at its budget, and the CPU budget "
        "of this round went to the sweep instead. The held-out examples come out of the training split (MRPC 400, "
        "STS-B 500, SST-2 500 of its 5,000; WebNLG 50 inputs outside its 2,000 training examples).",
        "- **Cut to fit about 12 CPU hours.** No parameter-matched LoRA row and no 0-step base row; one seed for "
        "the sweep; WebNLG keeps 60 steps and 100 test inputs.",
        "- **The code underneath.** GLUE batches are length-grouped (`batching=length_grouped`, `pad_multiple=16`) "
        "instead of round one's length buckets, dropout masks come from threefry instead of rbg, and the attention, "
        "GELU and LayerNorm kernels were rewritten (same numbers to float tolerance, tests/test_models*.py), so "
        "round one's runs are not bit-identical to a rerun of them today.",
        "- **GPT-2 preset.** The `mtlora-paper` preset for GPT-2 now puts one joint T over q, k and v of c_attn, "
        "as the authors' GPT-2 does; it changes the `gpu` grid's GPT-2 rows, and no offline grid has a GPT-2 run.",
    ]


def best_text(config, best: dict) -> str:
    """One line: how many rows chose each rate."""
    chosen = [b for b, _ in best.values() if b is not None]
    counts = {lr: chosen.count(lr) for lr in sorted(set(chosen))}
    parts = ", ".join(f"{sweep.lr_text(lr)}: {n}" for lr, n in counts.items())
    return f"Chosen rates over {len(chosen)} decided rows (task x row): {parts or '—'}; " + (
        f"{sum(b is None for b, _ in best.values())} rows still wait for sweep runs."
    )

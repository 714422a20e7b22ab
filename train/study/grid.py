"""The structure study driver: a grid of ordinary train.glue / train.nlg runs, each collected into results/.

  python -m train.study --config configs/study.py --dry_run                 # the plan and what is done
  nohup python -m train.study --config configs/study.py --commit --max_hours 2.5 > study.log 2>&1 &
  python -m train.study.report --config configs/study.py                    # docs/RESULTS.md from results/

Every run of `plan(config)` (tasks x rows x seeds, rows = the structures + the parameter-matched LoRA row (+ a
0-step "base" row for NLG tasks)) is one subprocess `python -m train.<entry> --config <task config> --workdir
<runs_dir>/<run_id> --config.seed=S --config.mtlora.structure=X ...`: a subprocess isolates memory, and the
entry's own checkpoint resume makes a killed run continue where it stopped. A finished run is collected into
`<results_dir>/<run_id>/`: summary.json, config.json, metrics.jsonl (train and eval curves), analysis.json / .npz
(train.analyze: ΔW spectra and eigenvalues of T of the final adapters) and run.json (what ran, where, the
median step time); with --commit that folder alone is committed. Runs whose results/<run_id>/summary.json
exists are skipped, so a crashed or time-boxed grid continues where it stopped. --max_hours: no new run starts
after that many hours. SIGTERM / Ctrl-C: the running entry checkpoints (it handles SIGTERM) and the driver stops.
Runs share a persistent XLA compilation cache (config.cache_dir): the seeds of one cell compile once. A sweep
grid (config.learning_rates) plans each row's rates and then its seeds at the chosen rate (train/study/sweep.py);
running and collecting one run is train/study/collect.py.
"""

import dataclasses
import json
import os
import sys
import time

from absl import logging

from train.study import collect, sweep

REPO = collect.REPO
RUN_JSON = collect.RUN_JSON  # run.json of a collected run (train/study/collect.py)


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of the grid: `python -m train.<entry> --config <config> --workdir <runs_dir>/<run_id> <flags>`."""

    run_id: str
    task: str
    row: str
    structure: str
    seed: int
    entry: str
    config: str
    flags: tuple[str, ...]
    lr: float | None = None  # the swept learning rate (None: the task's own)


def row_flags(row: str) -> tuple[str, ...]:
    """--config flags of a structure row: "ctcm", or "ctcm-id" (the same structure started at T = I)."""
    if row.endswith("-id"):
        return (f"mtlora.structure={row[:-3]}", "mtlora.c_init=identity")
    return (f"mtlora.structure={row}",)


def rows(config, task: str) -> dict[str, tuple[str, ...]]:
    """Row name -> its --config flags for one task: each structure, the matched LoRA row, the NLG base row."""
    t = config.tasks[task]
    out = {s: row_flags(s) for s in config.structures}
    if config.matched_row:
        r = t.matched_rank
        out[f"lora-qv-r{r}"] = ("mtlora.structure=lora", "mtlora.targets_preset=lora-qv", f"mtlora.rank={r}")
    if t.base_row:
        out["base"] = ("mtlora.structure=lora", "num_train_steps=0")
    return out


def _run(config, task: str, row: str, flags_: tuple[str, ...], seed: int, lr: float | None = None) -> Run:
    """One run of `task`: the task's flags, then the row's, the rate's (a sweep) and the seed's (the last wins)."""
    t = config.tasks[task]
    fill = {"runs_dir": os.path.join(REPO, config.runs_dir), "row": row, "seed": seed,
            "nlg_data_dir": config.nlg_data_dir}  # fmt: skip
    rate = () if lr is None else (f"learning_rate={sweep.lr_text(lr)}",)
    merged = dict(f.format(**fill).split("=", 1) for f in (*t.flags, *flags_, *rate, f"seed={seed}"))
    run_flags = tuple(f"{k}={v}" for k, v in merged.items())  # one flag per key, the last value wins
    run_id = f"{task}-{row}-s{seed}" if lr is None else f"{task}-{row}-lr{sweep.lr_text(lr)}-s{seed}"
    return Run(run_id, task, row, merged["mtlora.structure"], seed, t.entry, t.config, run_flags, lr)


def best_rates(config, results_dir: str) -> dict[tuple[str, str], tuple[float | None, list[float]]]:
    """{(task, row): (best rate or None while undecided, the rates its sweep runs)} of a sweep grid, from the
    first-seed runs collected in `results_dir` (train/study/sweep.py:select)."""
    out = {}
    for task in config.tasks:
        key = config.select_prefix + config.tasks[task].metric
        for row, flags_ in rows(config, task).items():
            score_of = lambda lr, task=task, row=row, flags_=flags_, key=key: sweep.score(
                results_dir, _run(config, task, row, flags_, config.seeds[0], lr).run_id, key
            )
            out[(task, row)] = sweep.select(list(config.learning_rates), score_of, config.max_extra_rates)
    return out


def _sweep_plan(config, results_dir: str) -> tuple[list[Run], int]:
    """The runs of a learning-rate sweep grid known so far, task by task: each row's sweep runs (first seed, its
    rates and their edge extensions), then the other seeds at its best rate once that is final (`best_rates`).
    Also returns the number of cells whose best rate is not final yet (their other seeds are not planned)."""
    runs, chosen = [], best_rates(config, results_dir)
    first, others = config.seeds[0], config.seeds[1:]
    for task in config.tasks:
        for lr in sorted(config.learning_rates):  # rate-major: every row at 1e-3 before any row's next rate
            runs += [_run(config, task, row, flags_, first, lr) for row, flags_ in rows(config, task).items()]
        for row, flags_ in rows(config, task).items():
            best, rates = chosen[(task, row)]
            runs += [_run(config, task, row, flags_, first, lr) for lr in rates if lr not in config.learning_rates]
            runs += [] if best is None else [_run(config, task, row, flags_, s, best) for s in others]
    return runs, sum(best is None for best, _ in chosen.values())


def plan(config, results_dir: str | None = None) -> list[Run]:
    """Every run of the grid known so far. A grid without learning_rates: tasks x rows x seeds, seed-major (a
    part of the grid covers all tasks and rows of its seeds first). A sweep grid: `_sweep_plan`, which reads the
    collected summaries in `results_dir` (default config.results_dir) to place each row's best rate."""
    if config.get("learning_rates"):
        return _sweep_plan(config, results_dir or os.path.join(REPO, config.results_dir))[0]
    runs = []
    for seed in config.seeds:
        for task in config.tasks:
            for row, row_flags_ in rows(config, task).items():
                if row == "base" and seed != config.seeds[0]:
                    continue  # the untrained model's score does not depend on the seed
                runs.append(_run(config, task, row, row_flags_, seed))
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"config.tasks: duplicate run ids {sorted({i for i in ids if ids.count(i) > 1})}")
    return runs


def undecided(config, results_dir: str | None = None) -> int:
    """Cells of a sweep grid whose best rate waits for sweep runs (0 for a grid without learning_rates)."""
    if not config.get("learning_rates"):
        return 0
    return _sweep_plan(config, results_dir or os.path.join(REPO, config.results_dir))[1]


def command(run: Run, workdir: str) -> list[str]:
    """The entry's command line for `run` in `workdir`."""
    flags_ = [f"--config.{f}" for f in run.flags]
    return [sys.executable, "-m", f"train.{run.entry}", "--config", run.config, "--workdir", workdir, *flags_]


def is_done(run: Run, results_dir: str) -> bool:
    """Whether the run's summary is collected in results (then the driver skips it)."""
    return os.path.isfile(os.path.join(results_dir, run.run_id, "summary.json"))


def run_grid(
    config, *, commit_results: bool = False, max_hours: float = -1, only: str = "", runner=collect.execute, stop=None
):
    """Runs every planned run that is not collected yet, in plan order; returns {"done", "skipped", "failed", ...}.

    The plan is read again after every run: a sweep grid plans a row's extra rates and its other seeds once the runs
    that decide them are collected. A failed run is not retried within one call; a diverged one (a non-finite loss)
    is collected as diverged (`collect.collect`).

    Args:
      config: configs/study.py config.
      commit_results: commit each collected results folder (`collect.commit`).
      max_hours: start no new run after this many hours (<= 0: no limit).
      only: run only run ids containing this substring ("" = all).
      runner: `collect.execute`-like callable (cmd, env, log_path, stop) -> return code (tests substitute it).
      stop: callable -> bool; when it turns true the current run is asked to checkpoint and no new one starts.
    """
    stop = stop or (lambda: False)
    runs_dir, results_dir = (os.path.join(REPO, p) for p in (config.runs_dir, config.results_dir))
    os.makedirs(runs_dir, exist_ok=True)
    env = {**os.environ, **dict(e.split("=", 1) for e in config.env)}
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(REPO, config.cache_dir)
    todo = lambda: [r for r in plan(config, results_dir) if only in r.run_id]
    counts = {"done": [], "skipped": [r.run_id for r in todo() if is_done(r, results_dir)], "failed": [],
              "diverged": [], "not_started": []}  # fmt: skip
    t0 = time.monotonic()
    while True:
        left = [r for r in todo() if not is_done(r, results_dir) and r.run_id not in counts["failed"]]
        if not left:
            break
        run = left[0]
        if stop() or (max_hours > 0 and time.monotonic() - t0 > max_hours * 3600):
            counts["not_started"] += [r.run_id for r in left]
            break
        workdir = os.path.join(runs_dir, run.run_id)
        log_path = os.path.join(runs_dir, f"{run.run_id}.log")
        n_done = len(counts["done"]) + len(counts["skipped"]) + len(counts["diverged"])
        logging.info("[%d/%d] %s: %s", n_done + 1, n_done + len(left), run.run_id, " ".join(command(run, workdir)[2:]))
        start = time.monotonic()
        code = runner(command(run, workdir), env, log_path, stop)
        seconds = time.monotonic() - start
        info = {"command": command(run, os.path.relpath(workdir, REPO)), "driver_seconds": seconds}
        if stop() and code != 0:  # asked to stop: the entry checkpointed (exit 143); a rerun resumes it
            logging.warning("%s: stopped after %.0f s (exit code %s); rerun to resume", run.run_id, seconds, code)
            counts["not_started"] += [r.run_id for r in left]
            break
        error = collect.diverged(log_path) if code != 0 else None
        if error:
            folder = collect.collect(run, workdir, results_dir, info, diverged=error)
            logging.warning("%s: diverged after %.0f s (%s); collected as diverged", run.run_id, seconds, error)
            if commit_results:
                collect.commit(folder, f"study {config.grid}: {run.run_id} (diverged)")
            counts["diverged"].append(run.run_id)
            continue
        if code != 0 or not os.path.isfile(os.path.join(workdir, "summary.json")):
            logging.error("%s: exit code %s after %.0f s; log: %s (rerun to resume)", run.run_id, code, seconds,
                          log_path)  # fmt: skip
            counts["failed"].append(run.run_id)
            continue
        folder = collect.collect(run, workdir, results_dir, info)
        metric = json.load(open(os.path.join(folder, "summary.json")))["metrics"].get(config.tasks[run.task].metric)
        logging.info("%s: done in %.0f s, %s = %s", run.run_id, seconds, config.tasks[run.task].metric, metric)
        if commit_results:
            collect.commit(folder, f"study {config.grid}: {run.run_id} ({config.tasks[run.task].metric} {metric})")
        counts["done"].append(run.run_id)
    return counts

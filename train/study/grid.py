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
Runs share a persistent XLA compilation cache (config.cache_dir): the seeds of one cell compile once.
"""

import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from absl import logging

from train import analyze, run_log
from train.study import sweep

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Copied from a finished run's workdir into results/<run_id>/ (all small; never checkpoints).
COPIED = ("summary.json", "config.json", run_log.METRICS_FILE, analyze.ANALYSIS_JSON, analyze.ANALYSIS_NPZ)
RUN_JSON = "run.json"


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


def step_time(records: list[dict]) -> float | None:
    """Median seconds per train step from metrics.jsonl train records (steps_per_s over each log interval,
    evaluations and checkpoints excluded by the entries); the first interval (compiles) is dropped."""
    rates = [r["steps_per_s"] for r in records if r.get("kind") == "train" and r.get("steps_per_s", 0) > 0]
    rates = rates[1:] if len(rates) > 1 else rates
    return float(np.median(1.0 / np.asarray(rates))) if rates else None


def _machine() -> dict:
    cpu = platform.processor()
    if os.path.isfile("/proc/cpuinfo"):
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cpus": os.cpu_count(), "load_avg": list(os.getloadavg()), "platform": platform.platform()}


def _git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def collect(run: Run, workdir: str, results_dir: str, info: dict, diverged: str | None = None) -> str:
    """Analyzes the run's final adapters and copies its small outputs into `<results_dir>/<run_id>/`.

    The folder is written under a temporary name and renamed, so a summary.json in results means a complete folder.
    A diverged run (`diverged`: its error line) gets no analysis, and a summary.json written here, not by the entry:
    {"diverged": error, "metrics": {}}; its metrics.jsonl (the curve up to the divergence) is kept.

    Returns:
      The results folder.
    """
    has_checkpoint = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
        n.isdigit() for n in os.listdir(os.path.join(workdir, "checkpoints"))
    )
    if has_checkpoint and not diverged:  # a 0-step (base) run has no adapters to analyze
        analyze.analyze(workdir)
    out = os.path.join(results_dir, run.run_id)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in COPIED:
        if os.path.isfile(os.path.join(workdir, name)) and not (diverged and name == "summary.json"):
            shutil.copy(os.path.join(workdir, name), os.path.join(tmp, name))
    if diverged:
        with open(os.path.join(tmp, "summary.json"), "w") as f:
            json.dump({"diverged": diverged, "metrics": {}}, f, indent=1)
    record = {
        **dataclasses.asdict(run),
        "command": command(run, os.path.relpath(workdir, REPO)),
        "step_time_s": step_time(run_log.read_metrics(workdir)) if os.path.isdir(workdir) else None,
        "finished_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": _git_commit(),
        "machine": _machine(),
        **info,
    }
    with open(os.path.join(tmp, RUN_JSON), "w") as f:
        json.dump(record, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def commit(folder: str, message: str, tries: int = 12) -> bool:
    """`git add <folder> && git commit -m <message> -- <folder>`, retrying while another commit holds the index."""
    rel = os.path.relpath(folder, REPO)
    for _ in range(tries):
        if not os.path.exists(os.path.join(REPO, ".git", "index.lock")):
            add = subprocess.run(["git", "add", rel], cwd=REPO, capture_output=True, text=True)
            done = (
                add.returncode == 0
                and not subprocess.run(
                    ["git", "commit", "-q", "-m", message, "--", rel], cwd=REPO, capture_output=True, text=True
                ).returncode
            )
            if done:
                return True
        time.sleep(5)
    logging.warning("could not commit %s (git index busy or commit failed); commit it by hand", rel)
    return False


def execute(cmd: list[str], env: dict, log_path: str, stop) -> int:
    """Runs `cmd` with stdout/stderr appended to `log_path`; forwards SIGTERM when `stop` is set. Returns its code."""
    with open(log_path, "a") as log:
        log.write(f"\n=== {datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H:%M:%SZ} {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        sent = False
        while proc.poll() is None:
            if stop() and not sent:
                proc.send_signal(signal.SIGTERM)  # the entry checkpoints and exits with 143
                sent = True
            time.sleep(1.0)
        return proc.returncode


def diverged(log_path: str) -> str | None:
    """The non-finite-loss error of the last attempt in a run's log (train/loop.py:check_finite), else None."""
    if not os.path.isfile(log_path):
        return None
    last = open(log_path, errors="replace").read().rsplit("\n=== ", 1)[-1]
    lines = [ln for ln in last.splitlines() if ln.startswith("FloatingPointError:")]
    return lines[-1] if lines else None


def run_grid(config, *, commit_results: bool = False, max_hours: float = -1, only: str = "", runner=execute, stop=None):
    """Runs every planned run that is not collected yet, in plan order; returns {"done", "skipped", "failed", ...}.

    The plan is read again after every run: a sweep grid plans a row's extra rates and its other seeds once the runs
    that decide them are collected. A failed run is not retried within one call; a diverged one (a non-finite loss)
    is collected as diverged (`collect`).

    Args:
      config: configs/study.py config.
      commit_results: commit each collected results folder (`commit`).
      max_hours: start no new run after this many hours (<= 0: no limit).
      only: run only run ids containing this substring ("" = all).
      runner: `execute`-like callable (cmd, env, log_path, stop) -> return code (tests substitute it).
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
        if stop() and code != 0:  # asked to stop: the entry checkpointed (exit 143); a rerun resumes it
            logging.warning("%s: stopped after %.0f s (exit code %s); rerun to resume", run.run_id, seconds, code)
            counts["not_started"] += [r.run_id for r in left]
            break
        error = diverged(log_path) if code != 0 else None
        if error:
            folder = collect(run, workdir, results_dir, {"driver_seconds": seconds}, diverged=error)
            logging.warning("%s: diverged after %.0f s (%s); collected as diverged", run.run_id, seconds, error)
            if commit_results:
                commit(folder, f"study {config.grid}: {run.run_id} (diverged)")
            counts["diverged"].append(run.run_id)
            continue
        if code != 0 or not os.path.isfile(os.path.join(workdir, "summary.json")):
            logging.error("%s: exit code %s after %.0f s; log: %s (rerun to resume)", run.run_id, code, seconds,
                          log_path)  # fmt: skip
            counts["failed"].append(run.run_id)
            continue
        folder = collect(run, workdir, results_dir, {"driver_seconds": seconds})
        metric = json.load(open(os.path.join(folder, "summary.json")))["metrics"].get(config.tasks[run.task].metric)
        logging.info("%s: done in %.0f s, %s = %s", run.run_id, seconds, config.tasks[run.task].metric, metric)
        if commit_results:
            commit(folder, f"study {config.grid}: {run.run_id} ({config.tasks[run.task].metric} {metric})")
        counts["done"].append(run.run_id)
    return counts

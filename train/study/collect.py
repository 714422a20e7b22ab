"""One run of a study grid: running its entry, and collecting what it left into results/<run_id>/.

`execute` runs the entry's command with its output appended to the run's log; `diverged` reads a non-finite-loss
stop from that log; `collect` analyzes the final adapters and writes the run's small outputs and run.json (what
ran, where, when, the median step time) into the results folder atomically; `commit` commits that folder alone.
"""

import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import time

import numpy as np
from absl import logging

from train import analyze, run_log

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Copied from a finished run's workdir into results/<run_id>/ (all small; never checkpoints).
COPIED = ("summary.json", "config.json", run_log.METRICS_FILE, analyze.ANALYSIS_JSON, analyze.ANALYSIS_NPZ)
RUN_JSON = "run.json"


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


def collect(run, workdir: str, results_dir: str, info: dict, diverged: str | None = None) -> str:
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

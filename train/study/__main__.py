"""The structure study driver: `python -m train.study --config configs/study.py [--dry_run | --commit ...]`.

See train/study/grid.py for what a grid is and how a part of it resumes; `python -m train.study.report` renders
docs/RESULTS.md from the collected results.
"""

import json
import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from train.study import grid

_CONFIG = config_flags.DEFINE_config_file("config", "configs/study.py", "Study config, e.g. configs/study.py:offline.")
_COMMIT = flags.DEFINE_bool("commit", False, "git-commit each collected results/<grid>/<run_id> folder (only it).")
_MAX_HOURS = flags.DEFINE_float("max_hours", -1, "Start no new run after this many hours (<= 0: no limit).")
_ONLY = flags.DEFINE_string("only", "", "Run only the run ids containing this substring, e.g. 'cola-' or '-s0'.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the plan (done / to do) and exit.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    config = _CONFIG.value
    if _DRY_RUN.value:
        results_dir = os.path.join(grid.REPO, config.results_dir)
        runs = [r for r in grid.plan(config) if _ONLY.value in r.run_id]
        for r in runs:
            print(f"{'done' if grid.is_done(r, results_dir) else 'todo'}  {r.run_id}  {' '.join(r.flags)}")
        print(f"{sum(grid.is_done(r, results_dir) for r in runs)} of {len(runs)} runs done")
        return
    requested = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: requested.append(signum))
    counts = grid.run_grid(config, commit_results=_COMMIT.value, max_hours=_MAX_HOURS.value, only=_ONLY.value,
                           stop=lambda: bool(requested))  # fmt: skip
    logging.info("study %s: %s", config.grid, json.dumps({k: len(v) for k, v in counts.items()}))
    if counts["failed"]:
        logging.error("failed runs (rerun the same command to resume them): %s", ", ".join(counts["failed"]))
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)

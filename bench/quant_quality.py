"""Quality over a quantized base: the structure study's offline SST-2 (MiniLM) and WebNLG (SmolLM2) runs with the
frozen base in float32, int8 and NF4 (`--config.base_quant`), same seed and everything else as the study
(configs/study.py, structure shim), one `python -m train.<entry>` subprocess each, settings alternated. Prints
the task metric (SST-2 dev accuracy, WebNLG test BLEU on 100 inputs) and the wall time of each run.

    python -m bench.quant_quality --tasks sst2,webnlg --workdir /tmp/quant_quality
"""

import argparse
import json
import os
import subprocess
import sys
import time

from configs import study

SETTINGS = ("none", "int8", "nf4")


def command(task, setting: str, workdir: str, seed: int) -> list[str]:
    fill = {"runs_dir": os.path.dirname(workdir), "row": "shim", "seed": seed}
    flags = [f"--config.{f.format(**fill)}" for f in task.flags]
    return [sys.executable, "-m", f"train.{task.entry}", "--config", task.config, "--workdir", workdir, *flags,
            "--config.mtlora.structure=shim", f"--config.seed={seed}", f"--config.base_quant={setting}"]  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,webnlg", help="tasks of configs/study.py (offline grid)")
    parser.add_argument("--workdir", default="/tmp/quant_quality", help="one sub-folder per run (resumable)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    grid = study.get_config()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    os.makedirs(args.workdir, exist_ok=True)
    for name in args.tasks.split(","):
        task = grid.tasks[name]
        for setting in SETTINGS:
            workdir = os.path.join(args.workdir, f"{name}-{setting}-s{args.seed}")
            summary = os.path.join(workdir, "summary.json")
            t = time.perf_counter()
            if not os.path.isfile(summary):
                with open(workdir + ".log", "a") as log:
                    subprocess.run(command(task, setting, workdir, args.seed), env=env, stdout=log,
                                   stderr=subprocess.STDOUT, check=True)  # fmt: skip
            with open(summary) as f:
                s = json.load(f)
            score = task.scale * s["metrics"][task.metric]
            print(f"{name} base {setting:<5} {task.metric} {score:.2f}  run {s['wall_time_s']:.0f} s "
                  f"({time.perf_counter() - t:.0f} s here)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

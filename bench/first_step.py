"""Time to the first training step of README's main job, with a cold and a warm persistent compilation cache.

Starts `python -m train.glue --config configs/sst2.py:minilm` (logging every step) in a fresh workdir, reads its
log until step 1 is reported, stops it (SIGTERM: it checkpoints and exits 143), and records the seconds since
the process started: imports, data, model load, the compiles of the first bucket's step, one step. Cold runs
get a new empty cache folder (--config.compilation_cache_dir); each is followed by a warm run on that cache.
Cold and warm alternate, so the machine's load hits both alike.

    python -m bench.first_step --repeats 2
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def time_to_first_step(cache: str, workdir: str, extra: list[str]) -> float:
    """Seconds from the process start to its "step 1/" log line."""
    cmd = [sys.executable, "-m", "train.glue", "--config", "configs/sst2.py:minilm", f"--workdir={workdir}",
           "--config.log_every_steps=1", f"--config.compilation_cache_dir={cache}", *extra]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seconds = None
    for line in proc.stderr:
        if "step 1/" in line and "loss" in line:
            seconds = time.perf_counter() - t0
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=300)
    if seconds is None:
        raise RuntimeError(f"no step 1 in the log of {' '.join(cmd)} (exit {proc.returncode})")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="cold + warm pairs")
    parser.add_argument("extra", nargs="*", help="more --config.<key>=<value> flags for the run")
    args = parser.parse_args()
    cold, warm = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            cache = os.path.join(tmp, f"cache{i}")
            cold.append(time_to_first_step(cache, os.path.join(tmp, f"cold{i}"), args.extra))
            warm.append(time_to_first_step(cache, os.path.join(tmp, f"warm{i}"), args.extra))
            print(f"pair {i}: cold {cold[-1]:.1f} s, warm {warm[-1]:.1f} s", flush=True)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"time to the first step, median of {args.repeats}: cold {c:.1f} s (range {min(cold):.1f}-{max(cold):.1f}), "
          f"warm {w:.1f} s (range {min(warm):.1f}-{max(warm):.1f}), warm / cold {w / c:.2f}")


if __name__ == "__main__":
    main()

"""What a run reports while it trains: metrics to JSONL and TensorBoard, a progress bar, and a SIGTERM flag.

`<workdir>/metrics.jsonl` holds one JSON object per line, {"step": s, "kind": "train" | "eval", name: value,
...}; `<workdir>/tb` the same scalars as TensorBoard events ("train/loss", "eval/accuracy", ...). A resumed
run first drops the records after its restored step (the killed run may have logged steps it never saved),
so the file reads like one uninterrupted run.
"""

import contextlib
import json
import math
import os
import signal
import threading
import time

import tqdm
from absl import logging

from train import mesh as mesh_lib

METRICS_FILE = "metrics.jsonl"


def join_run(config) -> bool:
    """Joins a multi-process job if there is one (config.distributed); returns whether this is process 0 (the one
    that logs at INFO, holds the workdir lock and writes metrics and summaries)."""
    mesh_lib.initialize_distributed(config.distributed)
    main_process = mesh_lib.is_main_process()
    if not main_process:
        logging.set_verbosity(logging.WARNING)  # logs from process 0 only
    return main_process


def read_metrics(workdir: str) -> list[dict]:
    """The records of `<workdir>/metrics.jsonl` ([] when absent)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
    """Appends scalars to `<workdir>/metrics.jsonl` and TensorBoard `<workdir>/tb`."""

    def __init__(self, workdir: str, start_step: int = 0, active: bool = True):
        """Opens the writers; records with step > `start_step` from an earlier (killed) run are dropped.

        active=False (every process but process 0 of a multi-host run): writes nothing."""
        import tensorboardX

        self.active = active
        if not active:
            return
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        kept = [r for r in read_metrics(workdir) if r["step"] <= start_step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.tb = tensorboardX.SummaryWriter(
            os.path.join(workdir, "tb"), purge_step=start_step + 1 if start_step else None
        )

    def write(self, step: int, kind: str, scalars: dict) -> None:
        """One record: `kind` is "train" or "eval"; scalars are name -> number."""
        if not self.active:
            return
        values = {k: float(v) for k, v in scalars.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "kind": kind, **values}) + "\n")
        for k, v in values.items():
            self.tb.add_scalar(f"{kind}/{k}", v, int(step))
        self.tb.flush()

    def close(self) -> None:
        if self.active:
            self.tb.close()


class Progress:
    """A tqdm bar over steps with loss, learning rate, examples/s and ETA (tqdm's); also the rates to log."""

    def __init__(self, total: int, start: int, batch_size: int, active: bool = True):
        """active=False (every process but process 0): the bar is not drawn, the rates are still computed."""
        self.total, self.batch_size = total, batch_size
        self.bar = tqdm.tqdm(
            total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0, disable=not active
        )
        self.mark_step, self.mark_time = start, time.perf_counter()

    def update(self, step: int, metrics: dict | None = None) -> dict:
        """Advances the bar to `step` (steps done); with metrics, shows them and returns the rates since the last call.

        Returns:
          {} without metrics; else {"examples_per_s", "steps_per_s", "eta_s"}.
        """
        self.bar.update(step - self.bar.n)
        if metrics is None:
            return {}
        now = time.perf_counter()
        steps_per_s = (step - self.mark_step) / max(now - self.mark_time, 1e-9)
        self.mark_step, self.mark_time = step, now
        rates = {
            "examples_per_s": steps_per_s * self.batch_size,
            "steps_per_s": steps_per_s,
            "eta_s": (self.total - step) / steps_per_s if steps_per_s > 0 else math.inf,
        }
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}", ex_s=f"{rates['examples_per_s']:.1f}"
        )
        return rates

    def restart_clock(self, step: int) -> None:
        """Measures the next rates from now (call after an evaluation or a checkpoint, which are not training)."""
        self.mark_step, self.mark_time = step, time.perf_counter()

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def sigterm_flag():
    """Yields an Event set when the process gets SIGTERM (the loop checkpoints and stops); restores the old handler.

    Outside the main thread (where Python cannot install handlers) the event is never set.
    """
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)

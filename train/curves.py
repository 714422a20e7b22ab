"""Draws a run's curves: train loss (and learning rate) and dev metrics against the step, to <workdir>/curves.png.

  python -m train.curves workdirs/rte-minilm [more workdirs ...]

Reads <workdir>/metrics.jsonl (written by train.glue / train.nlg, see train/run_log.py); works on a run
that is still going.
"""

import os
import sys

import numpy as np

from train import run_log

# Keys of a train record that are not curves to draw.
_NOT_METRICS = {"step", "kind", "epoch", "eval_time_s"}


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` points (shorter at the start)."""
    c = np.cumsum(np.insert(values, 0, 0.0))
    n = np.arange(1, len(values) + 1)
    lo = np.maximum(n - window, 0)
    return (c[n] - c[lo]) / (n - lo)


def plot(workdir: str, filename: str = "curves.png") -> str:
    """Writes the curves of one run; returns the PNG path.

    Raises:
      FileNotFoundError: the workdir has no metrics.jsonl records.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = run_log.read_metrics(workdir)
    if not records:
        raise FileNotFoundError(f"no records in {os.path.join(workdir, run_log.METRICS_FILE)}")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))

    steps = np.array([r["step"] for r in train])
    loss = np.array([r["loss"] for r in train])
    ax_loss.plot(steps, loss, color="tab:blue", alpha=0.3, label="train loss")
    ax_loss.plot(steps, _smooth(loss, max(1, len(loss) // 20)), color="tab:blue", label="train loss (smoothed)")
    ax_loss.set(xlabel="step", ylabel="loss", title=os.path.basename(os.path.abspath(workdir)))
    handles = ax_loss.get_lines()
    if train and "learning_rate" in train[0]:
        ax_lr = ax_loss.twinx()
        ax_lr.plot(steps, [r["learning_rate"] for r in train], color="tab:gray", linestyle=":", label="learning rate")
        ax_lr.set_ylabel("learning rate")
        handles = [*handles, *ax_lr.get_lines()]
    ax_loss.legend(handles=handles, loc="best", fontsize="small")

    names = sorted({k for r in evals for k in r} - _NOT_METRICS)
    for name in names:
        points = [(r["step"], r[name]) for r in evals if name in r]
        ax_eval.plot(*zip(*points, strict=True), marker="o", label=name)
    ax_eval.set(xlabel="step", ylabel="dev metric", title="dev metrics")
    if names:
        ax_eval.legend()
    ax_eval.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(workdir, filename)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        raise SystemExit(__doc__)
    for workdir in argv[1:]:
        print(plot(workdir))


if __name__ == "__main__":
    main(sys.argv)

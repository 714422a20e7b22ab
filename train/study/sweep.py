"""The learning-rate sweep of a study grid (configs/study.py:round2): which rates a row runs, and its best rate.

A cell (task, row) first runs every rate of `config.learning_rates` with the first seed. Its best rate is the one
with the highest `config.select_prefix + metric` (the held-out part of train, never the dev set) in the
collected summaries; a diverged run scores -inf, and a tie goes to the smaller rate. When the best rate is the
smallest or largest one tried, the next rate of LADDER beyond it is tried as well (at most
`config.max_extra_rates` times per cell), so a best rate on the edge of the sweep is not taken for the optimum.
Once the best rate is final, the other seeds run at it; the first seed's run at that rate is reused.
"""

import json
import math
import os
from collections.abc import Callable

# Rates 3x (alternately 10/3x) apart: the sweep's own rates and the ones an edge extension may add.
LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
DIVERGED = -math.inf  # the score of a run that stopped on a non-finite loss or gradient


def lr_text(lr: float) -> str:
    """The rate as run ids and flags spell it: 3e-4, 1e-3."""
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def beyond(lr: float, rates: list[float]) -> float | None:
    """The LADDER rate next to `lr` outward from `rates` when `lr` is their smallest or largest, else None."""
    if lr not in LADDER:
        raise ValueError(f"config.learning_rates: {lr} is not on the sweep ladder {', '.join(map(lr_text, LADDER))}")
    i = LADDER.index(lr)
    if lr == max(rates) and i + 1 < len(LADDER):
        return LADDER[i + 1]
    if lr == min(rates) and i > 0:
        return LADDER[i - 1]
    return None


def select(rates: list[float], score_of: Callable[[float], float | None], max_extra: int) -> tuple[float | None, list]:
    """The cell's best rate (None while a needed run is missing) and every rate its sweep runs.

    Args:
      rates: the configured rates (config.learning_rates).
      score_of: lr -> held-out score of the first-seed run (DIVERGED for a diverged run), None when not collected.
      max_extra: rates beyond the configured ones this cell may add (one per edge step).
    """
    rates = sorted(rates)
    for extra in range(max_extra + 1):
        scores = {lr: score_of(lr) for lr in rates}
        if any(s is None for s in scores.values()):
            return None, rates
        best = max(rates, key=lambda lr: (scores[lr], -lr))
        step = beyond(best, rates)
        if step is None or extra == max_extra:
            return best, rates
        rates = sorted([*rates, step])
    raise AssertionError("unreachable")


def score(results_dir: str, run_id: str, key: str) -> float | None:
    """The selection score of a collected run: summary metrics[key], DIVERGED, or None when not collected."""
    path = os.path.join(results_dir, run_id, "summary.json")
    if not os.path.isfile(path):
        return None
    summary = json.load(open(path))
    if summary.get("diverged"):
        return DIVERGED
    if key not in summary["metrics"]:
        have = ", ".join(sorted(summary["metrics"]))
        raise ValueError(f"{path}: no metric {key!r} to select the learning rate on (it has {have})")
    return float(summary["metrics"][key])

"""The held-out part of a training split (`config.holdout_examples`, `config.holdout_seed`; configs/base.py).

A job (GLUE, NLG) keeps k of its n training candidates out of training and scores them at every evaluation, with
the metric names of its eval split prefixed by `heldout_` (`heldout_accuracy`, `heldout_bleu`), so that a
learning-rate sweep can choose its rate on held-out training data instead of the dev set. The choice is
`np.random.default_rng(holdout_seed).permutation(n)[:k]`, sorted: it depends on n, k and holdout_seed only, not
on `config.seed`, so runs with different seeds hold out the same candidates.
"""

import numpy as np

PREFIX = "heldout_"


def choose(n: int, k: int, seed: int, what: str) -> np.ndarray:
    """The indices of the held-out candidates.

    Args:
      n: the number of candidates (GLUE: train examples; NLG: distinct train inputs).
      k: config.holdout_examples (0: none held out).
      seed: config.holdout_seed.
      what: the candidates in words, for the error, e.g. "sst2 train examples (max_train_examples=-1)".

    Returns:
      [k] int64 sorted distinct indices in [0, n).

    Raises:
      ValueError: k < 0 or k >= n (nothing would be left to train on), naming config.holdout_examples.
    """
    if not 0 <= k < n:
        raise ValueError(f"config.holdout_examples={k}: expected >= 0 and fewer than the {n} {what}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:k]).astype(np.int64)


def prefixed(metrics: dict) -> dict:
    """{"heldout_" + name: value} of a split's metrics (or of its unavailable metrics and why)."""
    return {PREFIX + name: value for name, value in metrics.items()}

"""GLUE dev metrics on the host: accuracy, F1, Matthews correlation, Pearson and Spearman (scikit-learn, scipy).

Every metric takes numpy predictions and labels of shape [n] plus optional `weights` [n]; rows with weight 0
(the padding rows of `train.glue.pipeline.eval_batches`) are left out, the others count once. Scores are
fractions (0.951, not 95.1). Per task (`train.glue.tasks`): CoLA mcc (+ accuracy), SST-2 / QNLI / RTE
accuracy, MRPC / QQP accuracy and F1 (positive class 1 = equivalent / duplicate), STS-B Pearson and Spearman,
MNLI accuracy on dev_matched and dev_mismatched, reported as accuracy_m and accuracy_mm.
Degenerate inputs follow scikit-learn's MCC convention: a correlation of a constant vector is 0.0, not NaN.
"""

import warnings
from collections.abc import Callable, Mapping

import numpy as np
import scipy.stats
import sklearn.metrics

from train.glue import tasks as glue_tasks


def _select(predictions, labels, weights) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must both be [n]")
    if weights is not None:
        keep = np.asarray(weights).reshape(-1) > 0
        predictions, labels = predictions[keep], labels[keep]
    if predictions.size == 0:
        raise ValueError("no examples to score (all weights are 0)")
    return predictions, labels


def accuracy(predictions, labels, weights=None) -> float:
    """Fraction of predictions equal to labels; predictions, labels: [n] class ids."""
    p, y = _select(predictions, labels, weights)
    return float(sklearn.metrics.accuracy_score(y, p))


def f1(predictions, labels, weights=None) -> float:
    """Binary F1 of the positive class 1; predictions, labels: [n] in {0, 1}."""
    p, y = _select(predictions, labels, weights)
    return float(sklearn.metrics.f1_score(y, p, pos_label=1, average="binary", zero_division=0.0))


def mcc(predictions, labels, weights=None) -> float:
    """Matthews correlation coefficient (CoLA); predictions, labels: [n] class ids."""
    p, y = _select(predictions, labels, weights)
    return float(sklearn.metrics.matthews_corrcoef(y, p))


def _correlation(fn, predictions, labels, weights) -> float:
    p, y = _select(predictions, labels, weights)
    p, y = p.astype(np.float64), y.astype(np.float64)
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(y) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(p, y)[0])


def pearson(predictions, labels, weights=None) -> float:
    """Pearson correlation (STS-B); predictions, labels: [n] floats."""
    return _correlation(scipy.stats.pearsonr, predictions, labels, weights)


def spearman(predictions, labels, weights=None) -> float:
    """Spearman rank correlation (STS-B); predictions, labels: [n] floats."""
    return _correlation(scipy.stats.spearmanr, predictions, labels, weights)


METRICS: Mapping[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "mcc": mcc,
    "pearson": pearson,
    "spearman": spearman,
}


def predictions_from_logits(task: str, logits) -> np.ndarray:
    """Head outputs -> predictions [n]: argmax of logits [n, classes]; for STS-B the score from [n, 1] or [n]."""
    spec, logits = glue_tasks.get_task(task), np.asarray(logits)
    if spec.is_regression:
        if logits.ndim == 2 and logits.shape[1] == 1:
            logits = logits[:, 0]
        if logits.ndim != 1:
            raise ValueError(f"stsb: expected scores [n] or [n, 1], got {logits.shape}")
        return logits.astype(np.float32)
    if logits.ndim != 2 or logits.shape[1] != spec.num_labels:
        raise ValueError(f"{task}: expected logits [n, {spec.num_labels}], got {logits.shape}")
    return logits.argmax(axis=-1).astype(np.int32)


def compute_metrics(task: str, logits, labels, weights=None, suffix: str = "") -> dict[str, float]:
    """The task's metrics on one split.

    Args:
      task: GLUE task name.
      logits: [n, num_labels] (classification) or [n] / [n, 1] (STS-B).
      labels: [n] class ids or scores.
      weights: optional [n]; rows with weight 0 are ignored.
      suffix: appended to every metric name (MNLI: "_m", "_mm").

    Returns:
      {metric name + suffix: value}, e.g. {"accuracy": 0.9, "f1": 0.92} for MRPC.
    """
    spec = glue_tasks.get_task(task)
    p = predictions_from_logits(task, logits)
    return {name + suffix: METRICS[name](p, labels, weights) for name in spec.metric_names}


def dev_metrics(task: str, outputs: Mapping[str, tuple]) -> dict[str, float]:
    """Metrics over all dev splits of `task`, named with each split's suffix.

    Args:
      task: GLUE task name.
      outputs: dev split name -> (logits, labels, weights) gathered over all its eval batches, covering
        exactly the splits of `glue_tasks.get_task(task).dev_splits` ("dev"; MNLI "dev_matched" and
        "dev_mismatched").

    Returns:
      e.g. {"mcc": ..., "accuracy": ...} for CoLA, {"accuracy_m": ..., "accuracy_mm": ...} for MNLI.
    """
    spec = glue_tasks.get_task(task)
    if set(outputs) != set(spec.dev_splits):
        raise ValueError(f"{task}: expected outputs for dev splits {sorted(spec.dev_splits)}, got {sorted(outputs)}")
    result = {}
    for split, suffix in spec.dev_splits.items():
        result.update(compute_metrics(task, *outputs[split], suffix=suffix))
    return result


def main_metric(task: str) -> str:
    """Name of the metric that picks the best evaluation (higher is better): e.g. "mcc", "accuracy_m"."""
    return glue_tasks.get_task(task).main_metric

"""GLUE metrics against independent numpy formulas (confusion counts, np.corrcoef, hand-made average ranks)."""

import numpy as np
import pytest

from train.glue import metrics


def _counts(p, y):
    tp = np.sum((p == 1) & (y == 1))
    tn = np.sum((p == 0) & (y == 0))
    fp = np.sum((p == 1) & (y == 0))
    fn = np.sum((p == 0) & (y == 1))
    return tp, tn, fp, fn


def _average_ranks(x):
    """1-based ranks, ties sharing the mean of their positions."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


@pytest.fixture
def binary():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.where(rng.random(200) < 0.8, y, 1 - y)
    return p, y


def test_accuracy_f1_mcc_match_confusion_count_formulas(binary):
    p, y = binary
    tp, tn, fp, fn = _counts(p, y)
    assert metrics.accuracy(p, y) == pytest.approx((tp + tn) / len(y))
    assert metrics.f1(p, y) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert metrics.mcc(p, y) == pytest.approx(mcc)


def test_pearson_spearman_match_numpy():
    rng = np.random.default_rng(1)
    y = np.round(rng.uniform(0, 5, 300), 1)  # rounded: many ties, as in STS-B
    p = np.round(y + rng.normal(0, 1, 300), 1)
    assert metrics.pearson(p, y) == pytest.approx(np.corrcoef(p, y)[0, 1], rel=1e-9)
    rho = np.corrcoef(_average_ranks(p), _average_ranks(y))[0, 1]
    assert metrics.spearman(p, y) == pytest.approx(rho, rel=1e-9)


def test_weights_drop_padding_rows(binary):
    """Rows with weight 0 (padded eval rows, here garbage) do not count."""
    p, y = binary
    w = np.ones(len(y) + 5, np.float32)
    w[-5:] = 0
    p_pad, y_pad = np.concatenate([p, np.ones(5, int)]), np.concatenate([y, np.zeros(5, int)])
    for name in ("accuracy", "f1", "mcc"):
        assert metrics.METRICS[name](p_pad, y_pad, w) == metrics.METRICS[name](p, y)
    assert metrics.pearson(p_pad * 1.0, y_pad * 1.0, w) == pytest.approx(metrics.pearson(p * 1.0, y * 1.0))
    with pytest.raises(ValueError, match="all weights are 0"):
        metrics.accuracy(p, y, np.zeros(len(y)))


def test_degenerate_correlations_are_zero():
    assert metrics.pearson(np.full(4, 2.0), np.arange(4.0)) == 0.0
    assert metrics.spearman(np.arange(4.0), np.ones(4)) == 0.0
    assert metrics.mcc(np.ones(4, int), np.array([0, 1, 0, 1])) == 0.0


def test_compute_metrics_per_task():
    y = np.array([0, 1, 1, 0, 1])
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [3.0, -1.0], [0.0, 2.0]])  # predicts 0 1 0 0 1
    assert metrics.compute_metrics("mrpc", logits, y) == pytest.approx({"accuracy": 0.8, "f1": 0.8})
    cola = metrics.compute_metrics("cola", logits, y)
    assert set(cola) == {"mcc", "accuracy"}
    scores = np.array([[0.5], [2.0], [3.5], [4.0]])
    stsb = metrics.compute_metrics("stsb", scores, np.array([1.0, 2.0, 3.0, 5.0]))
    assert set(stsb) == {"pearson", "spearman"} and stsb["spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"mnli: expected logits \[n, 3\], got \(5, 2\)"):
        metrics.compute_metrics("mnli", logits, y)


def test_dev_metrics_mnli_matched_and_mismatched():
    one_hot = lambda c: np.eye(3)[c]
    matched = (one_hot([0, 1, 2, 2]), np.array([0, 1, 2, 0]), None)  # 3 / 4
    mismatched = (one_hot([1, 1, 0]), np.array([1, 1, 0]), np.ones(3))  # 3 / 3
    out = metrics.dev_metrics("mnli", {"dev_matched": matched, "dev_mismatched": mismatched})
    assert out == pytest.approx({"accuracy_m": 0.75, "accuracy_mm": 1.0})
    assert metrics.main_metric("mnli") == "accuracy_m" and metrics.main_metric("cola") == "mcc"
    with pytest.raises(ValueError, match=r"expected outputs for dev splits \['dev_matched', 'dev_mismatched'\]"):
        metrics.dev_metrics("mnli", {"dev": matched})


def test_predictions_from_logits_shapes():
    np.testing.assert_array_equal(metrics.predictions_from_logits("rte", np.array([[0.1, 0.9], [2.0, 1.0]])), [1, 0])
    np.testing.assert_array_equal(metrics.predictions_from_logits("stsb", np.array([1.5, 2.5])), [1.5, 2.5])
    with pytest.raises(ValueError, match=r"stsb: expected scores"):
        metrics.predictions_from_logits("stsb", np.zeros((2, 2)))

"""Evaluation report, bootstrap intervals and the PNG figures."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from moderation_worker.tools.evaluation import (
    _f1_from_counts,
    bootstrap_ci,
    downsample_indices,
    evaluate,
    write_report,
)
from moderation_worker.tools.plots import (
    plot_confusion,
    plot_learning_curve,
    plot_roc,
    plot_score_histogram,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scores(n: int, seed: int, signal: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    p = np.clip(signal * y + (1 - signal) * rng.random(n), 0.0, 1.0)
    return y, p


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_matches_sklearn_on_random_data(seed: int) -> None:
    y, p = _scores(500, seed)
    threshold = 0.45
    report = evaluate(y, p, threshold)
    y_pred = (p >= threshold).astype(int)
    assert report["n"] == 500 and report["positives"] == int(y.sum())
    assert report["threshold"] == threshold
    assert report["f1"] == pytest.approx(f1_score(y, y_pred))
    assert report["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert report["precision"] == pytest.approx(precision_score(y, y_pred))
    assert report["recall"] == pytest.approx(recall_score(y, y_pred))
    assert report["accuracy"] == pytest.approx(accuracy_score(y, y_pred))
    per_label = recall_score(y, y_pred, average=None, labels=[0, 1])
    assert report["per_label_accuracy"] == pytest.approx(
        {"not hateful": per_label[0], "hateful": per_label[1]}
    )
    assert report["confusion_matrix"]["matrix"] == confusion_matrix(y, y_pred).tolist()
    assert report["confusion_matrix"]["labels"] == ["not hateful", "hateful"]


def test_evaluate_report_is_json_ready_with_a_short_roc_curve(tmp_path) -> None:
    y, p = _scores(5000, 3, signal=0.1)
    report = evaluate(y, p, 0.5, labels=("ok", "hate"), max_curve_points=50)
    curve = report["roc_curve"]
    assert 2 <= len(curve["fpr"]) <= 50
    assert len(curve["fpr"]) == len(curve["tpr"]) == len(curve["thresholds"])
    assert (curve["fpr"][0], curve["tpr"][0]) == (0.0, 0.0)
    assert (curve["fpr"][-1], curve["tpr"][-1]) == (1.0, 1.0)
    assert curve["thresholds"][0] is None  # roc_curve's inf, not written as Infinity
    assert set(report["per_label_accuracy"]) == {"ok", "hate"}
    path = write_report(tmp_path / "out" / "report.json", report)
    text = path.read_text("utf-8")
    assert "\n  " in text  # indented
    assert orjson.loads(text) == report


def test_evaluate_with_one_class_reports_auc_as_none() -> None:
    report = evaluate([0, 0, 0], [0.1, 0.7, 0.2], 0.5)
    assert report["roc_auc"] is None and report["roc_curve"] is None
    assert report["per_label_accuracy"] == {"not hateful": pytest.approx(2 / 3), "hateful": None}
    assert report["f1"] == 0.0


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan"), True])
def test_evaluate_rejects_thresholds_outside_unit_interval(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        evaluate([0, 1], [0.2, 0.8], threshold)


def test_evaluate_rejects_nan_scores() -> None:
    with pytest.raises(ValueError, match="NaN"):
        evaluate([0, 1], [0.2, float("nan")], 0.5)


def test_downsample_keeps_the_ends() -> None:
    idx = downsample_indices(1000, 10)
    assert idx[0] == 0 and idx[-1] == 999 and len(idx) == 10
    assert list(downsample_indices(5, 10)) == [0, 1, 2, 3, 4]


def test_fast_bootstrap_f1_equals_sklearn() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        y, pred = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
        assert _f1_from_counts(y, pred) == pytest.approx(f1_score(y, pred, zero_division=0.0))
    assert _f1_from_counts(np.array([0, 1]), np.array([0, 0])) == 0.0


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_data() -> None:
    y_small, p_small = _scores(100, 7)
    y_big, p_big = _scores(2000, 7)
    small = bootstrap_ci(y_small, p_small, 0.5, n_resamples=200, seed=1)
    big = bootstrap_ci(y_big, p_big, 0.5, n_resamples=200, seed=1)
    for ci in (small, big):
        assert ci["n_used"] == 200 and ci["n_resamples"] == 200
        for metric in ("f1", "roc_auc"):
            assert ci[metric]["low"] <= ci[metric]["estimate"] <= ci[metric]["high"]
    assert small["f1"]["estimate"] == pytest.approx(f1_score(y_small, p_small >= 0.5))
    for metric in ("f1", "roc_auc"):
        width_small = small[metric]["high"] - small[metric]["low"]
        width_big = big[metric]["high"] - big[metric]["low"]
        assert width_big < width_small / 2  # ~ 1/sqrt(20) in theory


def test_bootstrap_is_reproducible_and_skips_single_class_resamples() -> None:
    y = np.array([1] + [0] * 19)  # one positive: ~36% of resamples miss it
    p = np.linspace(0.0, 1.0, 20)
    first = bootstrap_ci(y, p, 0.5, n_resamples=300, seed=3)
    assert first == bootstrap_ci(y, p, 0.5, n_resamples=300, seed=3)
    assert 100 < first["n_used"] < 300
    with pytest.raises(ValueError, match="single class"):
        bootstrap_ci([0, 0, 0], [0.1, 0.2, 0.3], 0.5)


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1024


def test_plot_roc_writes_png_for_several_models(tmp_path) -> None:
    y, p = _scores(300, 0)
    y2, p2 = _scores(200, 1, signal=0.2)
    path = plot_roc({"gemma-lora": (y, p, 0.5), "tfidf": (y2, p2, 0.3)}, tmp_path / "roc.png")
    _assert_png(path)
    _assert_png(plot_roc({"only": (y, p, 1.0)}, tmp_path / "sub" / "roc1.png"))


def test_plot_confusion_writes_png(tmp_path) -> None:
    y, p = _scores(300, 0)
    path = plot_confusion(
        y, (p >= 0.5).astype(int), ["not hateful", "hateful"], tmp_path / "c.png", "Test set"
    )
    _assert_png(path)


def test_plot_score_histogram_writes_png(tmp_path) -> None:
    y, p = _scores(300, 0)
    _assert_png(plot_score_histogram(y, p, 0.42, tmp_path / "hist.png"))


def test_plot_learning_curve_writes_png(tmp_path) -> None:
    points = [
        (50, 0.41, 0.70, (0.30, 0.50), (0.62, 0.78)),
        (400, 0.72, 0.90, (0.66, 0.78), (0.87, 0.93)),
        (100, 0.55, 0.80, (0.45, 0.63), (0.74, 0.85)),
    ]
    _assert_png(plot_learning_curve(points, tmp_path / "lc.png"))
    no_ci = [(n, f1, auc, None, None) for n, f1, auc, *_ in points]
    _assert_png(plot_learning_curve(no_ci, tmp_path / "lc2.png"))


def test_plotting_leaves_no_pyplot_figures_open(tmp_path) -> None:
    import matplotlib.pyplot as plt

    y, p = _scores(100, 0)
    before = len(plt.get_fignums())
    plot_confusion(y, (p >= 0.5).astype(int), ["a", "b"], tmp_path / "c.png", "t")
    plot_roc({"m": (y, p, 0.5)}, tmp_path / "r.png")
    assert len(plt.get_fignums()) == before

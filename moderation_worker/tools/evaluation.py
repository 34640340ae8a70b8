"""Test-set report for a classifier at a fixed threshold, with bootstrap confidence intervals.

Model-independent on purpose: it takes labels and p(hateful), so the Gemma classifier, the
TF-IDF baseline and any future model are judged by the same code. The threshold is an input
(chosen on validation by `thresholds`), never tuned here, so test numbers stay honest.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from moderation_worker.thresholds import validate_scores

DEFAULT_LABELS = ("not hateful", "hateful")
MAX_CURVE_POINTS = 200


def evaluate(
    y_true: Any,
    p_positive: Any,
    threshold: float,
    labels: Sequence[str] = DEFAULT_LABELS,
    max_curve_points: int = MAX_CURVE_POINTS,
) -> dict[str, Any]:
    """JSON-ready metrics at `threshold` (hateful when p >= threshold).

    With a single class in `y_true`, ROC-AUC and the curve are undefined and reported as
    None rather than raising, so a report on a small slice can still be written.
    """
    _check_threshold(threshold)
    if len(labels) != 2:
        raise ValueError(f"labels must name the two classes (negative, positive), got {labels!r}")
    y, p = validate_scores(y_true, p_positive, need_both_classes=False)
    y_pred = (p >= threshold).astype(np.int64)
    cm = confusion_matrix(y, y_pred, labels=[0, 1])
    both = len(np.unique(y)) == 2
    return {
        "n": int(len(y)),
        "positives": int(y.sum()),
        "threshold": float(threshold),
        "f1": float(f1_score(y, y_pred, zero_division=0.0)),
        "roc_auc": float(roc_auc_score(y, p)) if both else None,
        "precision": float(precision_score(y, y_pred, zero_division=0.0)),
        "recall": float(recall_score(y, y_pred, zero_division=0.0)),
        "accuracy": float(accuracy_score(y, y_pred)),
        "per_label_accuracy": _per_label_accuracy(cm, labels),
        "confusion_matrix": {
            "labels": list(labels),
            "rows": "true label",
            "columns": "predicted label",
            "matrix": cm.astype(int).tolist(),
        },
        "roc_curve": _roc_points(y, p, max_curve_points) if both else None,
    }


def _check_threshold(threshold: float) -> None:
    number = isinstance(threshold, (int, float, np.floating)) and not isinstance(threshold, bool)
    if not (number and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")


def _per_label_accuracy(cm: np.ndarray, labels: Sequence[str]) -> dict[str, float | None]:
    """Recall of each class: how often a comment of that class gets the right verdict."""
    out: dict[str, float | None] = {}
    for i, label in enumerate(labels):
        total = int(cm[i].sum())
        out[label] = float(cm[i, i] / total) if total else None
    return out


def _roc_points(y: np.ndarray, p: np.ndarray, max_points: int) -> dict[str, list]:
    """ROC curve, downsampled to keep the report small; inf threshold becomes None (JSON)."""
    fpr, tpr, thr = roc_curve(y, p)
    keep = downsample_indices(len(fpr), max_points)
    return {
        "fpr": fpr[keep].tolist(),
        "tpr": tpr[keep].tolist(),
        "thresholds": [float(t) if np.isfinite(t) else None for t in thr[keep]],
    }


def downsample_indices(length: int, max_points: int) -> np.ndarray:
    """Evenly spaced indices that always keep the first and last point of a curve."""
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    if length <= max_points:
        return np.arange(length)
    return np.unique(np.linspace(0, length - 1, max_points).round().astype(int))


def bootstrap_ci(
    y_true: Any,
    p_positive: Any,
    threshold: float,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Percentile bootstrap intervals for F1 and ROC-AUC at a fixed threshold.

    Test sets for moderation are often small and imbalanced; the interval says how much a
    difference between two models could be noise. Resamples with one class are skipped
    (AUC undefined there) and counted, so a thin interval from few resamples is visible.
    """
    _check_threshold(threshold)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    y, p = validate_scores(y_true, p_positive, need_both_classes=True)
    y_pred = (p >= threshold).astype(np.int64)
    rng = np.random.default_rng(seed)
    f1s, aucs = [], []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(y), len(y))
        yb = y[idx]
        if yb.min() == yb.max():
            continue
        f1s.append(_f1_from_counts(yb, y_pred[idx]))
        aucs.append(roc_auc_score(yb, p[idx]))
    if not f1s:
        raise ValueError(
            f"all {n_resamples} resamples had a single class; too few positives "
            f"({int(y.sum())} of {len(y)}) for a bootstrap"
        )
    tail = (1.0 - confidence) / 2 * 100
    return {
        "confidence": confidence,
        "n_resamples": n_resamples,
        "n_used": len(f1s),
        "seed": seed,
        "threshold": float(threshold),
        "f1": _interval(f1_score(y, y_pred, zero_division=0.0), f1s, tail),
        "roc_auc": _interval(roc_auc_score(y, p), aucs, tail),
    }


def _f1_from_counts(y: np.ndarray, y_pred: np.ndarray) -> float:
    """F1 as 2TP / (2TP + FP + FN): same value as f1_score, without its per-call overhead
    (the bootstrap calls it a thousand times; tests check it against sklearn)."""
    tp = int(np.count_nonzero(y & y_pred))
    wrong = int(np.count_nonzero(y != y_pred))
    return 2 * tp / (2 * tp + wrong) if tp else 0.0


def _interval(estimate: float, samples: list[float], tail: float) -> dict[str, float]:
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return {"estimate": float(estimate), "low": float(low), "high": float(high)}


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """Write a report as indented JSON (numpy values allowed), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE
    path.write_bytes(orjson.dumps(report, option=options))
    return path

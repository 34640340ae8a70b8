"""PNG figures for evaluation reports: ROC, confusion matrix, score histogram, learning curve.

Figures are built on matplotlib's Agg canvas directly rather than through pyplot, so plotting
never depends on a display, never switches the process-wide backend of whoever imports this,
and leaves no open figures behind in a long-running process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay, auc, roc_curve

from moderation_worker.thresholds import operating_point, validate_scores
from moderation_worker.tools.evaluation import DEFAULT_LABELS

FIGSIZE = (6.4, 6.0)
WIDE_FIGSIZE = (8.0, 5.0)
DPI = 120

Interval = tuple[float, float] | None
LearningPoint = tuple[int, float, float, Interval, Interval]


def _new_figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    fig.clear()  # release artists now; the figure is not registered with pyplot
    return path


def plot_roc(curves: Mapping[str, tuple[Any, Any, float]], path: str | Path) -> Path:
    """ROC curves of one or more models on one figure, each marked at its own threshold.

    `curves` maps a model name to `(y_true, p_positive, threshold)`. The marker shows where the
    deployed threshold sits on the curve, which is what the AUC alone does not say.
    """
    if not curves:
        raise ValueError("plot_roc needs at least one curve")
    fig = _new_figure(FIGSIZE)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    for name, (y_true, p_positive, threshold) in curves.items():
        y, p = validate_scores(y_true, p_positive, need_both_classes=True)
        fpr, tpr, _ = roc_curve(y, p)
        (line,) = ax.plot(fpr, tpr, linewidth=2, label=f"{name} (AUC = {auc(fpr, tpr):.3f})")
        point = operating_point(y, p, threshold)
        ax.plot(
            point["fpr"],
            point["tpr"],
            marker="o",
            markersize=8,
            markeredgecolor="black",
            color=line.get_color(),
            linestyle="none",
            label=f"{name} at threshold {threshold:.3g}",
        )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (non-hateful comments flagged)")
    ax.set_ylabel("True positive rate (hateful comments caught)")
    ax.set_title("ROC curve" if len(curves) == 1 else "ROC curves")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_confusion(
    y_true: Any,
    y_pred: Any,
    labels: Sequence[str],
    path: str | Path,
    title: str = "Confusion matrix",
) -> Path:
    """Confusion matrix with counts; y_true/y_pred are class indices into `labels`."""
    fig = _new_figure(FIGSIZE)
    ax = fig.add_subplot()
    ConfusionMatrixDisplay.from_predictions(
        np.asarray(y_true),
        np.asarray(y_pred),
        labels=list(range(len(labels))),  # show every class even if one is absent
        display_labels=list(labels),
        ax=ax,
        cmap="Blues",
        colorbar=False,
        values_format="d",
    )
    ax.set_title(title)
    ax.set_xlabel("Predicted label")
    ax.set_ylabel("True label")
    return _save(fig, path)


def plot_score_histogram(
    y_true: Any,
    p_positive: Any,
    threshold: float,
    path: str | Path,
    labels: Sequence[str] = DEFAULT_LABELS,
    bins: int = 40,
) -> Path:
    """Distribution of p(hateful) per true class, with the threshold as a vertical line.

    Each class is normalised to its own area, so the rare class stays visible; the counts are
    in the legend. Overlap around the line is where the errors come from.
    """
    y, p = validate_scores(y_true, p_positive, need_both_classes=False)
    fig = _new_figure(WIDE_FIGSIZE)
    ax = fig.add_subplot()
    edges = np.linspace(0.0, 1.0, bins + 1)
    for cls, label in enumerate(labels):
        scores = p[y == cls]
        if scores.size:
            ax.hist(
                scores, bins=edges, density=True, alpha=0.55, label=f"{label} (n={scores.size})"
            )
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("p(hateful)")
    ax.set_ylabel("Density (each class normalised)")
    ax.set_title("Score distribution by true label")
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def plot_learning_curve(
    points: Sequence[LearningPoint], path: str | Path, title: str = "Learning curve"
) -> Path:
    """Test F1 and ROC-AUC against the number of training examples, with CI bands.

    Each point is `(n_examples, f1, auc, f1_ci, auc_ci)`; a CI is `(low, high)` or None. The x
    axis is logarithmic when the sizes span 10x or more (typical: 50, 100, 200, ... examples).
    """
    if not points:
        raise ValueError("plot_learning_curve needs at least one point")
    rows = sorted(points, key=lambda row: row[0])
    n = np.array([row[0] for row in rows], dtype=float)
    fig = _new_figure(WIDE_FIGSIZE)
    ax = fig.add_subplot()
    for column, name in ((1, "F1"), (2, "ROC-AUC")):
        values = np.array([row[column] for row in rows], dtype=float)
        (line,) = ax.plot(n, values, marker="o", linewidth=2, label=name)
        cis = [row[column + 2] for row in rows]
        if all(ci is not None for ci in cis):
            low, high = np.array(cis, dtype=float).T
            ax.fill_between(n, low, high, color=line.get_color(), alpha=0.2, label=f"{name} 95% CI")
    if n.min() > 0 and n.max() / n.min() >= 10:
        ax.set_xscale("log")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("Training examples")
    ax.set_ylabel("Score on the test set")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)

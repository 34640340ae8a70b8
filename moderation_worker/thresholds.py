"""Choosing the decision threshold on a validation split, by a named policy.

The model outputs p(hateful); what a deployment needs is a threshold, and which one is right
depends on what the team can tolerate (missed hate vs. wrongly flagged comments). A named
policy makes that choice explicit and repeatable, and the file written here records the
validation operating point next to the threshold, so whoever deploys it sees what it costs.

Decision rule everywhere (same as `verdicts.make_verdicts`): hateful when p >= threshold.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_curve

MAX_F1 = "max-f1"
YOUDEN = "youden"
FPR_AT_MOST = "fpr<="
PRECISION_AT_LEAST = "precision>="

ACCEPTED_FORMS = "'max-f1', 'youden', 'fpr<=X' or 'precision>=X' with X a number in (0, 1)"

_POLICY_RE = re.compile(r"^(fpr\s*<=|precision\s*>=)\s*([0-9.eE+-]+)$")


@dataclass(frozen=True)
class ThresholdPolicy:
    """A named way to pick a threshold; `target` is X for the constrained policies."""

    kind: str
    target: float | None = None

    def __str__(self) -> str:
        return self.kind if self.target is None else f"{self.kind}{self.target!r}"


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen threshold and the validation operating point it gives (p >= threshold)."""

    threshold: float
    policy: str
    tpr: float
    fpr: float
    precision: float
    recall: float
    f1: float
    n: int
    positives: int
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_policy(text: str) -> ThresholdPolicy:
    """Parse a policy name as given on the command line; whitespace and case are ignored."""
    if not isinstance(text, str):
        raise ValueError(f"threshold policy must be a string, one of {ACCEPTED_FORMS}")
    cleaned = text.strip().lower()
    if cleaned in (MAX_F1, YOUDEN):
        return ThresholdPolicy(cleaned)
    match = _POLICY_RE.match(cleaned)
    if match is None:
        raise ValueError(f"unknown threshold policy {text!r}: expected {ACCEPTED_FORMS}")
    kind = re.sub(r"\s+", "", match.group(1))
    try:
        target = float(match.group(2))
    except ValueError:
        raise ValueError(f"threshold policy {text!r}: {match.group(2)!r} is not a number") from None
    if not 0.0 < target < 1.0:
        raise ValueError(f"threshold policy {text!r}: X must be in (0, 1), got {target}")
    return ThresholdPolicy(kind, target)


def validate_scores(
    y_true: Any, p_positive: Any, *, need_both_classes: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Check labels and scores once, with messages that say what is wrong with the data.

    Returns `(y, p)` as int and float64 arrays. Shared with `evaluation` so both reject the
    same inputs.
    """
    y = np.asarray(y_true)
    p = np.asarray(p_positive, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1:
        raise ValueError(
            f"y_true and p_positive must be 1-D, got shapes {y.shape} and {p.shape} "
            "(pass the p(hateful) column, not the whole probability matrix)"
        )
    if len(y) != len(p):
        raise ValueError(f"length mismatch: {len(y)} labels but {len(p)} scores")
    if len(y) == 0:
        raise ValueError("no examples: y_true and p_positive are empty")
    if np.isnan(p).any():
        raise ValueError(f"p_positive contains {int(np.isnan(p).sum())} NaN score(s)")
    if not np.all((p >= 0.0) & (p <= 1.0)):
        raise ValueError(
            f"p_positive must be probabilities in [0, 1], got min {p.min()} max {p.max()}"
        )
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"y_true must be 0/1 (1 = hateful), got values {sorted(values, key=str)}")
    y = y.astype(np.int64)
    if need_both_classes and len(values) < 2:
        only = "hateful" if 1 in values else "not hateful"
        raise ValueError(
            f"y_true has a single class (all {len(y)} examples are {only}); "
            "a threshold cannot be chosen without both classes"
        )
    return y, p


def choose_threshold(
    y_true: Any, p_positive: Any, policy: str | ThresholdPolicy
) -> ThresholdChoice:
    """Pick a threshold in [0, 1] on validation data by `policy`.

    Ties go to the higher threshold (fewer comments flagged for the same score). When a
    constraint (`fpr<=X`, `precision>=X`) cannot be met, the closest achievable threshold is
    returned and `note` says so, rather than failing the whole calibration run.
    """
    if isinstance(policy, str):
        policy = parse_policy(policy)
    y, p = validate_scores(y_true, p_positive, need_both_classes=True)
    if policy.kind == MAX_F1:
        threshold, note = _max_f1(y, p), None
    elif policy.kind == YOUDEN:
        threshold, note = _youden(y, p), None
    elif policy.kind == FPR_AT_MOST:
        threshold, note = _fpr_at_most(y, p, policy.target)
    elif policy.kind == PRECISION_AT_LEAST:
        threshold, note = _precision_at_least(y, p, policy.target)
    else:
        raise ValueError(f"unknown threshold policy {policy.kind!r}: expected {ACCEPTED_FORMS}")
    return _choice(y, p, threshold, str(policy), note)


def _roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ROC point reachable with a threshold in [0, 1].

    roc_curve starts with threshold inf ("flag nothing"); in [0, 1] that is threshold 1.0,
    which flags nothing only when no score is exactly 1.0 (saturated sigmoids do produce
    1.0), so the point is kept as 1.0 or dropped.
    """
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    if p.max() >= 1.0:
        keep = thr <= 1.0
        fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
    return fpr, tpr, np.clip(thr, 0.0, 1.0)


def _pr_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision/recall per threshold, without sklearn's final threshold-less (1, 0) point."""
    precision, recall, thr = precision_recall_curve(y, p)
    return precision[:-1], recall[:-1], thr


def _max_f1(y: np.ndarray, p: np.ndarray) -> float:
    precision, recall, thr = _pr_points(y, p)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = np.flatnonzero(f1 == f1.max())
    return float(thr[best].max())


def _youden(y: np.ndarray, p: np.ndarray) -> float:
    fpr, tpr, thr = _roc_points(y, p)
    j = tpr - fpr
    best = np.flatnonzero(j == j.max())
    return float(thr[best].max())


def _fpr_at_most(y: np.ndarray, p: np.ndarray, target: float) -> tuple[float, str | None]:
    """Highest recall with validation FPR <= target; else the lowest FPR reachable."""
    fpr, tpr, thr = _roc_points(y, p)
    feasible = np.flatnonzero(fpr <= target)
    if feasible.size:
        best = feasible[tpr[feasible] == tpr[feasible].max()]
        return float(thr[best].max()), None
    lowest = np.flatnonzero(fpr == fpr.min())
    best = lowest[tpr[lowest] == tpr[lowest].max()]
    threshold = float(thr[best].max())
    note = (
        f"no threshold in [0, 1] reaches fpr<={target!r} on validation; picked the strictest "
        f"achievable (fpr {fpr.min():.4g}): negatives scored exactly 1.0 cannot be excluded"
    )
    return threshold, note


def _precision_at_least(y: np.ndarray, p: np.ndarray, target: float) -> tuple[float, str | None]:
    """Highest recall with validation precision >= target; else the highest precision."""
    precision, recall, thr = _pr_points(y, p)
    feasible = np.flatnonzero(precision >= target)
    if feasible.size:
        best = feasible[recall[feasible] == recall[feasible].max()]
        return float(thr[best].max()), None
    top = np.flatnonzero(precision == precision.max())
    best = top[recall[top] == recall[top].max()]
    note = (
        f"no threshold reaches precision>={target!r} on validation; picked the most precise "
        f"achievable (precision {precision.max():.4g})"
    )
    return float(thr[best].max()), note


def operating_point(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float | int]:
    """Counts-based metrics at `threshold`, computed by applying it (not read off a curve)."""
    tn, fp, fn, tp = confusion_matrix(y, (p >= threshold).astype(int), labels=[0, 1]).ravel()
    tpr = tp / (tp + fn) if tp + fn else 0.0
    fpr = fp / (fp + tn) if fp + tn else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {
        "tpr": float(tpr),
        "fpr": float(fpr),
        "precision": float(precision),
        "recall": float(tpr),
        "f1": float(f1),
        "n": int(len(y)),
        "positives": int(tp + fn),
    }


def _choice(
    y: np.ndarray, p: np.ndarray, threshold: float, policy: str, note: str | None
) -> ThresholdChoice:
    threshold = float(min(max(threshold, 0.0), 1.0))
    return ThresholdChoice(
        threshold=threshold, policy=policy, note=note, **operating_point(y, p, threshold)
    )

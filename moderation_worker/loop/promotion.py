"""Whether a candidate adapter beats production on held-out labels, and so is promoted.

Both models score the same held-out labels (`labels.split_of` == "holdout"). The comparison
is a PAIRED bootstrap: each round resamples the rows once and scores both models on that
same resample, so the interval is for the difference on the same comments. Row difficulty
is shared between the models and cancels; two independent intervals would overlap for
most real gains and never promote.

The metric is ROC-AUC because it is threshold-free: the question is whether the candidate
ranks harmful comments above harmless ones better. Each model's threshold is calibrated
separately on the validation slice, so F1 at those thresholds is reported (with its own
paired interval) for the log, but does not decide.

A promotion needs a minimum number of held-out labels, and of each class, because on a few
dozen rows a bootstrap interval is itself unreliable (and a single-class resample has no
AUC): a lucky small sample must not replace a model that serves every comment. Finally,
`trusted` repeats the comparison on the held-out labels that existed at the last promotion:
a flood of poisoned labels also poisons the new held-out ones, but not those.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

METRIC = "roc_auc"
#: Rows x resamples processed at once: bounds memory for large held-out sets.
_CHUNK_CELLS = 2_000_000


@dataclass(frozen=True)
class Comparison:
    """Candidate vs production on one set of labels; `delta` is candidate − production.

    `delta_low`/`delta_high` is the paired-bootstrap interval at `confidence`; `resamples`
    counts the rounds actually used (single-class resamples are skipped).
    """

    n: int
    positives: int
    metric: str
    candidate: float
    production: float
    delta: float
    delta_low: float
    delta_high: float
    candidate_f1: float
    production_f1: float
    delta_f1_low: float
    delta_f1_high: float
    confidence: float
    resamples: int

    @property
    def negatives(self) -> int:
        return self.n - self.positives

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, floats rounded to 4 decimals (for logs and the promotion record)."""
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Decision:
    """Whether to promote, why (a sentence for the log), and each check's outcome."""

    promote: bool
    reason: str
    checks: dict[str, bool]

    def to_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "reason": self.reason, "checks": dict(self.checks)}


def compare(
    y: Any,
    p_candidate: Any,
    p_production: Any,
    t_candidate: float,
    t_production: float,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Paired-bootstrap comparison of two models' scores on the same labelled rows.

    `y` holds 0/1 labels, `p_*` each model's probability of the positive class, `t_*` each
    model's own threshold (for F1). The same `seed` gives the same interval.
    """
    labels, cand, prod = _validate(y, p_candidate, p_production)
    for name, t in (("t_candidate", t_candidate), ("t_production", t_production)):
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= t <= 1.0:
            raise ValueError(f"{name} must be a threshold in [0, 1], got {t!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, numbers.Integral) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    n, resamples = len(labels), int(resamples)
    hits_c, wrong_c = _f1_parts(labels, cand >= t_candidate)
    hits_p, wrong_p = _f1_parts(labels, prod >= t_production)
    ones = np.ones((1, n), dtype=np.int64)
    auc_c = float(weighted_roc_auc(labels, cand, ones)[0])
    auc_p = float(weighted_roc_auc(labels, prod, ones)[0])
    f1_c = float(_f1_rows(ones, hits_c, wrong_c)[0])
    f1_p = float(_f1_rows(ones, hits_p, wrong_p)[0])

    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // n)
    d_auc: list[np.ndarray] = []
    d_f1: list[np.ndarray] = []
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        counts = _resample_counts(rng, rows, n)
        n_pos = counts @ labels
        keep = (n_pos > 0) & (n_pos < n)  # a single-class resample has no AUC
        counts = counts[keep]
        d_auc.append(
            weighted_roc_auc(labels, cand, counts) - weighted_roc_auc(labels, prod, counts)
        )
        d_f1.append(_f1_rows(counts, hits_c, wrong_c) - _f1_rows(counts, hits_p, wrong_p))
    deltas, deltas_f1 = np.concatenate(d_auc), np.concatenate(d_f1)
    if len(deltas) == 0:
        raise ValueError(
            f"all {resamples} resamples had a single class; too few positives "
            f"({int(labels.sum())} of {n}) for a bootstrap"
        )
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100.0 - tail])
    f1_low, f1_high = np.percentile(deltas_f1, [tail, 100.0 - tail])
    return Comparison(
        n=n,
        positives=int(labels.sum()),
        metric=METRIC,
        candidate=auc_c,
        production=auc_p,
        delta=auc_c - auc_p,
        delta_low=float(low),
        delta_high=float(high),
        candidate_f1=f1_c,
        production_f1=f1_p,
        delta_f1_low=float(f1_low),
        delta_f1_high=float(f1_high),
        confidence=float(confidence),
        resamples=int(len(deltas)),
    )


def _validate(y: Any, p_c: Any, p_p: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels as int64, candidate scores, production scores), or ValueError saying why not."""
    labels = np.asarray(y, dtype=np.float64)
    scores = [np.asarray(p_c, dtype=np.float64), np.asarray(p_p, dtype=np.float64)]
    if labels.ndim != 1 or any(s.ndim != 1 for s in scores):
        raise ValueError("y, p_candidate and p_production must be 1-D")
    if not len(labels) == len(scores[0]) == len(scores[1]):
        raise ValueError(
            f"length mismatch: {len(labels)} labels, {len(scores[0])} candidate scores, "
            f"{len(scores[1])} production scores"
        )
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("y must hold only 0 and 1 labels")
    for name, s in zip(("p_candidate", "p_production"), scores, strict=True):
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{name} has {int((~np.isfinite(s)).sum())} non-finite score(s)")
        if not np.all((s >= 0.0) & (s <= 1.0)):
            raise ValueError(f"{name} must be probabilities in [0, 1], got {s.min()}..{s.max()}")
    positives = int(labels.sum())
    if positives == 0 or positives == len(labels):
        raise ValueError(
            f"y must hold both classes to compare ROC-AUC, got {positives} positive(s) "
            f"of {len(labels)}"
        )
    return labels.astype(np.int64), scores[0], scores[1]


def _resample_counts(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """How often each row is drawn in each of `rows` bootstrap resamples (rows x n)."""
    idx = rng.integers(0, n, size=(rows, n))
    flat = (idx + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n)


def weighted_roc_auc(y: Any, p: Any, weights: Any) -> np.ndarray:
    """ROC-AUC for each row of `weights` (how often each example counts), ties counted half.

    A bootstrap resample is the data with row i repeated weights[i] times, so this equals
    `sklearn.metrics.roc_auc_score` on that resample, for all resamples in one vectorised
    pass. Rows without both classes give NaN. Integer weights keep the sums exact.
    """
    labels = np.asarray(y).astype(bool)
    scores = np.asarray(p, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights))
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # groups of tied scores
    w_sorted = w[:, order]
    pos = np.add.reduceat(w_sorted * labels[order], starts, axis=1)
    neg = np.add.reduceat(w_sorted * ~labels[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    twice_wins = (pos * (2 * below + neg)).sum(axis=1)  # 2 x (wins + ties / 2)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = twice_wins / (2.0 * n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _f1_parts(labels: np.ndarray, flagged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row true-positive and error indicators, so a weighted F1 is two dot products."""
    predicted = flagged.astype(np.int64)
    return labels & predicted, (labels != predicted).astype(np.int64)


def _f1_rows(counts: np.ndarray, hits: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """F1 = 2TP / (2TP + FP + FN) per resample; 0 without a true positive (as sklearn)."""
    tp = counts @ hits
    errors = counts @ wrong
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(tp > 0, 2 * tp / (2 * tp + errors), 0.0)


def decide(
    holdout: Comparison | None,
    *,
    trusted: Comparison | None = None,
    min_holdout: int = 50,
    min_per_class: int = 10,
    min_gain: float = 0.0,
    trusted_tolerance: float = 0.0,
) -> Decision:
    """Promote only when the candidate beats production beyond the interval on enough labels.

    Checks: `holdout_size` (n ≥ min_holdout), `holdout_classes` (≥ min_per_class of each),
    `beats_production` (delta_low > min_gain) and, when `trusted` has ≥ min_per_class of each
    class, `trusted_not_worse` (trusted.delta ≥ −trusted_tolerance). A thinner trusted set is
    not checked (said in the reason). Every failed check has its own sentence in `reason`.
    """
    if min_holdout < 1 or min_per_class < 1:
        raise ValueError("min_holdout and min_per_class must be at least 1")
    if trusted_tolerance < 0:
        raise ValueError(f"trusted_tolerance must be >= 0, got {trusted_tolerance}")
    if holdout is None:
        return Decision(
            promote=False,
            reason="no held-out comparison (no held-out labels scored yet): keep production.",
            checks={"holdout_size": False},
        )
    h = holdout
    checks = {
        "holdout_size": h.n >= min_holdout,
        "holdout_classes": min(h.positives, h.negatives) >= min_per_class,
        "beats_production": h.delta_low > min_gain,
    }
    failures = []
    if not checks["holdout_size"]:
        failures.append(f"Only {h.n} held-out labels, {min_holdout} needed.")
    if not checks["holdout_classes"]:
        failures.append(
            f"Held-out labels have {h.positives} positives and {h.negatives} negatives, "
            f"{min_per_class} of each needed."
        )
    if not checks["beats_production"]:
        failures.append(
            f"The interval's low end {h.delta_low:+.3f} is not above the minimum gain "
            f"{min_gain:+.3f}."
        )
    notes = []
    if trusted is not None:
        t = trusted
        if min(t.positives, t.negatives) >= min_per_class:
            checks["trusted_not_worse"] = t.delta >= -trusted_tolerance
            summary = f"on the {t.n} trusted labels ({_summary(t)})"
            if checks["trusted_not_worse"]:
                notes.append(f"Not worse {summary}.")
            else:
                failures.append(
                    f"Worse {summary}, beyond the tolerance {trusted_tolerance:.3f}: "
                    "the new labels may be poisoned."
                )
        else:
            notes.append(
                f"Trusted labels not checked: {t.positives} positives and {t.negatives} "
                f"negatives, {min_per_class} of each needed."
            )
    promote = not failures
    head = f"Candidate {_summary(h)} on {h.n} held-out labels."
    reason = " ".join([head, *failures, *notes, "Promote." if promote else "Keep production."])
    return Decision(promote=promote, reason=reason, checks=checks)


def _summary(c: Comparison) -> str:
    """E.g. 'ROC-AUC 0.910 vs production 0.840, +0.070 [+0.030, +0.110]'."""
    return (
        f"ROC-AUC {c.candidate:.3f} vs production {c.production:.3f}, "
        f"{c.delta:+.3f} [{c.delta_low:+.3f}, {c.delta_high:+.3f}]"
    )

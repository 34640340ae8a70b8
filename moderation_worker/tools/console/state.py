"""What the console knows about the stream, in memory: recent verdicts with their comments' text,
rates, dead letters, moderator labels, and the curves and queue made from them. No Kafka here
(`feed.py` fills it), so every number the page shows is testable without a broker.

The curve of a classifier is built from the comments moderators labelled whose verdict the
console saw (label x the p the worker published), plus an optional calibration file of
(p, label) rows, e.g. its validation scores: the operating point is judged on the same traffic
the threshold will meet.
"""

from __future__ import annotations

import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Points of a curve sent to the page at most (the page draws them as a polyline).
MAX_CURVE_POINTS = 400


@dataclass(frozen=True)
class Seen:
    """One classifier's result for one comment, as a verdict carried it."""

    id: str
    classifier: str
    p: float
    flagged: bool
    threshold: float
    threshold_source: str
    mode: str
    control_version: int | None
    community: str | None
    scored_at: str
    at: float  # when the console saw it (rates)


class ConsoleState:
    """The console's view of the stream; every method is cheap enough for a 1 s poll."""

    def __init__(
        self,
        recent: int = 2000,
        window_s: float = 300.0,
        texts: int = 20_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s, self.clock = window_s, clock
        self.seen: deque[Seen] = deque(maxlen=recent)
        self.texts: OrderedDict[str, str] = OrderedDict()
        self.max_texts = texts
        self.labels: dict[tuple[str, str], int] = {}  # (classifier, id) -> 0/1, latest wins
        self.scores: OrderedDict[tuple[str, str], float] = OrderedDict()  # (classifier, id) -> p
        self.calibration: dict[str, list[tuple[float, int]]] = {}
        self.dead_letters: Counter[str] = Counter()
        self.partitions: dict[int, int | None] = {}
        self.verdicts_seen = 0

    # ------------------------------------------------------------------ fed by feed.py
    def add_comment(self, comment_id: str, text: str) -> None:
        self.texts[comment_id] = text
        self.texts.move_to_end(comment_id)
        while len(self.texts) > self.max_texts:
            self.texts.popitem(last=False)

    def add_verdict(self, verdict: Mapping[str, Any]) -> None:
        """A verdict (schema v2): one `Seen` per classifier result."""
        self.verdicts_seen += 1
        source = verdict.get("source") or {}
        if isinstance(source.get("partition"), int):
            self.partitions[source["partition"]] = verdict.get("control_version")
        now = self.clock()
        for name, result in (verdict.get("classifiers") or {}).items():
            seen = Seen(
                id=str(verdict.get("id")),
                classifier=name,
                p=float(result["p"]),
                flagged=bool(result["flagged"]),
                threshold=float(result["threshold"]),
                threshold_source=str(result.get("threshold_source", "")),
                mode=str(result.get("mode", "enforce")),
                control_version=verdict.get("control_version"),
                community=verdict.get("community"),
                scored_at=str(verdict.get("scored_at", "")),
                at=now,
            )
            self.seen.append(seen)
            self.scores[(name, seen.id)] = seen.p
            self.scores.move_to_end((name, seen.id))
        while len(self.scores) > self.max_texts * 4:
            self.scores.popitem(last=False)

    def add_dead_letter(self, letter: Mapping[str, Any]) -> None:
        self.dead_letters[str(letter.get("reason", "unknown"))] += 1

    def add_label(self, classifier: str, comment_id: str, label: int) -> None:
        self.labels[(classifier, comment_id)] = int(label)

    def add_calibration(self, classifier: str, rows: Iterable[tuple[float, int]]) -> None:
        self.calibration[classifier] = [(float(p), int(y)) for p, y in rows]

    # ------------------------------------------------------------------ what the page asks
    def classifiers(self) -> list[str]:
        return sorted({s.classifier for s in self.seen} | set(self.calibration))

    def recent(self, classifier: str, n: int = 50) -> list[dict[str, Any]]:
        rows = []
        for s in reversed(self.seen):
            if s.classifier != classifier:
                continue
            rows.append(
                {
                    "id": s.id,
                    "text": self.texts.get(s.id),
                    "p": s.p,
                    "flagged": s.flagged,
                    "threshold": s.threshold,
                    "threshold_source": s.threshold_source,
                    "mode": s.mode,
                    "control_version": s.control_version,
                    "community": s.community,
                    "scored_at": s.scored_at,
                }
            )
            if len(rows) >= n:
                break
        return rows

    def _window(self) -> list[Seen]:
        since = self.clock() - self.window_s
        return [s for s in self.seen if s.at >= since]

    def rates(self) -> dict[str, Any]:
        """Per minute over the window: verdict results per classifier (and flagged), comments
        per community."""
        window = self._window()
        minutes = self.window_s / 60.0
        per_classifier: dict[str, dict[str, float]] = {}
        for name in {s.classifier for s in window}:
            mine = [s for s in window if s.classifier == name]
            per_classifier[name] = {
                "per_min": len(mine) / minutes,
                "flagged_per_min": sum(s.flagged for s in mine) / minutes,
            }
        comments = {(s.id, s.community) for s in window}
        communities = Counter(c or "(none)" for _, c in comments)
        return {
            "window_s": self.window_s,
            "per_classifier": per_classifier,
            "per_community": {c: n / minutes for c, n in communities.items()},
        }

    def points(self, classifier: str) -> tuple[np.ndarray, np.ndarray]:
        """(labels, p) of the labelled comments whose score was seen, plus calibration rows."""
        pairs = [
            (self.scores[(c, i)], y)
            for (c, i), y in self.labels.items()
            if c == classifier and (c, i) in self.scores
        ]
        pairs += self.calibration.get(classifier, [])
        y = np.array([y for _, y in pairs], dtype=np.int64)
        p = np.array([p for p, _ in pairs], dtype=np.float64)
        return y, p

    def curve(self, classifier: str) -> dict[str, Any]:
        from sklearn.metrics import precision_recall_curve, roc_curve

        y, p = self.points(classifier)
        out: dict[str, Any] = {"labelled": int(len(y)), "positives": int(y.sum()) if len(y) else 0}
        if len(set(y.tolist())) < 2:
            return {**out, "roc": None, "pr": None}
        fpr, tpr, t_roc = roc_curve(y, p)
        precision, recall, t_pr = precision_recall_curve(y, p)
        t_roc = np.clip(t_roc, 0.0, 1.0)  # sklearn's first threshold is inf
        t_pr = np.append(t_pr, 1.0)  # precision/recall have one more point than thresholds
        return {
            **out,
            "roc": _thin({"fpr": fpr, "tpr": tpr, "thresholds": t_roc}),
            "pr": _thin({"precision": precision, "recall": recall, "thresholds": t_pr}),
        }

    def operating_point(self, classifier: str, threshold: float) -> dict[str, Any]:
        """What `threshold` would do: precision / recall / FPR on the labelled points, and the
        share and number per hour of today's verdicts it would flag."""
        y, p = self.points(classifier)
        out: dict[str, Any] = {"threshold": threshold, "labelled": int(len(y))}
        flagged = p >= threshold
        tp = int(np.sum(flagged & (y == 1)))
        fp = int(np.sum(flagged & (y == 0)))
        positives, negatives = int(np.sum(y == 1)), int(np.sum(y == 0))
        out["precision"] = tp / (tp + fp) if tp + fp else None
        out["recall"] = tp / positives if positives else None
        out["fpr"] = fp / negatives if negatives else None
        window = [s for s in self._window() if s.classifier == classifier]
        per_hour = len(window) * 3600.0 / self.window_s
        share = sum(s.p >= threshold for s in window) / len(window) if window else None
        out["verdicts_per_hour"] = per_hour
        out["flag_share"] = share
        out["flags_per_hour"] = share * per_hour if share is not None else None
        return out

    def applied(self, version: int) -> dict[str, Any]:
        """Whether every partition whose verdicts the console sees decided under `version`."""
        parts = {str(k): v for k, v in sorted(self.partitions.items())}
        waiting = [k for k, v in parts.items() if v is None or v < version]
        return {"target": version, "partitions": parts, "applied": bool(parts) and not waiting,
                "waiting": waiting}  # fmt: skip

    def queue(
        self, classifier: str, threshold: float, n: int = 20, random_share: float = 0.2,
        rng: random.Random | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """Unlabelled comments with a known text: the closest to `threshold` (the model is least
        sure there), plus a random share so the labelled sample is not only the hard cases."""
        latest: dict[str, Seen] = {}
        for s in self.seen:
            if s.classifier == classifier and s.id in self.texts:
                latest[s.id] = s
        pool = [s for i, s in latest.items() if (classifier, i) not in self.labels]
        n_random = min(len(pool), round(n * random_share))
        by_doubt = sorted(pool, key=lambda s: abs(s.p - threshold))
        chosen = by_doubt[: n - n_random]
        rest = [s for s in pool if s not in chosen]
        picked = (rng or random.Random()).sample(rest, min(n_random, len(rest)))
        items = [(s, "uncertain") for s in chosen] + [(s, "random") for s in picked]
        return [
            {"id": s.id, "text": self.texts[s.id], "p": s.p, "threshold": threshold, "why": why}
            for s, why in items
        ]


def _thin(curve: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """At most MAX_CURVE_POINTS evenly spaced points, the ends kept."""
    n = len(next(iter(curve.values())))
    keep = np.unique(np.linspace(0, n - 1, min(n, MAX_CURVE_POINTS)).round().astype(int))
    return {k: [round(float(x), 5) for x in v[keep]] for k, v in curve.items()}

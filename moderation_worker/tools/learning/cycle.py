"""One learning cycle of one classifier: split the labels, train a candidate, calibrate it on
the validation labels, and compare it with production on the held-out labels.

The split is fixed per comment id (`labels.split_of`), so no cycle ever trains on a label a
previous or later cycle holds out. The candidate starts from production's adapter (or from a
fresh one), uses production's prompt (the label words and instructions are the classifier's
contract with its workers), and is trained by the same `train_classifier` as the offline
`train` command, with its progress bars and a time budget. Whether it may go live is decided
by `promotion.decide` on the held-out comparison, never by the training loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from moderation_worker.loop.labels import ModeratorLabel, split_of
from moderation_worker.loop.promotion import Comparison, Decision, compare, decide
from moderation_worker.loop_settings import LoopSettings
from moderation_worker.model.classifier import AgileClassifier, LoadedModel
from moderation_worker.model.lora import LoraAdapter
from moderation_worker.model.prompts import PromptSettings
from moderation_worker.model.training import TrainingConfig, train_classifier

#: The fewest labels of each class a split needs before a cycle trains at all.
MIN_PER_CLASS_TO_TRAIN = 2


@dataclass(frozen=True)
class Production:
    """What the workers enforce now: its adapter (None: zero-shot), prompt and threshold."""

    adapter: LoraAdapter | None
    prompt: PromptSettings
    threshold: float
    source: str  # e.g. "configured", "adapter/hate (control)"


@dataclass
class CycleResult:
    """Everything a cycle did, for the history log, the control record's reason and tests."""

    classifier: str
    labels: int
    last_seq: int
    counts: dict[str, dict[str, int]]
    seconds: float = 0.0
    training_seconds: float = 0.0
    skipped: str | None = None
    candidate: LoraAdapter | None = None
    threshold: float | None = None
    holdout: Comparison | None = None
    trusted: Comparison | None = None
    decision: Decision | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "classifier": self.classifier,
            "labels": self.labels,
            "last_seq": self.last_seq,
            "counts": self.counts,
            "seconds": round(self.seconds, 1),
            "training_seconds": round(self.training_seconds, 1),
        }
        if self.skipped:
            out["skipped"] = self.skipped
        if self.candidate is not None:
            out["candidate"] = {
                "lora": str(self.candidate.path) if self.candidate.path else None,
                "sha256": self.candidate.sha256,
                "threshold": self.threshold,
            }
        for name in ("holdout", "trusted", "decision"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.to_dict()
        return {**out, **self.extra}


def _counts(rows: Sequence[ModeratorLabel]) -> dict[str, int]:
    positives = sum(r.label for r in rows)
    return {"labels": len(rows), "positive": positives, "negative": len(rows) - positives}


def split_labels(
    classifier: str, labels: Sequence[tuple[int, ModeratorLabel]], settings: LoopSettings
) -> dict[str, list[tuple[int, ModeratorLabel]]]:
    """train / validation / holdout, by the fixed hash of each comment id."""
    out: dict[str, list[tuple[int, ModeratorLabel]]] = {
        "train": [],
        "validation": [],
        "holdout": [],
    }
    for seq, label in labels:
        part = split_of(
            classifier, label.id, settings.holdout_fraction, settings.validation_fraction
        )
        out[part].append((seq, label))
    return out


def _scores(base: LoadedModel, adapter: LoraAdapter | None, prompt: PromptSettings, texts):
    clf = AgileClassifier(base, prompt=None if adapter else prompt, adapter=adapter)
    return np.asarray(clf.p_positive(list(texts)), dtype=np.float64)


def run_cycle(
    base: LoadedModel,
    classifier: str,
    labels: Sequence[tuple[int, ModeratorLabel]],
    production: Production,
    settings: LoopSettings,
    out_dir: str | Path,
    trusted_seq: int = 0,
    log: Callable[[str], None] = print,
) -> CycleResult:
    """Train and judge one candidate on `labels` (seq, label), the latest decision per id.

    `trusted_seq`: held-out labels with seq at most this (those the last cycle already had)
    form the trusted comparison that a flood of new labels cannot rewrite.
    """
    started = time.perf_counter()
    parts = split_labels(classifier, labels, settings)
    rows = {k: [lb for _, lb in v] for k, v in parts.items()}
    result = CycleResult(
        classifier=classifier,
        labels=len(labels),
        last_seq=max((s for s, _ in labels), default=0),
        counts={k: _counts(v) for k, v in rows.items()},
    )
    for part in ("train", "validation"):
        c = result.counts[part]
        if min(c["positive"], c["negative"]) < MIN_PER_CLASS_TO_TRAIN:
            result.skipped = (
                f"the {part} labels hold {c['positive']} positive and {c['negative']} negative; "
                f"each class needs {MIN_PER_CLASS_TO_TRAIN}"
            )
            result.seconds = time.perf_counter() - started
            return result

    init = production.adapter if settings.init == "current" else None
    config = TrainingConfig(
        rank=init.rank if init else settings.rank,
        target_layers=init.target_layers if init else TrainingConfig().target_layers,
        learning_rate=settings.learning_rate,
        epochs=settings.epochs,
        balance_classes=settings.balance_classes,
    )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(out_dir) / f"{classifier}-{result.last_seq:07d}-{stamp}"
    log(
        f"{classifier}: training a candidate on {len(rows['train'])} labels "
        f"({settings.init}, {settings.epochs} epochs, budget {settings.time_budget_s:.0f} s)"
    )
    trained = train_classifier(
        base,
        [r.text for r in rows["train"]],
        np.array([r.label for r in rows["train"]]),
        [r.text for r in rows["validation"]],
        np.array([r.label for r in rows["validation"]]),
        prompt=production.prompt,
        config=config,
        policy=settings.threshold_policy,
        out=out,
        notes={"source": "agile loop", "classifier": classifier, "last_seq": result.last_seq},
        verbose=2,
        init=init,
        time_budget_s=settings.time_budget_s,
    )
    result.training_seconds = trained.training.seconds
    result.candidate = trained.adapter
    result.threshold = float(trained.adapter.metadata.threshold or 0.5)

    holdout = parts["holdout"]
    texts = [lb.text for _, lb in holdout]
    y = np.array([lb.label for _, lb in holdout], dtype=np.int64)
    if len(set(y.tolist())) == 2:
        p_new = _scores(base, trained.adapter, production.prompt, texts)
        p_old = _scores(base, production.adapter, production.prompt, texts)
        kwargs = {"resamples": settings.bootstrap_resamples, "confidence": settings.confidence}
        result.holdout = compare(y, p_new, p_old, result.threshold, production.threshold, **kwargs)
        old = np.array([s <= trusted_seq for s, _ in holdout])
        if trusted_seq and len(set(y[old].tolist())) == 2:
            result.trusted = compare(
                y[old], p_new[old], p_old[old], result.threshold, production.threshold, **kwargs
            )
    result.decision = decide(
        result.holdout,
        trusted=result.trusted,
        min_holdout=settings.min_holdout_labels,
        min_per_class=settings.min_holdout_per_class,
        min_gain=settings.min_gain,
        trusted_tolerance=settings.trusted_tolerance,
    )
    result.seconds = time.perf_counter() - started
    log(f"{classifier}: {result.decision.reason}")
    return result

"""Turning scores into verdicts: the one place thresholds and modes are applied.

The stream worker and the `score` command both call `decide`, so a verdict means the same
thing wherever it is made. Thresholds, modes and routes come from a `PolicyState` snapshot,
not from the model, so a new threshold (control topic, SIGHUP or restart) needs no model
reload, and one batch is decided under one state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from moderation_worker.control_records import ENFORCE
from moderation_worker.events import (
    ClassifierResult,
    Comment,
    ModelIdentity,
    SourcePosition,
    Verdict,
)
from moderation_worker.policy import PolicyState


class ProbabilityModel(Protocol):
    """A single classifier: label probabilities for a list of texts.

    `predict_proba` returns float32 `[len(texts), len(labels)]`, rows summing to 1. Real
    implementations pad to a fixed `[batch_size, sequence_length]` shape internally.
    """

    labels: tuple[str, ...]
    positive_label: str
    identity: ModelIdentity
    batch_size: int

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray: ...


class RowModel(Protocol):
    """What the worker needs of its classifiers: scores for (text, classifier) rows.

    `predict_rows` returns float `[n, 2]`: p(not the positive label), p(positive label), each
    row summing to 1; `n <= batch_size`, padded internally to the fixed shape.
    """

    batch_size: int
    names: tuple[str, ...]

    def predict_rows(self, texts: Sequence[str], names: Sequence[str]) -> np.ndarray: ...
    def identity_of(self, name: str) -> ModelIdentity: ...
    def labels_of(self, name: str) -> tuple[str, str]: ...
    def canary_rows(self) -> list[tuple[str, str]]: ...
    def calibrated_thresholds(self) -> dict[str, float | None]: ...


class SingleClassifierRows:
    """One `ProbabilityModel` as a `RowModel` with one classifier named `name`.

    The negative column is the row's sum less p(positive), so a row that does not sum to 1
    still fails the processor's check.
    """

    def __init__(self, model: ProbabilityModel, name: str = "hate") -> None:
        self.model = model
        self.name = name
        self.names = (name,)
        self.batch_size = model.batch_size
        self._positive = model.labels.index(model.positive_label)
        self.calibrated_threshold = getattr(model, "calibrated_threshold", None)
        self.length_buckets: tuple[int, ...] = tuple(getattr(model, "length_buckets", ()) or ())
        if hasattr(model, "length_bucket"):
            self.length_bucket = model.length_bucket  # the compiled length a text needs

    def predict_rows(self, texts: Sequence[str], names: Sequence[str]) -> np.ndarray:
        unknown = set(names) - {self.name}
        if unknown:
            raise KeyError(f"no classifier named {sorted(unknown)[0]!r} (have {self.name!r})")
        probs = np.asarray(self.model.predict_proba(list(texts)), dtype=np.float64)
        expected = (len(texts), len(self.model.labels))
        if probs.shape != expected:
            raise ValueError(f"model returned shape {probs.shape}, expected {expected}")
        p = probs[:, self._positive]
        return np.stack([probs.sum(axis=1) - p, p], axis=1)

    def identity_of(self, name: str) -> ModelIdentity:
        return self.model.identity

    def labels_of(self, name: str) -> tuple[str, str]:
        negative = next((lb for lb in self.model.labels if lb != self.model.positive_label), "")
        return negative, self.model.positive_label

    def canary_rows(self) -> list[tuple[str, str]]:
        """The model's canary texts (one per compiled shape), if it offers them."""
        provider = getattr(self.model, "canary_texts", None)
        texts = list(provider()) if callable(provider) else []
        return [(text, self.name) for text in texts]

    def calibrated_thresholds(self) -> dict[str, float | None]:
        return {self.name: self.calibrated_threshold}


class CompositeRows:
    """Several row models as one: each row goes to the model that owns its classifier, so one
    policy can mix LoRA classifiers on a shared Gemma (a `ClassifierSet`) with, say, a
    fine-tuned encoder. Calls have the smallest part's batch size."""

    def __init__(self, parts: Sequence[RowModel]) -> None:
        names = [n for part in parts for n in part.names]
        if not parts or len(set(names)) != len(names):
            raise ValueError(f"parts must be non-empty with distinct classifiers, got {names}")
        self.parts = list(parts)
        self.batch_size = min(part.batch_size for part in parts)

    @property
    def names(self) -> tuple[str, ...]:  # live: a part may gain classifiers (candidates)
        return tuple(n for part in self.parts for n in part.names)

    def _owner(self, name: str) -> RowModel:
        for part in self.parts:
            if name in part.names:
                return part
        raise KeyError(f"no classifier named {name!r} (have {', '.join(self.names)})")

    def predict_rows(self, texts: Sequence[str], names: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), 2), dtype=np.float32)
        for part in self.parts:
            rows = [i for i, n in enumerate(names) if n in part.names]
            if rows:
                out[rows] = part.predict_rows([texts[i] for i in rows], [names[i] for i in rows])
        unknown = set(names) - set(self.names)
        if unknown:
            raise KeyError(f"no classifier named {sorted(unknown)[0]!r}")
        return out

    def identity_of(self, name: str) -> ModelIdentity:
        return self._owner(name).identity_of(name)

    def labels_of(self, name: str) -> tuple[str, str]:
        return self._owner(name).labels_of(name)

    def canary_rows(self) -> list[tuple[str, str]]:
        return [row for part in self.parts for row in part.canary_rows()]

    def calibrated_thresholds(self) -> dict[str, float | None]:
        return {k: v for part in self.parts for k, v in part.calibrated_thresholds().items()}

    def apply_overrides(self, overrides: Mapping[str, Any]) -> list[str]:
        return self._each("apply_overrides", overrides)

    def apply_candidates(self, candidates: Mapping[str, Any]) -> list[str]:
        return self._each("apply_candidates", candidates)

    def _each(self, method: str, specs: Mapping[str, Any]) -> list[str]:
        messages: list[str] = []
        for part in self.parts:
            apply = getattr(part, method, None)
            mine = {k: v for k, v in specs.items() if k in part.names}
            if apply is not None:
                messages += apply(mine)
            else:
                messages += [f"{k}: this classifier cannot swap weights live" for k in mine]
        return messages


def as_row_model(model: Any, name: str = "hate") -> RowModel:
    """`model` itself when it scores rows (a `ClassifierSet`), else wrapped as one classifier."""
    return model if hasattr(model, "predict_rows") else SingleClassifierRows(model, name)


def decide(
    comment: Comment,
    scores: Mapping[str, float],
    model: RowModel,
    policy: PolicyState,
    source: SourcePosition | None,
    scored_at: str,
) -> Verdict:
    """One verdict from one comment's scores (classifier -> p(positive), in route order).

    Each classifier flags when p >= its threshold for the comment's community; the comment is
    `flagged` when an enforced one flags. Shadow results are reported and never decide.
    """
    if not scores:
        raise ValueError(f"comment {comment.id!r} has no classifier scores")
    community = policy.community(comment.meta)
    results = []
    for name, p in scores.items():
        if not np.isfinite(p):
            raise ValueError(f"classifier {name} returned a non-finite probability")
        threshold = policy.threshold(name, community)
        negative, positive = model.labels_of(name)
        flagged = bool(p >= threshold.value)
        results.append(
            ClassifierResult(
                name=name,
                p=float(p),
                flagged=flagged,
                threshold=float(threshold.value),
                threshold_source=threshold.source,
                mode=policy.mode(name),
                label=positive if flagged else negative,
                model=model.identity_of(name),
            )
        )
    enforced = [r for r in results if r.mode == ENFORCE]
    primary = (enforced or results)[0]
    hateful = primary.flagged and primary.mode == ENFORCE
    negative, positive = model.labels_of(primary.name)
    return Verdict(
        id=comment.id,
        p_hateful=primary.p,
        hateful=hateful,
        label=positive if hateful else negative,
        threshold=primary.threshold,
        model=primary.model,
        scored_at=scored_at,
        source=source,
        meta=comment.meta,
        results=tuple(results),
        flagged=any(r.flagged for r in enforced),
        primary=primary.name,
        community=community,
        control_version=policy.version,
    )

"""Turning label probabilities into verdicts: the one place a threshold is applied.

The stream worker and the `score` command both call `make_verdicts`, so a verdict means the
same thing wherever it is made. The threshold is passed in, not baked into the model, so a new
threshold (restart or SIGHUP) needs no model reload.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from moderation_worker.events import Comment, ModelIdentity, SourcePosition, Verdict, utc_now


class ProbabilityModel(Protocol):
    """What the worker needs of a classifier: label probabilities for a list of texts.

    `predict_proba` returns float32 `[len(texts), len(labels)]`, rows summing to 1. Real
    implementations pad to a fixed `[batch_size, sequence_length]` shape internally.
    """

    labels: tuple[str, ...]
    positive_label: str
    identity: ModelIdentity
    batch_size: int

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray: ...


def positive_probability(model: ProbabilityModel, probs: np.ndarray) -> np.ndarray:
    """Column of `probs` that belongs to the positive (hateful) label."""
    return probs[:, model.labels.index(model.positive_label)]


def make_verdicts(
    comments: Sequence[Comment],
    probs: np.ndarray,
    model: ProbabilityModel,
    threshold: float,
    sources: Sequence[SourcePosition | None] | None = None,
) -> list[Verdict]:
    """One verdict per comment: hateful when p(positive label) >= threshold."""
    if len(comments) != len(probs):
        raise ValueError(f"{len(comments)} comments but {len(probs)} probability rows")
    if not np.all(np.isfinite(probs)):
        raise ValueError("model returned non-finite probabilities")
    p_pos = positive_probability(model, probs)
    negative = next((lb for lb in model.labels if lb != model.positive_label), "")
    now = utc_now()
    sources = sources if sources is not None else [None] * len(comments)
    out = []
    for comment, p, source in zip(comments, p_pos, sources, strict=True):
        hateful = bool(p >= threshold)
        out.append(
            Verdict(
                id=comment.id,
                p_hateful=float(p),
                hateful=hateful,
                label=model.positive_label if hateful else negative,
                threshold=float(threshold),
                model=model.identity,
                scored_at=now,
                source=source,
                meta=comment.meta,
            )
        )
    return out

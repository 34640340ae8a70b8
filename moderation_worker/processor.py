"""The batch step: a batch of events in, one outcome per event out (`BatchProcessor`).

Synchronous on purpose: the pipeline runs it in a single-thread executor so the event loop keeps
heartbeating while the model works. A scoring failure is isolated to the rows that cause it by
bisecting the batch, so one poisonous comment dead-letters itself, not its neighbours; a model
that fails on known-good texts (one per compiled shape) is `ModelUnavailable` instead.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from moderation_worker.batching import InputEvent, Outcome, dead_letter_for, pad_rows
from moderation_worker.events import SCORING_FAILED
from moderation_worker.verdicts import ProbabilityModel, make_verdicts

H = TypeVar("H")

#: Rows of a probability matrix must sum to 1 within this tolerance to count as a valid answer.
_ROW_SUM_TOLERANCE = 1e-3

# --------------------------------------------------------------------------------------------
# The batch step: events -> outcomes
# --------------------------------------------------------------------------------------------


class ModelUnavailable(RuntimeError):
    """The model fails even on a known-good text: a systemic failure, not a poisonous comment.

    Dead-lettering the whole stream would be wrong here, so the batch is not acknowledged and
    the pipeline retries or stops.
    """


@dataclass
class BatchResult(Generic[H]):
    """Outcomes in input order plus what metrics need to know about the model calls."""

    outcomes: list[Outcome[H]]
    rows: int  # scorable rows in the batch
    batch_size: int
    model_calls: int = 0
    model_seconds: list[float] = field(default_factory=list)
    threshold: float = 0.5

    @property
    def fill_ratio(self) -> float:
        """Real rows over the fixed batch shape; 0 when the batch needed no model call."""
        return self.rows / self.batch_size if self.rows else 0.0


class BatchProcessor:
    """Scores a batch with a `ProbabilityModel` and returns one outcome per event.

    Synchronous on purpose: the pipeline runs it in a single-thread executor so the event loop
    keeps heartbeating while the model works.

    Args:
        model: the classifier; `predict_proba` always receives exactly `batch_size` texts.
        threshold: the decision threshold, or a callable read once per batch (SIGHUP reload).
        batch_size: rows per model call; default `model.batch_size`.
        canary_text: a known-good text scored when every row of a batch failed, to tell a
            poisonous batch (dead letters) from a broken model (`ModelUnavailable`). A model
            with several compiled shapes (length buckets) offers `canary_texts()`, one text per
            shape, and all of them are tried: a failure of one shape is the model's, not the
            comments'.
        clock: the monotonic clock `InputEvent.received_at` was taken with (for `latency_ms`).

    Example:
        processor = BatchProcessor(TrivialScorer(batch_size=8), threshold=0.5)
        result = processor.process(batch.events)
    """

    def __init__(
        self,
        model: ProbabilityModel,
        threshold: float | Callable[[], float],
        batch_size: int | None = None,
        canary_text: str = "hello",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self._threshold = threshold
        self.batch_size = batch_size or model.batch_size
        self.canary_texts = canary_texts(model, canary_text)
        self.clock = clock

    def threshold(self) -> float:
        return float(self._threshold() if callable(self._threshold) else self._threshold)

    def process(self, events: Sequence[InputEvent[H]]) -> BatchResult[H]:
        """One outcome per event, in order. Raises only `ModelUnavailable`."""
        threshold = self.threshold()
        scorable = [e for e in events if e.comment is not None]
        result: BatchResult[H] = BatchResult(
            [], rows=len(scorable), batch_size=self.batch_size, threshold=threshold
        )
        by_event: dict[int, Outcome[H]] = {}
        for start in range(0, len(scorable), self.batch_size):
            chunk = scorable[start : start + self.batch_size]
            for event, outcome in zip(
                chunk, self._score_chunk(chunk, threshold, result), strict=True
            ):
                by_event[id(event)] = outcome
        for event in events:
            if event.comment is None:
                assert event.error is not None
                dl = dead_letter_for(event, event.error.reason, str(event.error))
                result.outcomes.append(Outcome(event, dead_letter=dl))
            else:
                result.outcomes.append(by_event[id(event)])
        return result

    def _score_chunk(
        self, chunk: Sequence[InputEvent[H]], threshold: float, result: BatchResult[H]
    ) -> list[Outcome[H]]:
        comments = [e.comment for e in chunk if e.comment is not None]
        rows = self._score_rows([c.text for c in comments], result)
        outcomes: list[Outcome[H]] = []
        for event, comment, row in zip(chunk, comments, rows, strict=True):
            if isinstance(row, BaseException):
                error = f"{type(row).__name__}: {row}"
                outcomes.append(
                    Outcome(event, dead_letter=dead_letter_for(event, SCORING_FAILED, error))
                )
            else:
                (verdict,) = make_verdicts(
                    [comment], row[None, :], self.model, threshold, [event.source]
                )
                latency_ms = max(0.0, (self.clock() - event.received_at) * 1000.0)
                verdict = dataclasses.replace(verdict, latency_ms=latency_ms)
                outcomes.append(Outcome(event, verdict=verdict))
        return outcomes

    def _score_rows(
        self, texts: Sequence[str], result: BatchResult[Any]
    ) -> list[np.ndarray | BaseException]:
        """One probability row or one error per text.

        When the whole call fails (or every row is invalid), a known-good canary text decides
        between a broken model (`ModelUnavailable`, nothing dead-lettered) and poisonous rows,
        which bisection then isolates.
        """
        try:
            rows = [_check_row(row) for row in self._predict_fixed(texts, result)]
        except Exception as exc:  # the model may raise anything; we only need to localise it
            self._check_canary(exc, result)
            return self._bisect(texts, exc, result)
        if all(isinstance(r, BaseException) for r in rows):
            self._check_canary(rows[0], result)
        return rows

    def _bisect(
        self, texts: Sequence[str], error: BaseException, result: BatchResult[Any]
    ) -> list[np.ndarray | BaseException]:
        """Split a failing call in halves until the failure is pinned to single rows."""
        if len(texts) == 1:
            return [error]
        out: list[np.ndarray | BaseException] = []
        mid = len(texts) // 2
        for half in (texts[:mid], texts[mid:]):
            try:
                out.extend(_check_row(row) for row in self._predict_fixed(half, result))
            except Exception as exc:
                out.extend(self._bisect(half, exc, result))
        return out

    def _predict_fixed(self, texts: Sequence[str], result: BatchResult[Any]) -> np.ndarray:
        padded = pad_rows(texts, self.batch_size)
        started = time.perf_counter()
        try:
            probs = np.asarray(self.model.predict_proba(padded), dtype=np.float64)
        finally:
            result.model_calls += 1
            result.model_seconds.append(time.perf_counter() - started)
        expected = (self.batch_size, len(self.model.labels))
        if probs.shape != expected:
            raise ValueError(f"model returned shape {probs.shape}, expected {expected}")
        return probs[: len(texts)]  # padding rows never produce verdicts

    def warm_up(self) -> int:
        """Score every canary once: each compiled shape is built (and checked) before the
        worker takes partitions. Returns the number of shapes; raises `ModelUnavailable`."""
        result: BatchResult[Any] = BatchResult([], rows=0, batch_size=self.batch_size)
        self._check_canary(RuntimeError("warm-up"), result)
        return len(self.canary_texts)

    def _check_canary(self, first_error: BaseException, result: BatchResult[Any]) -> None:
        for i, text in enumerate(self.canary_texts):
            shape = f"canary {i + 1} of {len(self.canary_texts)}"
            try:
                (row,) = self._predict_fixed([text], result)
            except Exception as exc:
                raise ModelUnavailable(
                    f"model fails on a known-good text too ({shape}: {type(exc).__name__}: "
                    f"{exc}); first row error: {first_error!r}"
                ) from exc
            if isinstance(_check_row(row), BaseException):
                raise ModelUnavailable(f"model returns invalid probabilities for {shape}")


def canary_texts(model: Any, default: str = "hello") -> list[str]:
    """Known-good texts, one per compiled shape of `model` when it says (`canary_texts()`)."""
    provider = getattr(model, "canary_texts", None)
    texts = list(provider()) if callable(provider) else []
    return texts or [default]


def _check_row(row: np.ndarray) -> np.ndarray | BaseException:
    """A row is usable when it is finite and sums to 1; otherwise that row alone fails."""
    if not np.all(np.isfinite(row)):
        return ValueError(f"non-finite probabilities {row.tolist()}")
    if np.any(row < 0) or abs(float(row.sum()) - 1.0) > _ROW_SUM_TOLERANCE:
        return ValueError(f"probabilities do not sum to 1: {row.tolist()}")
    return row

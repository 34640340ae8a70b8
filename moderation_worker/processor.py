"""The batch step: a batch of events in, one outcome per event out (`BatchProcessor`).

Synchronous on purpose: the pipeline runs it in a single-thread executor so the event loop keeps
heartbeating while the model works. A scoring failure is isolated to the rows that cause it by
bisecting the batch, so one poisonous comment dead-letters itself, not its neighbours; a model
that fails on known-good texts (one per compiled shape) is `ModelUnavailable` instead.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from moderation_worker.batching import InputEvent, Outcome, dead_letter_for, pad_rows
from moderation_worker.events import SCORING_FAILED, utc_now
from moderation_worker.policy import PolicyState, single_classifier_policy
from moderation_worker.verdicts import RowModel, as_row_model, decide

H = TypeVar("H")
log = logging.getLogger("moderation_worker.processor")

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
    threshold: float = 0.5  # the primary classifier's default threshold (metrics, logs)
    control_version: int | None = None

    @property
    def fill_ratio(self) -> float:
        """Real rows over the fixed shapes they filled; 0 when the batch needed no model call."""
        if not self.rows:
            return 0.0
        calls = -(-self.rows // self.batch_size)
        return self.rows / (calls * self.batch_size)


class BatchProcessor:
    """Scores a batch of events with one or more classifiers; one outcome per event.

    Each scorable event becomes one row per classifier its route names; rows of any
    classifiers fill the fixed-shape model calls together. An event whose rows all scored gets
    a verdict (`verdicts.decide`), one with a failing row a dead letter.

    Args:
        model: a `RowModel` (a `ClassifierSet`), or a single-classifier `ProbabilityModel`,
            which runs as the one classifier `classifier_name`.
        threshold: for a single classifier without a policy: the threshold, or a callable
            read once per batch (SIGHUP reload).
        batch_size: rows per model call; default `model.batch_size`.
        canary_text: a known-good text scored when every row of a batch failed, to tell a
            poisonous batch (dead letters) from a broken model (`ModelUnavailable`). A model
            with several compiled shapes offers one canary row per shape, all tried.
        clock: the monotonic clock `InputEvent.received_at` was taken with (for `latency_ms`).
        policy: a callable returning the `PolicyState` (routes, thresholds, modes) in force,
            read once per batch: a change applies at the next batch boundary.
        classifier_name: the name a single-classifier model runs under.

    Example:
        processor = BatchProcessor(TrivialScorer(batch_size=8), threshold=0.5)
        result = processor.process(batch.events)
    """

    def __init__(
        self,
        model: Any,
        threshold: float | Callable[[], float] | None = None,
        batch_size: int | None = None,
        canary_text: str = "hello",
        clock: Callable[[], float] = time.monotonic,
        policy: Callable[[], PolicyState] | None = None,
        classifier_name: str = "hate",
    ) -> None:
        self.model: RowModel = as_row_model(model, classifier_name)
        if policy is None:
            if threshold is None:
                raise ValueError("give a threshold or a policy")
            policy = _fixed_threshold_policy(self.model.names[0], threshold)
        self.policy = policy
        self.batch_size = batch_size or self.model.batch_size
        self.canary_rows = self.model.canary_rows() or [(canary_text, self.model.names[0])]
        self.clock = clock
        self._adapters_applied: Any = {}

    def process(self, events: Sequence[InputEvent[H]]) -> BatchResult[H]:
        """One outcome per event, in order. Raises only `ModelUnavailable`."""
        state = self.policy()  # one state decides the whole batch
        self._sync_adapters(state)
        scorable = [e for e in events if e.comment is not None]
        rows = [
            (i, e.comment.text, name)
            for i, e in enumerate(scorable)
            if e.comment is not None
            for name in state.scored(e.comment.meta, self.model.names)
        ]
        result: BatchResult[H] = BatchResult(
            [],
            rows=len(rows),
            batch_size=self.batch_size,
            threshold=float(state.threshold(state.default_route[0], None).value),
            control_version=state.version,
        )
        scores: list[dict[str, float]] = [{} for _ in scorable]
        errors: list[BaseException | None] = [None] * len(scorable)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            answers = self._score_rows([(t, n) for _, t, n in chunk], result)
            for (i, _, name), answer in zip(chunk, answers, strict=True):
                if isinstance(answer, BaseException):
                    errors[i] = errors[i] or answer
                else:
                    scores[i][name] = float(answer[1])
        now = utc_now()
        by_event: dict[int, Outcome[H]] = {}
        for i, event in enumerate(scorable):
            by_event[id(event)] = self._outcome(event, scores[i], errors[i], state, now)
        for event in events:
            if event.comment is None:
                assert event.error is not None
                dl = dead_letter_for(event, event.error.reason, str(event.error))
                result.outcomes.append(Outcome(event, dead_letter=dl))
            else:
                result.outcomes.append(by_event[id(event)])
        return result

    def length_buckets(self) -> tuple[int, ...]:
        """The model's compiled sequence lengths (empty when it has no length buckets)."""
        return tuple(getattr(self.model, "length_buckets", ()) or ())

    def length_bucket(self, event: InputEvent[Any]) -> int | None:
        """The compiled length `event`'s rows need (None: no model row, or no buckets), so
        the pipeline can queue it with comments of its length."""
        length_of = getattr(self.model, "length_bucket", None)
        if event.comment is None or length_of is None:
            return None
        try:
            return int(length_of(event.comment.text))
        except Exception:  # a text the tokenizer chokes on: the batch step dead-letters it
            return None

    def _sync_adapters(self, state: PolicyState) -> None:
        """Adapter overrides from the control topic, applied at this batch boundary (a model
        that cannot swap adapters ignores them)."""
        wanted = (state.control_adapters, state.control_candidates)
        apply = getattr(self.model, "apply_overrides", None)
        if apply is None or wanted == self._adapters_applied:
            return
        messages = apply(state.control_adapters)
        candidates = getattr(self.model, "apply_candidates", None)
        if candidates is not None:
            messages += candidates(state.control_candidates)
        for message in messages:
            log.warning("adapter override: %s", message)
        self._adapters_applied = wanted

    def _outcome(
        self,
        event: InputEvent[H],
        scores: dict[str, float],
        error: BaseException | None,
        state: PolicyState,
        now: str,
    ) -> Outcome[H]:
        assert event.comment is not None
        if error is None:
            try:
                verdict = decide(event.comment, scores, self.model, state, event.source, now)
            except Exception as exc:  # a non-finite score or a misconfigured route
                error = exc
        if error is not None:
            detail = f"{type(error).__name__}: {error}"
            return Outcome(event, dead_letter=dead_letter_for(event, SCORING_FAILED, detail))
        latency_ms = max(0.0, (self.clock() - event.received_at) * 1000.0)
        return Outcome(event, verdict=dataclasses.replace(verdict, latency_ms=latency_ms))

    def _score_rows(
        self, rows: Sequence[tuple[str, str]], result: BatchResult[Any]
    ) -> list[np.ndarray | BaseException]:
        """One probability row or one error per (text, classifier) row.

        When the whole call fails (or every row is invalid), a known-good canary row decides
        between a broken model (`ModelUnavailable`, nothing dead-lettered) and poisonous rows,
        which bisection then isolates.
        """
        try:
            answers = [_check_row(row) for row in self._predict_fixed(rows, result)]
        except Exception as exc:  # the model may raise anything; we only need to localise it
            self._check_canary(exc, result)
            return self._bisect(rows, exc, result)
        if all(isinstance(r, BaseException) for r in answers):
            self._check_canary(answers[0], result)
        return answers

    def _bisect(
        self, rows: Sequence[tuple[str, str]], error: BaseException, result: BatchResult[Any]
    ) -> list[np.ndarray | BaseException]:
        """Split a failing call in halves until the failure is pinned to single rows."""
        if len(rows) == 1:
            return [error]
        out: list[np.ndarray | BaseException] = []
        mid = len(rows) // 2
        for half in (rows[:mid], rows[mid:]):
            try:
                out.extend(_check_row(row) for row in self._predict_fixed(half, result))
            except Exception as exc:
                out.extend(self._bisect(half, exc, result))
        return out

    def _predict_fixed(
        self, rows: Sequence[tuple[str, str]], result: BatchResult[Any]
    ) -> np.ndarray:
        padded = pad_rows(list(rows), self.batch_size)
        started = time.perf_counter()
        try:
            probs = np.asarray(
                self.model.predict_rows([t for t, _ in padded], [n for _, n in padded]),
                dtype=np.float64,
            )
        finally:
            result.model_calls += 1
            result.model_seconds.append(time.perf_counter() - started)
        expected = (self.batch_size, 2)
        if probs.shape != expected:
            raise ValueError(f"model returned shape {probs.shape}, expected {expected}")
        return probs[: len(rows)]  # padding rows never produce verdicts

    def warm_up(self) -> int:
        """Score every canary once: each compiled shape is built (and checked) before the
        worker takes partitions. Returns the number of shapes; raises `ModelUnavailable`."""
        result: BatchResult[Any] = BatchResult([], rows=0, batch_size=self.batch_size)
        self._check_canary(RuntimeError("warm-up"), result)
        return len(self.canary_rows)

    def _check_canary(self, first_error: BaseException, result: BatchResult[Any]) -> None:
        for i, row in enumerate(self.canary_rows):
            shape = f"canary {i + 1} of {len(self.canary_rows)}"
            try:
                (answer,) = self._predict_fixed([row], result)
            except Exception as exc:
                raise ModelUnavailable(
                    f"model fails on a known-good text too ({shape}: {type(exc).__name__}: "
                    f"{exc}); first row error: {first_error!r}"
                ) from exc
            if isinstance(_check_row(answer), BaseException):
                raise ModelUnavailable(f"model returns invalid probabilities for {shape}")


def _fixed_threshold_policy(
    name: str, threshold: float | Callable[[], float]
) -> Callable[[], PolicyState]:
    """A policy of one classifier whose threshold is `threshold` (or its callable's value)."""
    cache: dict[float, PolicyState] = {}

    def policy() -> PolicyState:
        value = float(threshold() if callable(threshold) else threshold)
        if value not in cache:
            cache.clear()
            cache[value] = single_classifier_policy(name, value)
        return cache[value]

    return policy


def _check_row(row: np.ndarray) -> np.ndarray | BaseException:
    """A row is usable when it is finite and sums to 1; otherwise that row alone fails."""
    if not np.all(np.isfinite(row)):
        return ValueError(f"non-finite probabilities {row.tolist()}")
    if np.any(row < 0) or abs(float(row.sum()) - 1.0) > _ROW_SUM_TOLERANCE:
        return ValueError(f"probabilities do not sum to 1: {row.tolist()}")
    return row

"""Fixed-shape batching, size-or-deadline flushing, and the step from events to outcomes.

This is the Kafka-free heart of the worker. The Faust adapter and the in-memory test broker both
drive the same `BatchPipeline`, so the at-least-once rules live here once:

* every admitted event ends as exactly one `Outcome`: a verdict or a dead letter;
* outcomes are published (the sink returns only once the broker accepted them) *before* any event
  of the batch is acknowledged, and events are acknowledged in arrival order, batch after batch,
  because Kafka commits a single offset per partition: an ack that overtakes an earlier event
  lets the commit skip it;
* a failure we cannot turn into dead letters (the sink fails, the whole model is down) stops the
  pipeline with nothing of that batch acknowledged, so a restart scores those events again.

A scoring failure is isolated to the rows that cause it by bisecting the batch, so one poisonous
comment dead-letters itself, not its neighbours.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import orjson

from moderation_worker.events import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_TEXT_CHARS,
    SCORING_FAILED,
    Comment,
    DeadLetter,
    InvalidEvent,
    SourcePosition,
    Verdict,
    parse_comment,
    utc_now,
)
from moderation_worker.verdicts import ProbabilityModel, make_verdicts

log = logging.getLogger(__name__)

H = TypeVar("H")

#: Rows of a probability matrix must sum to 1 within this tolerance to count as a valid answer.
_ROW_SUM_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------
# Events in, outcomes out
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class InputEvent(Generic[H]):
    """One consumed record, validated on arrival so the batcher can count scorable rows.

    `handle` is whatever the transport needs to acknowledge the record (a Faust event, an
    offset); the core never looks inside it. `headers` are the record's headers, passed on to
    its verdict or dead letter so tracing (e.g. W3C `traceparent`) survives the worker.
    """

    raw: bytes
    key: bytes | None
    source: SourcePosition
    handle: H
    received_at: float
    produced_at: float | None
    comment: Comment | None
    error: InvalidEvent | None
    headers: tuple[tuple[str, bytes], ...] = ()

    @property
    def scorable(self) -> bool:
        return self.comment is not None


def admit(
    raw: bytes | None,
    *,
    key: bytes | None,
    source: SourcePosition,
    handle: H,
    received_at: float,
    produced_at: float | None = None,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    max_depth: int = DEFAULT_MAX_DEPTH,
    headers: Sequence[tuple[str, bytes | None]] | None = None,
) -> InputEvent[H]:
    """Validate a raw record into an `InputEvent`. Never raises: bad input carries its error.

    A tombstone (`None` value) is treated as empty bytes, so it dead-letters as invalid JSON
    instead of disappearing. A header with a `None` value keeps its name with empty bytes.
    """
    data = b"" if raw is None else bytes(raw)
    comment: Comment | None = None
    error: InvalidEvent | None = None
    try:
        comment = parse_comment(data, max_text_chars, max_depth)
    except InvalidEvent as exc:
        error = exc
    kept = tuple((str(name), bytes(value or b"")) for name, value in headers or ())
    return InputEvent(data, key, source, handle, received_at, produced_at, comment, error, kept)


@dataclass(frozen=True, eq=False)
class Outcome(Generic[H]):
    """What became of one input event: exactly one of `verdict` and `dead_letter` is set."""

    event: InputEvent[H]
    verdict: Verdict | None = None
    dead_letter: DeadLetter | None = None

    def __post_init__(self) -> None:
        if (self.verdict is None) == (self.dead_letter is None):
            raise ValueError("an outcome is either a verdict or a dead letter")


def dead_letter_for(event: InputEvent[Any], reason: str, error: str) -> DeadLetter:
    """A dead letter carrying the original bytes and, when the event had one, its id."""
    event_id = event.comment.id if event.comment is not None else _best_effort_id(event.raw)
    return DeadLetter(
        reason=reason,
        error=error,
        original=event.raw,
        source=event.source,
        id=event_id,
        failed_at=utc_now(),
    )


def _best_effort_id(raw: bytes) -> str | None:
    """The event's `id` when the payload is an object with a string id (e.g. text too long)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    event_id = obj.get("id") if isinstance(obj, dict) else None
    return event_id if isinstance(event_id, str) and event_id else None


# --------------------------------------------------------------------------------------------
# Size-or-deadline batching (pure: the clock is passed in)
# --------------------------------------------------------------------------------------------


@dataclass
class Batch(Generic[H]):
    """Events collected together; only the scorable ones take a model row."""

    events: list[InputEvent[H]] = field(default_factory=list)
    opened_at: float = 0.0
    n_scorable: int = 0
    closed_by: str = ""  # "full", "deadline" or "drain", for metrics and logs

    def __len__(self) -> int:
        return len(self.events)


class Batcher(Generic[H]):
    """Collects events into batches of `batch_size` scorable rows, flushed when full or when the
    oldest event has waited `max_wait_s`.

    Invalid events ride along with the batch they arrived in (they need no model row, but they
    must be acknowledged in order with their neighbours). `max_events` caps a batch that a
    flood of invalid events would otherwise grow without bound.

    Example:
        batcher = Batcher(batch_size=8, max_wait_s=0.2)
        full = batcher.add(event, now=time.monotonic())  # a Batch when it filled up, else None
        due = batcher.take_due(now=time.monotonic())     # a Batch once the deadline passed
    """

    def __init__(self, batch_size: int, max_wait_s: float, max_events: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if max_wait_s <= 0:
            raise ValueError("max_wait_s must be > 0")
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.max_events = max_events or max(4 * batch_size, 64)
        self._open: Batch[H] | None = None

    def __len__(self) -> int:
        return 0 if self._open is None else len(self._open)

    def add(self, event: InputEvent[H], now: float) -> Batch[H] | None:
        """Add one event; return the batch if this event filled it."""
        if self._open is None:
            self._open = Batch(opened_at=now)
        batch = self._open
        batch.events.append(event)
        if event.scorable:
            batch.n_scorable += 1
        if batch.n_scorable >= self.batch_size or len(batch) >= self.max_events:
            return self._close("full")
        return None

    def deadline(self) -> float | None:
        """When the open batch must be flushed, or None when nothing is waiting."""
        return None if self._open is None else self._open.opened_at + self.max_wait_s

    def take_due(self, now: float) -> Batch[H] | None:
        """The open batch if its oldest event has waited long enough."""
        deadline = self.deadline()
        if deadline is not None and now >= deadline:
            return self._close("deadline")
        return None

    def drain(self) -> Batch[H] | None:
        """Whatever is open, regardless of the deadline (used when stopping cleanly)."""
        return self._close("drain") if self._open is not None else None

    def _close(self, why: str) -> Batch[H]:
        batch, self._open = self._open, None
        assert batch is not None
        batch.closed_by = why
        return batch


def pad_rows(texts: Sequence[str], batch_size: int) -> list[str]:
    """Pad `texts` to exactly `batch_size` rows so the model's compiled shape is reused.

    Padding repeats the first real row: it is a text the model already has to handle, so a
    padding row can never be the row that makes a call fail, and bisection stays truthful.
    """
    if not texts:
        raise ValueError("cannot pad an empty batch")
    if len(texts) > batch_size:
        raise ValueError(f"{len(texts)} rows do not fit a batch of {batch_size}")
    return list(texts) + [texts[0]] * (batch_size - len(texts))


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


# --------------------------------------------------------------------------------------------
# The async pipeline: batcher + executor + sink + ordered acks
# --------------------------------------------------------------------------------------------


class OutcomeSink(Protocol[H]):
    """Where outcomes go. `publish` returns only once the broker accepted every one of them."""

    async def publish(self, outcomes: Sequence[Outcome[H]]) -> None: ...


class PipelineObserver(Protocol[H]):
    """Hooks for metrics; every method must be cheap and must not raise."""

    def on_event(self, event: InputEvent[H]) -> None: ...

    def on_batch_done(
        self, batch: Batch[H], result: BatchResult[H], published_at: float
    ) -> None: ...


class PipelineFailure(RuntimeError):
    """The pipeline stopped with events unacknowledged; the worker must restart to rescore them.

    `reason` is a short machine-readable code (what `/health` shows, never the message).
    """

    def __init__(self, message: str, reason: str = "pipeline_failed") -> None:
        super().__init__(message)
        self.reason = reason


class PipelineTimeout(PipelineFailure):
    """The model or the sink exceeded its time limit; the stuck call may still be running."""


Ack = Callable[[InputEvent[H]], "Awaitable[Any] | Any"]


class BatchPipeline(Generic[H]):
    """Drives `Batcher` + `BatchProcessor` + an `OutcomeSink`, acknowledging strictly in order.

    `submit()` is called by the consumer loop for each record (it waits when a full batch is
    already queued: backpressure); `run()` is the flusher task. At most one batch is scored at a
    time, so acknowledgements leave in arrival order.

    Args:
        processor: the batch step, run in `executor`.
        sink: publishes outcomes and waits for the broker.
        ack: acknowledges one event (may be async).
        max_wait_s: flush a partial batch when its oldest event waited this long.
        executor: a single-thread executor for the model; default the loop's.
        model_retries: how often a `ModelUnavailable` batch is retried (with backoff) before
            the pipeline gives up with `PipelineFailure`.
        model_timeout_s: a batch's model step taking longer fails the pipeline (a hung model
            must not hold partitions while health says ready); None waits forever.
        publish_timeout_s: the same for publishing a batch's outcomes (a stalled broker).
    """

    def __init__(
        self,
        processor: BatchProcessor,
        sink: OutcomeSink[H],
        ack: Ack[H],
        *,
        max_wait_s: float,
        executor: Executor | None = None,
        observer: PipelineObserver[H] | None = None,
        clock: Callable[[], float] = time.monotonic,
        model_retries: int = 3,
        retry_backoff_s: float = 1.0,
        max_ready: int = 1,
        model_timeout_s: float | None = None,
        publish_timeout_s: float | None = None,
    ) -> None:
        self.processor = processor
        self.sink = sink
        self._ack = ack
        self.batcher: Batcher[H] = Batcher(processor.batch_size, max_wait_s)
        self.executor = executor
        self.observer = observer
        self.clock = clock
        self.model_retries = model_retries
        self.retry_backoff_s = retry_backoff_s
        self._max_ready = max_ready
        self.model_timeout_s = model_timeout_s
        self.publish_timeout_s = publish_timeout_s
        self._ready: deque[Batch[H]] = deque()
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._busy = False
        self.failure: BaseException | None = None
        self.acked = 0

    @property
    def idle(self) -> bool:
        """Nothing buffered, queued or being processed."""
        return not self._busy and not self._ready and len(self.batcher) == 0

    async def submit(self, event: InputEvent[H]) -> None:
        """Add one event; waits while a full batch is queued behind the one being scored."""
        while len(self._ready) >= self._max_ready:
            self._raise_if_failed()
            self._space.clear()
            await self._space.wait()
        self._raise_if_failed()
        if self.observer is not None:
            self.observer.on_event(event)
        was_empty = len(self.batcher) == 0
        full = self.batcher.add(event, self.clock())
        if full is not None:
            self._ready.append(full)
        if full is not None or was_empty:
            self._wake.set()  # a new deadline or a full batch: the flusher must look again

    async def run(self) -> None:
        """Flush batches forever (until cancelled). Raises `PipelineFailure` on a fatal error."""
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    await self._sleep_until_something_to_do()
                    continue
                self._busy = True
                try:
                    await self._handle(batch)
                finally:
                    self._busy = False
        except PipelineFailure as exc:
            self.failure = exc
            self._space.set()  # release a submit() waiting for space, so it sees the failure
            raise

    async def flush(self) -> None:
        """Process everything buffered now (tests and clean stops); same rules as `run()`."""
        while (batch := self._next_batch() or self.batcher.drain()) is not None:
            await self._handle(batch)

    def _next_batch(self) -> Batch[H] | None:
        if self._ready:
            batch = self._ready.popleft()
            self._space.set()
            return batch
        return self.batcher.take_due(self.clock())

    async def _sleep_until_something_to_do(self) -> None:
        self._wake.clear()
        deadline = self.batcher.deadline()
        timeout = None if deadline is None else max(0.0, deadline - self.clock())
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass

    async def _handle(self, batch: Batch[H]) -> None:
        result = await self._process_with_retries(batch)
        try:
            await asyncio.wait_for(self.sink.publish(result.outcomes), self.publish_timeout_s)
        except asyncio.CancelledError:
            raise
        except TimeoutError as exc:
            raise PipelineTimeout(
                f"publishing {len(result.outcomes)} outcomes took over "
                f"{self.publish_timeout_s}s; batch left unacknowledged",
                "publish_timeout",
            ) from exc
        except Exception as exc:
            raise PipelineFailure(
                f"publishing {len(result.outcomes)} outcomes failed; batch left unacknowledged: "
                f"{type(exc).__name__}: {exc}",
                "publish_failed",
            ) from exc
        published_at = self.clock()
        for event in batch.events:  # arrival order, so per-partition offsets ack in order
            maybe = self._ack(event)
            if asyncio.iscoroutine(maybe) or isinstance(maybe, asyncio.Future):
                await maybe
            self.acked += 1
        if self.observer is not None:
            self.observer.on_batch_done(batch, result, published_at)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch done",
                extra={
                    "events": len(batch),
                    "rows": result.rows,
                    "fill_ratio": round(result.fill_ratio, 3),
                    "closed_by": batch.closed_by,
                    "model_calls": result.model_calls,
                    "model_seconds": round(sum(result.model_seconds), 4),
                },
            )

    async def _process_with_retries(self, batch: Batch[H]) -> BatchResult[H]:
        loop = asyncio.get_running_loop()
        for attempt in range(self.model_retries + 1):
            try:
                return await asyncio.wait_for(
                    loop.run_in_executor(self.executor, self.processor.process, batch.events),
                    self.model_timeout_s,
                )
            except TimeoutError as exc:
                raise PipelineTimeout(
                    f"the model took over {self.model_timeout_s}s on a batch of "
                    f"{len(batch)} events; batch left unacknowledged",
                    "model_timeout",
                ) from exc
            except ModelUnavailable as exc:
                if attempt == self.model_retries:
                    raise PipelineFailure(
                        f"model unavailable, giving up: {exc}", "model_unavailable"
                    ) from exc
                delay = self.retry_backoff_s * 2**attempt
                log.warning(
                    "model unavailable (attempt %d), retrying in %.1fs: %s", attempt + 1, delay, exc
                )
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in the batch step: never ack past it
                raise PipelineFailure(
                    f"batch step failed: {type(exc).__name__}: {exc}", "batch_step_failed"
                ) from exc
        raise AssertionError("unreachable")

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            reason = getattr(self.failure, "reason", "pipeline_failed")
            raise PipelineFailure(f"pipeline stopped: {self.failure}", reason) from self.failure

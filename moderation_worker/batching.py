"""Events in, batches out: validation on arrival, outcomes, and size-or-deadline batching.

This is the Kafka-free heart of the worker (with `processor` and `pipeline`). The Faust adapter
and the in-memory test broker both drive the same `BatchPipeline`, so the at-least-once rules
live in the core once:

* every admitted event ends as exactly one `Outcome`: a verdict or a dead letter;
* outcomes are published before any event of the batch is acknowledged, in arrival order;
* a failure that cannot become dead letters stops the pipeline with nothing of that batch acked.

Here: `InputEvent`/`admit` (a record validated on arrival), `Outcome`, and the `Batcher` that
collects scorable rows into fixed-size batches, flushed when full or when the oldest waited long
enough. The batch step is `processor.BatchProcessor`; the async driver `pipeline.BatchPipeline`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson

from moderation_worker.events import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_TEXT_CHARS,
    Comment,
    DeadLetter,
    InvalidEvent,
    SourcePosition,
    Verdict,
    parse_comment,
    utc_now,
)

H = TypeVar("H")

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
    bucket: int | None = None  # the length queue it came from (`BucketedBatcher`), if any

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

    def oldest(self) -> float:
        """When the oldest waiting event arrived (inf when nothing waits)."""
        return self._open.events[0].received_at if self._open is not None else float("inf")

    def pop_oldest(self) -> InputEvent[H]:
        """Take the oldest waiting event out (to top up a longer batch); the open batch keeps
        its deadline, so what stays never waits longer than it would have."""
        assert self._open is not None
        event = self._open.events.pop(0)
        self._open.n_scorable -= event.scorable
        if not self._open.events:
            self._open = None
        return event

    def _close(self, why: str) -> Batch[H]:
        batch, self._open = self._open, None
        assert batch is not None
        batch.closed_by = why
        return batch


class BucketedBatcher(Generic[H]):
    """One `Batcher` per length bucket, so a long comment does not stretch short ones to its
    length: a batch is cut to the longest prompt it holds, and the model's cost grows with it.

    `bucket_of(event)` names an event's queue (the compiled length its prompt needs; None for
    an event with no model row, which rides in the shortest open queue). Each queue keeps the
    size-or-deadline rule. A batch closed by its deadline with rows to spare is topped up with
    the oldest waiting rows of *shorter* queues: they fit its shape exactly, and the padding
    rows it would otherwise compute are real work instead. Batches may now finish in another
    order than their events arrived; `ordered_acks.AckLedger` keeps acknowledgements in
    arrival order per partition.

    Example:
        batcher = BucketedBatcher(8, 0.2, bucket_of=model_length_of)
        full = batcher.add(event, now)  # a Batch of one bucket when it filled up
    """

    def __init__(
        self,
        batch_size: int,
        max_wait_s: float,
        bucket_of: Callable[[InputEvent[H]], int | None],
        max_events: int | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.bucket_of = bucket_of
        self._max_events = max_events
        self._queues: dict[int | None, Batcher[H]] = {}
        Batcher(batch_size, max_wait_s, max_events)  # validates the arguments once

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def _queue(self, bucket: int | None) -> tuple[int | None, Batcher[H]]:
        """The queue an event of `bucket` joins, and that queue's bucket."""
        if bucket is None:  # no model row: join the shortest queue with something open
            open_ = sorted(b for b, q in self._queues.items() if len(q) and b is not None)
            bucket = open_[0] if open_ else None
        queue = self._queues.get(bucket)
        if queue is None:
            queue = self._queues[bucket] = Batcher(
                self.batch_size, self.max_wait_s, self._max_events
            )
        return bucket, queue

    def add(self, event: InputEvent[H], now: float) -> Batch[H] | None:
        """Add one event to its length queue; return that queue's batch if it filled."""
        bucket, queue = self._queue(self.bucket_of(event) if event.scorable else None)
        full = queue.add(event, now)
        if full is not None:
            full.bucket = bucket
        return full

    def deadline(self) -> float | None:
        """The earliest deadline of any open queue."""
        deadlines = [d for q in self._queues.values() if (d := q.deadline()) is not None]
        return min(deadlines, default=None)

    def take_due(self, now: float) -> Batch[H] | None:
        """The overdue batch that waited longest, topped up from shorter queues."""
        due = [(d, b) for b, q in self._queues.items() if (d := q.deadline()) is not None]
        due = [(d, b) for d, b in due if now >= d]
        if not due:
            return None
        _, bucket = min(due, key=lambda item: item[0])
        batch = self._queues[bucket].take_due(now)
        assert batch is not None
        return self._top_up(batch, bucket)

    def drain(self) -> Batch[H] | None:
        """The open batch that waited longest, regardless of deadlines (clean stops)."""
        open_ = [(q.oldest(), b) for b, q in self._queues.items() if len(q)]
        if not open_:
            return None
        _, bucket = min(open_, key=lambda item: item[0])
        batch = self._queues[bucket].drain()
        assert batch is not None
        return self._top_up(batch, bucket)

    def _top_up(self, batch: Batch[H], bucket: int | None) -> Batch[H]:
        """Fill a partial batch's spare rows with the oldest rows waiting in shorter queues
        (oldest first, so the acknowledgements they hold back go out soonest)."""
        batch.bucket = bucket
        if bucket is None:
            return batch
        shorter = [q for b, q in self._queues.items() if b is not None and b < bucket]
        while batch.n_scorable < self.batch_size:
            waiting = [q for q in shorter if len(q)]
            if not waiting:
                break
            moved = min(waiting, key=lambda q: q.oldest()).pop_oldest()
            batch.events.append(moved)
            batch.n_scorable += moved.scorable
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

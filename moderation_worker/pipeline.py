"""The async pipeline: batcher + executor + sink + ordered acknowledgements (`BatchPipeline`).

Outcomes are published (the sink returns only once the broker accepted them) *before* any event
of the batch is acknowledged, and events are acknowledged in arrival order, batch after batch,
because Kafka commits a single offset per partition: an ack that overtakes an earlier event lets
the commit skip it. Model and publish calls are time-limited; a failure that cannot become dead
letters raises `PipelineFailure` with nothing of that batch acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Generic, Protocol, TypeVar

from moderation_worker.batching import Batch, Batcher, BucketedBatcher, InputEvent, Outcome
from moderation_worker.ordered_acks import AckLedger
from moderation_worker.processor import BatchProcessor, BatchResult, ModelUnavailable

log = logging.getLogger("moderation_worker.batching")

H = TypeVar("H")

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
    time. With `batch_by_length` (and a model with length buckets) rows wait in one queue per
    bucket, so batches may finish out of arrival order; an `AckLedger` still releases
    acknowledgements in arrival order per partition.

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
        batch_by_length: one queue per length bucket when the processor's model has buckets.
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
        batch_by_length: bool = True,
    ) -> None:
        self.processor = processor
        self.sink = sink
        self._ack = ack
        self.batcher: Batcher[H] | BucketedBatcher[H]
        if batch_by_length and len(processor.length_buckets()) > 1:
            self.batcher = BucketedBatcher(
                processor.batch_size, max_wait_s, bucket_of=processor.length_bucket
            )
        else:
            self.batcher = Batcher(processor.batch_size, max_wait_s)
        self._ledger: AckLedger[H] = AckLedger()
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
        self._ledger.admit(event)
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

    async def finish(self) -> None:
        """Process everything submitted so far, the open partial batch included (a finite
        input, like a file, is done); `run()` may keep running alongside."""
        while self._ready or self._busy:
            self._raise_if_failed()
            await asyncio.sleep(0.005)
        self._raise_if_failed()
        await self.flush()

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
        for event in self._ledger.finish(batch.events):  # arrival order per partition
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

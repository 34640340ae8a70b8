"""An in-process stand-in for Kafka, so the at-least-once rules run in milliseconds in tests.

Faust's own test utilities feed an agent directly and mock the producer, which is useless for
the question that matters here: which offsets end up committed when a batch fails or the worker
dies. `MemoryBroker` keeps partitioned logs and per-group committed offsets; `MemoryWorker`
consumes them through the same `BatchPipeline` the Faust worker uses, and commits only the
contiguous prefix of acknowledged offsets, the way a Kafka consumer group does.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from moderation_worker.batching import (
    BatchPipeline,
    BatchProcessor,
    InputEvent,
    Outcome,
    PipelineObserver,
    admit,
)
from moderation_worker.events import DEFAULT_MAX_TEXT_CHARS, SourcePosition

from .codecs import encode_outcome


@dataclass(frozen=True)
class Record:
    """One record in a partition log."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float


class MemoryBroker:
    """Partitioned append-only logs plus committed offsets per (group, topic, partition)."""

    def __init__(self) -> None:
        self._logs: dict[str, list[list[Record]]] = {}
        self._committed: dict[tuple[str, str, int], int] = {}

    def create_topic(self, name: str, partitions: int = 1) -> None:
        self._logs.setdefault(name, [[] for _ in range(partitions)])

    def partitions(self, topic: str) -> int:
        return len(self._logs[topic])

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int | None = None,
    ) -> Record:
        """Append a record; without a partition, the key picks one (stable hash), like Kafka."""
        self.create_topic(topic)
        logs = self._logs[topic]
        if partition is None:
            partition = zlib.crc32(key) % len(logs) if key is not None else 0
        record = Record(topic, partition, len(logs[partition]), key, value, time.time())
        logs[partition].append(record)
        return record

    def log(self, topic: str, partition: int) -> list[Record]:
        return self._logs[topic][partition]

    def records(self, topic: str) -> list[Record]:
        """Every record of a topic, partition by partition."""
        return [r for log in self._logs.get(topic, []) for r in log]

    def committed(self, group: str, topic: str, partition: int) -> int:
        return self._committed.get((group, topic, partition), 0)

    def commit(self, group: str, topic: str, partition: int, offset: int) -> None:
        self._committed[(group, topic, partition)] = offset


class MemorySink:
    """Publishes outcomes to the verdict and dead-letter topics; can be told to fail.

    `fail_publishes` makes that many `publish` calls raise before any record is written,
    like a broker that refuses a produce request.
    """

    def __init__(self, broker: MemoryBroker, verdict_topic: str, dlq_topic: str) -> None:
        self.broker = broker
        self.verdict_topic = verdict_topic
        self.dlq_topic = dlq_topic
        self.fail_publishes = 0

    async def publish(self, outcomes: Sequence[Outcome[Any]]) -> None:
        await asyncio.sleep(0)
        if self.fail_publishes > 0:
            self.fail_publishes -= 1
            raise ConnectionError("memory broker refused the produce request")
        for outcome in outcomes:
            topic = self.verdict_topic if outcome.verdict is not None else self.dlq_topic
            self.broker.produce(topic, encode_outcome(outcome), key=outcome.event.key)


class OffsetTracker:
    """Commits, per partition, only the contiguous prefix of acknowledged offsets."""

    def __init__(self, broker: MemoryBroker, group: str, topic: str) -> None:
        self.broker = broker
        self.group = group
        self.topic = topic
        self._acked: dict[int, set[int]] = defaultdict(set)

    def ack(self, partition: int, offset: int) -> None:
        acked = self._acked[partition]
        acked.add(offset)
        position = self.broker.committed(self.group, self.topic, partition)
        while position in acked:
            acked.discard(position)
            position += 1
        self.broker.commit(self.group, self.topic, partition, position)


class MemoryWorker:
    """One worker of a consumer group: reads from the committed offsets, scores, publishes, acks.

    Example:
        worker = MemoryWorker(broker, "g", "comments", processor, sink, max_wait_s=0.01)
        await worker.run_until_idle()
    """

    def __init__(
        self,
        broker: MemoryBroker,
        group: str,
        input_topic: str,
        processor: BatchProcessor,
        sink: MemorySink,
        *,
        max_wait_s: float = 0.01,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        observer: PipelineObserver[Record] | None = None,
    ) -> None:
        self.broker = broker
        self.group = group
        self.input_topic = input_topic
        self.max_text_chars = max_text_chars
        self.offsets = OffsetTracker(broker, group, input_topic)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-model")
        self.pipeline: BatchPipeline[Record] = BatchPipeline(
            processor,
            sink,
            self._ack,
            max_wait_s=max_wait_s,
            executor=self._executor,
            observer=observer,
            retry_backoff_s=0.01,
        )
        self._runner: asyncio.Task[None] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._positions = {
            p: broker.committed(group, input_topic, p)
            for p in range(broker.partitions(input_topic))
        }

    def _ack(self, event: InputEvent[Record]) -> None:
        self.offsets.ack(event.handle.partition, event.handle.offset)

    async def start(self) -> None:
        """Start consuming and flushing in the background (like a worker joining its group)."""
        self._runner = asyncio.create_task(self.pipeline.run())
        self._consumer = asyncio.create_task(self._consume_forever())

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Return once every record in the topic is acknowledged; raise if the pipeline failed."""

        async def _idle() -> None:
            while True:
                for task in (self._runner, self._consumer):
                    if task is not None and task.done():
                        task.result()  # re-raises PipelineFailure
                caught_up = all(
                    pos >= len(self.broker.log(self.input_topic, p))
                    for p, pos in self._positions.items()
                )
                if caught_up and self.pipeline.idle:
                    return
                await asyncio.sleep(0.001)

        await asyncio.wait_for(_idle(), timeout)

    async def kill(self) -> None:
        """Stop abruptly, like SIGKILL: nothing in flight is acknowledged or flushed."""
        for task in (self._consumer, self._runner):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._consumer, self._runner) if t is not None), return_exceptions=True
        )
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def run_until_idle(self, timeout: float = 10.0) -> None:
        """Consume everything there is, wait until it is acknowledged, then stop."""
        await self.start()
        try:
            await self.wait_idle(timeout)
        finally:
            await self.kill()

    async def _consume_forever(self) -> None:
        while True:
            for partition, position in self._positions.items():
                for record in self.broker.log(self.input_topic, partition)[position:]:
                    event = admit(
                        record.value,
                        key=record.key,
                        source=SourcePosition(record.topic, record.partition, record.offset),
                        handle=record,
                        received_at=time.monotonic(),
                        produced_at=record.timestamp,
                        max_text_chars=self.max_text_chars,
                    )
                    await self.pipeline.submit(event)
                    self._positions[partition] = record.offset + 1
            await asyncio.sleep(0.001)

"""An in-process stand-in for Kafka, so the at-least-once rules run in milliseconds in tests.

Faust's own test utilities feed an agent directly and mock the producer, which is useless for
the question that matters here: which offsets end up committed when a batch fails or the worker
dies. `MemoryBroker` keeps partitioned logs and per-group committed offsets; `MemoryWorker`
consumes them through the same `BatchPipeline` the Faust worker uses, and commits acknowledged
offsets by Faust's own rule (`OffsetTracker` runs Faust's consumer code, see there), so an ack
that overtakes an earlier event commits past it here exactly as it would in the real worker.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from faust.transport.consumer import Consumer as _FaustConsumer
from faust.types import TP
from intervaltree import IntervalTree

from adapters.codecs import build_record
from moderation_worker.batching import InputEvent, Outcome, admit
from moderation_worker.events import DEFAULT_MAX_TEXT_CHARS, SourcePosition
from moderation_worker.pipeline import BatchPipeline, PipelineObserver
from moderation_worker.processor import BatchProcessor


@dataclass(frozen=True)
class Record:
    """One record in a partition log."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float
    headers: tuple[tuple[str, bytes], ...] = ()


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
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> Record:
        """Append a record; without a partition, the key picks one (stable hash), like Kafka."""
        self.create_topic(topic)
        logs = self._logs[topic]
        if partition is None:
            partition = zlib.crc32(key) % len(logs) if key is not None else 0
        offset = len(logs[partition])
        record = Record(topic, partition, offset, key, value, time.time(), tuple(headers))
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
            record = build_record(outcome)  # the same record the Faust sink sends
            self.broker.produce(topic, record.value, key=record.key, headers=record.headers)


@dataclass(eq=False)  # hashable by identity, like Faust's messages (it keeps them in a set)
class _AckedMessage:
    """The fields of a Faust `Message` that `Consumer.ack` reads and writes."""

    topic: str
    partition: int
    offset: int
    acked: bool = False

    @property
    def tp(self) -> TP:
        return TP(self.topic, self.partition)


class FaustOffsetRule:
    """Faust's consumer offset bookkeeping, run on Faust's own code (faust-streaming 0.15).

    The methods *are* `faust.transport.consumer.Consumer`'s (`ack`, `_new_offset`,
    `_should_commit`, `_filter_committable_offsets`), bound to an object holding just the state
    they use, initialised as `Consumer.__init__` and `Consumer.perform_seek` do. Their rule is
    not "the contiguous run of acks after the last commit": per partition, Faust commits the
    first run of consecutive acked offsets, checking the gap to the committed offset only when
    one is known and non-zero, and then only for a gap of two or more. So on a fresh partition
    an ack of offset 3 alone commits 4, and with 10 committed an ack of 11 alone commits 12:
    an ack that overtakes an earlier event commits past it.
    """

    ack = _FaustConsumer.ack
    _new_offset = _FaustConsumer._new_offset
    _should_commit = _FaustConsumer._should_commit
    _filter_committable_offsets = _FaustConsumer._filter_committable_offsets

    def __init__(self) -> None:
        # As `Consumer.__init__`:
        self._acked: dict[TP, list[int]] = defaultdict(list)
        self._acked_index: dict[TP, set[int]] = defaultdict(set)
        self._gap: dict[TP, IntervalTree] = defaultdict(IntervalTree)
        self._committed_offset: dict[TP, int | None] = defaultdict(lambda: None)
        self._unacked_messages: set[Any] = set()
        self._waiting_for_ack: asyncio.Future[None] | None = None
        self._n_acked = 0
        # `Consumer.ack` asks the conductor whether the topic is acked; ours always is.
        self.app = SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: True))

    def seek_committed(self, tp: TP, committed: int) -> None:
        """What `Consumer.perform_seek` records for a partition's committed offset (0 -> None)."""
        self._committed_offset[tp] = committed if committed else None

    def ack_offset(self, tp: TP, offset: int) -> bool:
        return bool(self.ack(_AckedMessage(tp.topic, tp.partition, offset)))  # type: ignore[arg-type]

    def commit(self, tp: TP) -> int | None:
        """The offset Faust would commit for `tp` now (and records it as committed), or None."""
        offsets = self._filter_committable_offsets([tp])
        self._committed_offset.update(offsets)  # as `Consumer._commit_offsets`
        return offsets.get(tp)


class OffsetTracker:
    """Commits acknowledged offsets the way the Faust worker does (see `FaustOffsetRule`).

    Faust commits on a timer and every `broker_commit_every` acks; this tracker commits after
    every ack, the most adversarial timing: whatever Faust could commit at some instant, it
    commits at once.
    """

    def __init__(self, broker: MemoryBroker, group: str, topic: str) -> None:
        self.broker = broker
        self.group = group
        self.topic = topic
        self.rule = FaustOffsetRule()
        for partition in range(broker.partitions(topic)):
            tp = TP(topic, partition)
            self.rule.seek_committed(tp, broker.committed(group, topic, partition))

    def ack(self, partition: int, offset: int) -> None:
        tp = TP(self.topic, partition)
        self.rule.ack_offset(tp, offset)
        new_offset = self.rule.commit(tp)
        if new_offset is not None:
            self.broker.commit(self.group, self.topic, partition, new_offset)


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
                        headers=record.headers,
                    )
                    await self.pipeline.submit(event)
                    self._positions[partition] = record.offset + 1
            await asyncio.sleep(0.001)

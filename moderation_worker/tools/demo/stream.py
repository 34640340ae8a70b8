"""Producing the demo's events and reading every verdict and dead letter back, matched to the
input record each one names by (partition, offset)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from adapters.kafka_admin import kafka_consumer, kafka_producer
from moderation_worker.settings import Settings
from moderation_worker.tools.demo.config import DemoError
from moderation_worker.tools.demo.inputs import DemoInput
from moderation_worker.tools.demo.progress import Console
from moderation_worker.tools.worker_process import WorkerProcessError

Position = tuple[int, int]  # (partition, offset) of an input record


@dataclass
class ReadBack:
    """The first verdict or dead letter read for one input record."""

    kind: str  # "verdict" | "dead_letter"
    value: dict[str, Any]
    received_at: float


@dataclass
class StreamResult:
    """What happened to every produced event (indexes follow `DemoInput.events`)."""

    sent_at: dict[int, float] = field(default_factory=dict)
    positions: dict[int, Position] = field(default_factory=dict)
    outcomes: dict[Position, ReadBack] = field(default_factory=dict)
    duplicates: int = 0
    timed_out: bool = False
    paused_s: float = 0.0  # producing held for the midway step, the worker idle meanwhile

    def outcome(self, index: int) -> ReadBack | None:
        position = self.positions.get(index)
        return None if position is None else self.outcomes.get(position)

    def missing(self, n_events: int) -> list[int]:
        return [i for i in range(n_events) if self.outcome(i) is None]


async def stream_events(
    settings: Settings,
    demo_input: DemoInput,
    *,
    rate: float | None,
    timeout_s: float,
    console: Console,
    check_worker: Callable[[], None] = lambda: None,
    midway: Callable[[int], Awaitable[None]] | None = None,
    split: int | None = None,
) -> StreamResult:
    """Produce every event and read outcomes until each one has one, or `timeout_s` passes.

    With `midway`, producing stops after the first `split` events (default: half) until each
    of them has its outcome, then awaits `midway(split)` (the demo's live change) and goes on;
    the time `midway` takes is `paused_s`, and a paced stream (`rate`) resumes its pace after it.

    The reader assigns all partitions of both output topics and seeks to the beginning before
    the first event is sent: Tansu 0.6.0 answers ListOffsets LATEST wrongly, so "latest" could
    skip outcomes, and on the fresh (or per-run) topics the beginning is exactly where ours start.
    Both clients connect as the worker does (`settings`' security included).
    """
    from aiokafka import TopicPartition

    events = demo_input.events
    result = StreamResult()
    index_of: dict[Position, int] = {}
    settled: set[int] = set()
    counts: Counter[str] = Counter()
    split = len(events) // 2 if split is None else split
    first_part_done = asyncio.Event()
    early = [0]  # how many of the first `split` events are settled
    if split <= 0:
        first_part_done.set()

    consumer = kafka_consumer(
        settings,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=20,  # our own wait must not count as pipeline latency
        metadata_max_age_ms=1000,
    )
    producer = kafka_producer(settings, linger_ms=5, acks="all")
    await consumer.start()
    await producer.start()
    produce_bar = console.bar(total=len(events), desc="producing", unit="ev", position=0)
    outcome_bar = console.bar(
        total=len(events), desc="verdicts+dead letters", unit="ev", position=1
    )
    try:
        await consumer.topics()  # metadata for every topic, so partitions_for_topic answers
        partitions = []
        for topic in (settings.verdict_topic, settings.dlq_topic):
            ids = consumer.partitions_for_topic(topic)
            if not ids:
                raise DemoError(f"topic {topic!r} does not exist on the broker")
            partitions += [TopicPartition(topic, p) for p in sorted(ids)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)

        def settle(index: int) -> None:
            if index not in settled and result.outcome(index) is not None:
                settled.add(index)
                outcome_bar.update(1)
                early[0] += index < split
                if early[0] == split:
                    first_part_done.set()

        def placed(index: int, future: asyncio.Future[Any]) -> None:
            if future.cancelled() or future.exception() is not None:
                return
            metadata = future.result()
            position = (metadata.partition, metadata.offset)
            result.positions[index] = position
            index_of[position] = index
            produce_bar.update(1)
            settle(index)

        async def produce() -> None:
            started = time.monotonic()
            pending = []
            for i, event in enumerate(events):
                if midway is not None and i == split:
                    held = time.monotonic()
                    await first_part_done.wait()
                    idle = time.monotonic()
                    await midway(split)
                    result.paused_s = time.monotonic() - idle
                    started += time.monotonic() - held  # the pace goes on where it stopped
                if rate:
                    delay = started + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                result.sent_at[i] = time.time()
                future = await producer.send(settings.input_topic, event.value, key=event.key)
                future.add_done_callback(lambda f, i=i: placed(i, f))
                pending.append(future)
            await asyncio.gather(*pending)

        console.say(
            f"producing {len(events)} events to {settings.input_topic!r}"
            + (f" at {rate:g}/s" if rate else "")
            + f"; reading {settings.verdict_topic!r} and {settings.dlq_topic!r}"
        )
        producing = asyncio.ensure_future(produce())
        deadline = time.monotonic() + timeout_s
        try:
            while not (producing.done() and len(settled) == len(events)):
                if producing.done() and producing.exception() is not None:
                    exc = producing.exception()
                    if isinstance(exc, (DemoError, WorkerProcessError)):
                        raise exc  # the midway step's own message
                    raise DemoError(f"producing failed: {exc!r}")
                if time.monotonic() > deadline:
                    result.timed_out = True
                    break
                check_worker()
                batch = await consumer.getmany(timeout_ms=100)
                now = time.time()
                for tp, messages in batch.items():
                    kind = "verdict" if tp.topic == settings.verdict_topic else "dead_letter"
                    for message in messages:
                        value = orjson.loads(message.value)
                        source = value.get("source") or {}
                        if source.get("topic") != settings.input_topic:
                            continue
                        position = (int(source["partition"]), int(source["offset"]))
                        if position in result.outcomes:
                            result.duplicates += 1
                            continue
                        result.outcomes[position] = ReadBack(kind, value, now)
                        counts[kind] += 1
                        if position in index_of:
                            settle(index_of[position])
                outcome_bar.set_postfix(
                    verdicts=counts["verdict"], dead_letters=counts["dead_letter"], refresh=False
                )
        finally:
            if not producing.done():
                producing.cancel()
            await asyncio.gather(producing, return_exceptions=True)
    finally:
        produce_bar.close()
        outcome_bar.close()
        await producer.stop()
        await consumer.stop()
    return result

"""Measure the worker end to end through a real broker: events/s, batch fill, latency.

`measure_pipeline` runs one worker in this process (so any `ProbabilityModel` object can be
measured, the trivial scorer for the pipeline's own ceiling or the real classifier), feeds it
from a separate thread with its own event loop, and times every comment from the moment it is
sent to the moment its verdict (or dead letter) is read back from the broker.

Two modes:
* `rate=None` (throughput): the input topic is filled first, then the worker drains it; events/s
  is measured from the moment the worker is ready to the last output. Latency here mostly
  measures queueing in the backlog.
* `rate=R` (latency): events are sent at R per second while the worker runs; p50/p99 are the
  latencies a consumer of verdicts sees at that load.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import faust
import orjson

from adapters.faust_app import build_app, worker_state
from adapters.kafka_admin import create_topics, kafka_consumer, kafka_producer
from adapters.tansu import free_port
from moderation_worker.settings import Settings
from moderation_worker.tools.data import FILLER_WORDS
from moderation_worker.verdicts import ProbabilityModel


class _InProcessWorker(faust.Worker):
    """A Faust worker that leaves signals and logging to the host process."""

    def install_signal_handlers(self) -> None:
        pass


def bench_texts(n: int, seed: int = 0) -> list[str]:
    """Deterministic comment texts of 5 to 40 words."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(FILLER_WORDS, k=rng.randint(5, 40))) for _ in range(n)]


def measure_pipeline(
    settings: Settings,
    model: ProbabilityModel,
    n_events: int,
    rate: float | None = None,
    *,
    timeout_s: float = 300.0,
    fetch_max_wait_ms: int | None = None,
) -> dict[str, Any]:
    """Run a worker on fresh topics of `settings.broker_url` and return the figures.

    Topic names and the consumer group get a unique suffix so repeated runs never read old
    records. Returns events/s, batch fill ratio, p50/p99 end-to-end latency (seconds), and the
    numbers of verdicts, dead letters, duplicates and missing outputs.

    `fetch_max_wait_ms` shortens the worker consumer's fetch wait (Faust hard-codes 1500 ms).
    Only for brokers that do not answer a waiting fetch when records arrive, such as Tansu
    0.6.0, where every hop otherwise waits out the whole fetch wait; Apache Kafka needs no
    such help.
    """
    tag = uuid.uuid4().hex[:8]
    run = settings.model_copy(
        update={
            "app_id": f"{settings.app_id}-bench-{tag}",
            "input_topic": f"{settings.input_topic}-bench-{tag}",
            "verdict_topic": f"{settings.verdict_topic}-bench-{tag}",
            "dlq_topic": f"{settings.dlq_topic}-bench-{tag}",
            "web_port": free_port(),
            "metrics_port": None,
        }
    )
    with _worker_fetch_wait(fetch_max_wait_ms):
        result = asyncio.run(_measure(run, model, n_events, rate, timeout_s))
    result["fetch_max_wait_ms"] = fetch_max_wait_ms or 1500
    return result


@contextlib.contextmanager
def _worker_fetch_wait(ms: int | None) -> Iterator[None]:
    """Temporarily give Faust's worker consumer a shorter fetch.max.wait (a broker workaround)."""
    if ms is None:
        yield
        return
    from faust.transport.drivers import aiokafka as driver

    original = driver.AIOKafkaConsumerThread._create_worker_consumer

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = ms  # read when the consumer starts its fetcher
        return consumer

    driver.AIOKafkaConsumerThread._create_worker_consumer = create  # type: ignore[method-assign]
    try:
        yield
    finally:
        driver.AIOKafkaConsumerThread._create_worker_consumer = original  # type: ignore[method-assign]


async def _measure(
    settings: Settings,
    model: ProbabilityModel,
    n_events: int,
    rate: float | None,
    timeout_s: float,
) -> dict[str, Any]:
    await create_topics(settings, [settings.input_topic])
    events = [
        (f"u{i % 97}".encode(), orjson.dumps({"id": f"b{i}", "text": text}))
        for i, text in enumerate(bench_texts(n_events))
    ]
    sent: dict[str, float] = {}
    if rate is None:
        await _produce(settings, events, None, sent)

    app = build_app(settings, model)
    state = worker_state(app)
    worker = _InProcessWorker(
        app, loop=asyncio.get_running_loop(), quiet=True, override_logging=False
    )
    worker.spinner = None
    worker_task = asyncio.ensure_future(worker.start())
    try:
        deadline = time.monotonic() + 60
        while not (state.ready and app.consumer.assignment() and not app.rebalancing):
            if worker_task.done():
                worker_task.result()
                raise RuntimeError("worker stopped before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError("worker not ready within 60 s")
            await asyncio.sleep(0.05)
        ready_at = time.time()

        received: dict[str, float] = {}
        counts = {"verdicts": 0, "dead_letters": 0}
        feeder = threading.Thread(
            target=lambda: asyncio.run(
                _feed_and_collect(
                    settings,
                    events if rate is not None else [],
                    rate,
                    sent,
                    received,
                    counts,
                    n_events,
                    timeout_s,
                )
            ),
            name="bench-feeder",
            daemon=True,
        )
        feeder.start()
        await asyncio.to_thread(feeder.join)
    finally:
        await worker.stop()
        worker_task.cancel()
        await asyncio.gather(worker_task, return_exceptions=True)
        state.executor.shutdown(wait=False, cancel_futures=True)

    latencies = sorted(received[i] - sent[i] for i in received if i in sent)
    start = ready_at if rate is None else min(sent.values())
    window = (max(received.values()) - start) if received else float("nan")
    reg = state.metrics.registry
    fill_sum = reg.get_sample_value("moderation_batch_fill_ratio_sum") or 0.0
    fill_count = reg.get_sample_value("moderation_batch_fill_ratio_count") or 0.0
    return {
        "mode": "throughput" if rate is None else "paced",
        "n_events": n_events,
        "rate": rate,
        "events_per_s": len(received) / window if received else 0.0,
        "window_s": window,
        "fill_ratio": fill_sum / fill_count if fill_count else 0.0,
        "batches": int(fill_count),
        "latency_p50_s": _percentile(latencies, 0.50),
        "latency_p99_s": _percentile(latencies, 0.99),
        "verdicts": counts["verdicts"],
        "dead_letters": counts["dead_letters"],
        "duplicates": counts["verdicts"] + counts["dead_letters"] - len(received),
        "missing": n_events - len(received),
        "batch_size": settings.batch_size,
        "max_wait_ms": settings.max_wait_ms,
        "partitions": settings.input_partitions,
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def _produce(
    settings: Settings,
    events: list[tuple[bytes, bytes]],
    rate: float | None,
    sent: dict[str, float],
) -> None:
    """Send `events` to the input topic (at `rate`/s when given), noting when each was sent."""
    producer = kafka_producer(settings, linger_ms=2)
    await producer.start()
    try:
        started = time.monotonic()
        pending = []
        for i, (key, value) in enumerate(events):
            if rate is not None:
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            sent[f"b{i}"] = time.time()
            pending.append(await producer.send(settings.input_topic, key=key, value=value))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def _feed_and_collect(
    settings: Settings,
    events: list[tuple[bytes, bytes]],
    rate: float | None,
    sent: dict[str, float],
    received: dict[str, float],
    counts: dict[str, int],
    n_events: int,
    timeout_s: float,
) -> None:
    consumer = kafka_consumer(
        settings,
        settings.verdict_topic,
        settings.dlq_topic,
        group_id=None,
        auto_offset_reset="earliest",
        metadata_max_age_ms=500,
        fetch_max_wait_ms=20,  # the reader's own wait must not count as pipeline latency
    )
    await consumer.start()
    feeder = asyncio.ensure_future(_produce(settings, events, rate, sent))
    deadline = time.monotonic() + timeout_s
    try:
        while len(received) < n_events and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=100)
            now = time.time()
            for tp, messages in batch.items():
                kind = "verdicts" if tp.topic == settings.verdict_topic else "dead_letters"
                for message in messages:
                    counts[kind] += 1
                    event_id = orjson.loads(message.value).get("id")
                    if event_id is not None:
                        received.setdefault(event_id, now)
        await feeder
    finally:
        feeder.cancel()
        await consumer.stop()

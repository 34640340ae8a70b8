"""Hardening through a real Kafka-protocol broker (embedded Tansu, or MODERATION_TEST_BROKER).

The hostile corpus, a hung model, a stop signal mid-batch and a rebalance mid-batch, each
against a worker process started exactly as `moderation-worker worker` starts it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import orjson
import pytest

from moderation_worker import schemas
from tests.fixtures_broker import (
    BrokerInfo,
    TopicSet,
    WorkerProcess,
    comment,
    committed_offsets,
    create_topics,
    produce,
    read_outputs,
    worker_env,
)
from tests.hostile_corpus import CORPUS, TRACEPARENT, VERDICT
from tests.test_worker_broker import assert_nothing_committed_without_output, wait_for_commit

pytestmark = pytest.mark.broker


def watch_until_exit(worker: WorkerProcess, timeout: float, why: str) -> dict[str, Any] | None:
    """Poll `/health` until the worker process exits; the last 503 body that gave a reason."""
    saw_503 = None
    deadline = time.monotonic() + timeout
    while worker.proc is not None and worker.proc.poll() is None:
        health = worker.health()
        if health is not None and health[0] == 503 and "reason" in health[1]:
            saw_503 = health[1]
        assert time.monotonic() < deadline, why
        time.sleep(0.1)
    assert worker.proc is not None and worker.proc.returncode != 0
    return saw_503


@dataclass
class Record:
    topic: str
    key: bytes | None
    value: dict[str, Any]
    headers: dict[str, bytes] = field(default_factory=dict)


async def read_records(
    broker: BrokerInfo, topics: TopicSet, n: int, timeout: float
) -> list[Record]:
    """Both output topics from the start, with keys and headers, until `n` records or timeout."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topics.verdicts,
        topics.dlq,
        bootstrap_servers=broker.bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        metadata_max_age_ms=500,
        fetch_max_bytes=8_000_000,
        max_partition_fetch_bytes=4_000_000,
    )
    await consumer.start()
    out: list[Record] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            for tp, messages in (await consumer.getmany(timeout_ms=200)).items():
                for m in messages:
                    out.append(
                        Record(tp.topic, m.key, orjson.loads(m.value), dict(m.headers or ()))
                    )
    finally:
        await consumer.stop()
    return out


async def test_hostile_corpus_through_the_broker_one_valid_output_each_and_the_worker_stays_up(
    broker: BrokerInfo, topics: TopicSet, spawn_worker: Any
) -> None:
    await create_topics(broker, [topics.input], partitions=1)
    worker: WorkerProcess = spawn_worker(
        worker_env(broker, topics, partitions=1), scorer={"poison_marker": "POISON"}
    )
    worker.wait_ready()
    positions = await produce(
        broker,
        topics.input,
        [(c.key, c.value, c.headers) for c in CORPUS],
        partition=0,
        max_request_size=2_000_000,
    )
    records = await read_records(broker, topics, len(CORPUS), timeout=60)
    await asyncio.sleep(0.5)
    assert len(records) == len(CORPUS), worker.log_tail()

    by_offset = {r.value["source"]["offset"]: r for r in records}
    assert len(by_offset) == len(CORPUS), "exactly one output per input"
    checker = jsonschema.FormatChecker()
    for case, (_, offset) in zip(CORPUS, positions, strict=True):
        record = by_offset[offset]
        is_verdict = record.topic == topics.verdicts
        got = VERDICT if is_verdict else record.value["reason"]
        assert got == case.expect, (case.name, record.value)
        schema = schemas.load("verdict" if is_verdict else "dead-letter")
        jsonschema.validate(record.value, schema, format_checker=checker)
        assert record.headers["x-moderation-outcome"] == (
            b"verdict" if is_verdict else b"dead_letter"
        )
        if ("traceparent", TRACEPARENT) in case.headers:
            assert record.headers["traceparent"] == TRACEPARENT
        if case.key is not None and len(case.key) > 4096:
            assert record.key is not None and record.key.startswith(b"sha256:")
        else:
            assert record.key == case.key
        if is_verdict:
            assert record.value["latency_ms"] >= 0

    status, body = worker.health()
    assert status == 200 and body["status"] == "ready", "the worker stayed up"
    await wait_for_commit(broker, topics, 1, len(CORPUS))
    committed = await committed_offsets(broker, topics.app_id, topics.input, 1)
    assert committed[0] == len(CORPUS)
    for page in ("/router", "/table", "/graph"):  # Faust's debug pages are off
        with pytest.raises(Exception, match="404"):
            worker.get(page)


async def test_a_hung_model_turns_health_503_then_stops_the_worker_with_nothing_acked(
    broker: BrokerInfo, topics: TopicSet, spawn_worker: Any
) -> None:
    await create_topics(broker, [topics.input], partitions=1)
    env = worker_env(broker, topics, partitions=1, model_timeout_s=1.5, shutdown_timeout_s=5)
    worker: WorkerProcess = spawn_worker(env, scorer={"hang_marker": "HANG", "hang_s": 600})
    worker.wait_ready()
    records = [(b"k", comment(i, "HANG" if i == 3 else None), []) for i in range(6)]
    await produce(broker, topics.input, records, partition=0)

    saw_503 = await asyncio.to_thread(
        watch_until_exit, worker, 30, "a hung model must stop the worker"
    )
    assert saw_503 is not None and saw_503["reason"] == "model_timeout", saw_503
    assert "error" not in saw_503, "no exception text on /health"
    assert any(r.get("reason") == "model_timeout" for r in worker.log_lines())
    out = await read_outputs(broker, topics, idle=1.0)
    await assert_nothing_committed_without_output(broker, topics, 1, out)
    assert "c3" not in out.ids()


async def test_sigterm_mid_batch_finishes_publishes_and_commits_no_duplicates_no_loss(
    broker: BrokerInfo, topics: TopicSet, spawn_worker: Any
) -> None:
    n, partitions = 64, 2
    await create_topics(broker, [topics.input], partitions)
    env = worker_env(broker, topics, partitions=partitions)
    first: WorkerProcess = spawn_worker(env, scorer={"delay_s": 0.6})
    first.wait_ready()
    await produce(
        broker,
        topics.input,
        [(f"u{i % 7}".encode(), comment(i), []) for i in range(n)],
        partition=0,
    )
    await read_outputs(broker, topics, until=lambda o: len(o.all) >= 8, timeout=30)
    first.signal(signal.SIGTERM)  # a batch is in the model now (each call takes 0.6 s)
    assert await asyncio.to_thread(first.wait, 60) == 0
    assert any(r["msg"].startswith("stopping: finishing") for r in first.log_lines())
    partial = await read_outputs(broker, topics, idle=1.0)
    committed = await assert_nothing_committed_without_output(broker, topics, partitions, partial)
    assert sum(committed.values()) == len(partial.all), "everything published was committed"

    second = spawn_worker(env)
    second.wait_ready()
    out = await read_outputs(broker, topics, until=lambda o: len(o.all) >= n, timeout=40)
    await asyncio.sleep(1.0)
    out = await read_outputs(broker, topics, idle=1.0)
    assert sorted(out.sources()) == sorted(set(out.sources())), "no duplicates"
    assert out.ids() == {f"c{i}" for i in range(n)}, "no loss"


async def test_a_rebalance_while_a_batch_is_in_the_model_loses_and_repeats_nothing(
    broker: BrokerInfo, topics: TopicSet, spawn_worker: Any
) -> None:
    n, partitions = 96, 4
    await create_topics(broker, [topics.input], partitions)
    env = worker_env(broker, topics, partitions=partitions)
    a: WorkerProcess = spawn_worker(env, scorer={"delay_s": 0.5})
    a.wait_ready()
    await produce(
        broker,
        topics.input,
        [(f"u{i % 11}".encode(), comment(i), []) for i in range(n)],
        partition=0,
    )
    await read_outputs(broker, topics, until=lambda o: len(o.all) >= 8, timeout=30)
    b: WorkerProcess = spawn_worker(env, scorer={"delay_s": 0.05})  # joins: a rebalance
    out = await read_outputs(broker, topics, until=lambda o: len(o.ids()) >= n, timeout=90)
    await asyncio.sleep(1.0)
    out = await read_outputs(broker, topics, idle=1.0)
    assert out.ids() == {f"c{i}" for i in range(n)}, "no loss"
    assert sorted(out.sources()) == sorted(set(out.sources())), "no duplicates"
    ha, hb = a.health(), b.health()
    assert ha is not None and hb is not None
    assert ha[1]["assigned_partitions"] and hb[1]["assigned_partitions"], "the group split"
    await wait_for_commit(broker, topics, partitions, n)
    await assert_nothing_committed_without_output(broker, topics, partitions, out)


async def test_a_stalled_broker_fails_the_publish_in_time_turns_health_503_and_stops_unacked(
    tmp_path: Any, spawn_worker: Any
) -> None:
    """The broker process is frozen (SIGSTOP) while the worker publishes: without a publish
    limit the worker would wait on Faust's 20-minute producer timeout with /health at 200."""
    from adapters.tansu import TansuBroker

    with TansuBroker() as tansu:
        broker = BrokerInfo(url=tansu.url, bootstrap=tansu.bootstrap, embedded=True)
        topics = TopicSet.fresh()
        await create_topics(broker, [topics.input], partitions=1)
        env = worker_env(broker, topics, partitions=1, publish_timeout_s=2, shutdown_timeout_s=6)
        worker: WorkerProcess = spawn_worker(env, scorer={"delay_s": 0.4})
        worker.wait_ready()
        await produce(
            broker, topics.input, [(b"k", comment(i), []) for i in range(40)], partition=0
        )
        await read_outputs(broker, topics, until=lambda o: len(o.all) >= 8, timeout=30)
        assert tansu._proc is not None
        tansu._proc.send_signal(signal.SIGSTOP)
        try:
            saw_503 = await asyncio.to_thread(
                watch_until_exit, worker, 40, "a stalled broker must stop the worker"
            )
        finally:
            tansu._proc.send_signal(signal.SIGCONT)
        assert saw_503 is not None and saw_503["reason"] == "publish_timeout", saw_503
        out = await read_outputs(broker, topics, idle=1.0)
        await assert_nothing_committed_without_output(broker, topics, 1, out)
        assert len(out.ids()) < 40

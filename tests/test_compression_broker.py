"""Compressed input through a real broker: every codec decodes, an undecodable batch stops the
worker loudly with nothing of it acknowledged.

Producers compress record batches (gzip, snappy, lz4, zstd); the worker's consumer must decode
them all (aiokafka needs `cramjam` for snappy, lz4 and zstd: the `aiokafka[lz4,snappy,zstd]`
dependency). What the broker stores matters for the test to mean anything: the embedded Tansu
0.6.0 keeps each batch exactly as produced (checked below by reading the input topic's raw
batches: one gzip, snappy, lz4, zstd and uncompressed batch each, codec bits intact), so the
worker really decodes every codec; Apache Kafka does the same with its default
`compression.type=producer`.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from tests.fixtures_broker import (
    DISABLE_CODECS_ENV,
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
from tests.test_worker_broker import assert_nothing_committed_without_output, wait_for_commit

pytestmark = pytest.mark.broker

CODECS: list[str | None] = ["gzip", "snappy", "lz4", "zstd", None]
#: Kafka's codec ids (the low three bits of a record batch's attributes).
CODEC_ID = {None: 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


async def stored_codecs(broker: BrokerInfo, topic: str, total: int) -> list[int]:
    """The codec id of every record batch the broker returns for `topic`, as stored."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.consumer import fetcher

    seen: list[int] = []
    memory_records = fetcher.MemoryRecords

    class Spy:
        def __init__(self, data: Any) -> None:
            self._records = memory_records(data)

        def has_next(self) -> bool:
            return bool(self._records.has_next())

        def size_in_bytes(self) -> int:
            return int(self._records.size_in_bytes())

        def next_batch(self) -> Any:
            batch = self._records.next_batch()
            if batch is not None:
                seen.append(batch.compression_type)
            return batch

    fetcher.MemoryRecords = Spy  # type: ignore[assignment,misc]
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=broker.bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    try:
        await consumer.start()
        count, deadline = 0, time.monotonic() + 20
        while count < total and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            count += sum(len(v) for v in batch.values())
        assert count == total
    finally:
        fetcher.MemoryRecords = memory_records  # type: ignore[misc]
        await consumer.stop()
    return seen


async def test_every_codec_decodes_and_each_event_gets_exactly_one_verdict(
    broker: BrokerInfo, topics: TopicSet, spawn_worker: Any
) -> None:
    per_codec, partitions = 12, 2
    await create_topics(broker, [topics.input], partitions)
    worker: WorkerProcess = spawn_worker(worker_env(broker, topics, partitions=partitions))
    worker.wait_ready()

    positions: list[tuple[int, int]] = []
    for n, codec in enumerate(CODECS):
        records = [(f"u{i % 5}".encode(), comment(100 * n + i)) for i in range(per_codec)]
        positions += await produce(broker, topics.input, records, compression_type=codec)
    total = len(positions)
    ids = {f"c{100 * n + i}" for n in range(len(CODECS)) for i in range(per_codec)}

    out = await read_outputs(broker, topics, until=lambda o: len(o.all) >= total, timeout=40)
    await asyncio.sleep(0.5)  # a duplicate would show up by now
    out = await read_outputs(broker, topics, idle=0.5)
    assert not out.dead_letters, out.dead_letters[:2]
    assert sorted(out.sources()) == sorted(positions), "exactly one verdict per event"
    assert out.ids() == ids

    codecs = await stored_codecs(broker, topics.input, total)
    assert set(codecs) == set(CODEC_ID.values()), f"the broker stored batches as {codecs}"
    await wait_for_commit(broker, topics, partitions, total)
    committed = await assert_nothing_committed_without_output(broker, topics, partitions, out)
    assert sum(committed.values()) == total
    assert worker.stop() == 0


async def test_an_undecodable_batch_stops_the_worker_naming_it_with_nothing_of_it_committed(
    broker: BrokerInfo, topics: TopicSet, spawn_worker: Any
) -> None:
    """The worker acts as if it had no snappy library: a snappy batch at offsets 10-14 (behind
    10 gzip events already scored and committed) must stop it with a log line naming topic,
    partition, offset and codec, `/health` answering 503 with a short reason meanwhile, and no
    commit past offset 10. A worker that has the library then scores everything."""
    await create_topics(broker, [topics.input], partitions=1)
    env = worker_env(broker, topics, partitions=1)
    crippled: WorkerProcess = spawn_worker({**env, DISABLE_CODECS_ENV: "snappy"})
    crippled.wait_ready()

    await produce(
        broker, topics.input, [(b"k", comment(i)) for i in range(10)], compression_type="gzip"
    )
    await read_outputs(broker, topics, until=lambda o: len(o.all) >= 10, timeout=30)
    assert await wait_for_commit(broker, topics, 1, 10) == {0: 10}

    snappy = await produce(
        broker, topics.input, [(b"k", comment(i)) for i in range(10, 15)], compression_type="snappy"
    )
    assert snappy == [(0, o) for o in range(10, 15)]
    await produce(
        broker, topics.input, [(b"k", comment(i)) for i in range(15, 20)], compression_type="gzip"
    )

    deadline, health = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        health = crippled.health()
        if health is not None and health[0] == 503:
            break
        assert crippled.proc is not None and crippled.proc.poll() is None, crippled.log_tail()
        await asyncio.sleep(0.05)
    assert health is not None and health[0] == 503, health
    status, body = health
    assert body["status"] == "failed" and body["reason"] == "unsupported_codec"
    text = json.dumps(body)
    assert "Traceback" not in text and "File " not in text and len(text) < 1_000

    rc = await asyncio.to_thread(crippled.wait, 60)
    assert rc != 0, "an undecodable batch must stop the worker"
    (line,) = [r for r in crippled.log_lines() if r["msg"].startswith("record batch cannot be")]
    assert (line["topic"], line["partition"], line["offset"]) == (topics.input, 0, 10)
    assert line["codec"] == "snappy" and line["batch_offsets"] == [10, 14]
    assert line["reason"] == "unsupported_codec" and "snappy" in line["error"]

    out = await read_outputs(broker, topics, idle=1.0)
    assert sorted(out.sources()) == [(0, o) for o in range(10)], "nothing of the batch scored"
    assert await committed_offsets(broker, topics.app_id, topics.input, 1) == {0: 10}
    await assert_nothing_committed_without_output(broker, topics, 1, out)

    healthy = spawn_worker(env)
    healthy.wait_ready()
    out = await read_outputs(broker, topics, until=lambda o: len(o.ids()) >= 20, timeout=40)
    assert out.ids() == {f"c{i}" for i in range(20)}
    await wait_for_commit(broker, topics, 1, 20)
    committed = await assert_nothing_committed_without_output(broker, topics, 1, out)
    assert committed == {0: 20}

"""Fixtures for Kafka-protocol brokers, and helpers to drive real worker processes against them.

`broker` starts the embedded Tansu broker once per test session, unless the environment
variable `MODERATION_TEST_BROKER` names a real broker (`kafka://host:9092`), so the same tests
run against Apache Kafka. Each test gets fresh topic names and a fresh consumer group.

Tansu 0.6.0 quirks handled here, not in the product:
* every group join waits about half the session timeout, and a member leaving from generation 0
  sends no LeaveGroup, so the next join waits for its session to expire: workers under test use
  3 s session / 0.5 s heartbeat / 3 s rebalance timeouts (6 / 1 / 6 s against Apache Kafka,
  whose minimum session timeout is 6 s; production keeps Faust's defaults);
* a waiting fetch is not answered when records arrive, so every hop waits out the consumer's
  fetch.max.wait: latency figures on Tansu need `measure_pipeline(fetch_max_wait_ms=...)`;
* InitProducerId fails (UnknownError), so idempotent and transactional producers, and with
  them `exactly_once`, can only be tested against a real Kafka;
* `list_consumer_group_offsets` fails to decode, so committed offsets are read with
  `AIOKafkaConsumer.committed()`;
* ListOffsets LATEST can be wrong, so readers here always start from the earliest offset.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters import kafka_admin
from adapters.kafka_admin import aiokafka_bootstrap
from adapters.tansu import TansuBroker, free_port
from moderation_worker.settings import Settings
from moderation_worker.tools import worker_process

REPO_ROOT = Path(__file__).resolve().parent.parent
BROKER_ENV = "MODERATION_TEST_BROKER"
SCORER_ENV = "MODERATION_TEST_SCORER"
#: Comma-separated codecs (snappy, lz4, zstd, gzip) a worker subprocess must act as if it had no
#: library for: `aiokafka.codec.has_<codec>()` answers False there, the check aiokafka's record
#: batches (pure Python and compiled alike) make before decompressing.
DISABLE_CODECS_ENV = "MODERATION_TEST_DISABLE_CODECS"

#: Consumer-group timing for tests (see the module docstring). Apache Kafka refuses session
#: timeouts below its `group.min.session.timeout.ms` (6 s by default), hence two sets.
TANSU_GROUP_TIMING = {
    "session_timeout_s": 3.0,
    "heartbeat_interval_s": 0.5,
    "rebalance_timeout_s": 3.0,
}
KAFKA_GROUP_TIMING = {
    "session_timeout_s": 6.0,
    "heartbeat_interval_s": 1.0,
    "rebalance_timeout_s": 6.0,
}


@dataclass(frozen=True)
class BrokerInfo:
    """Where the test broker listens, in both URL spellings."""

    url: str  # kafka://host:port (Faust)
    bootstrap: str  # host:port (aiokafka)
    embedded: bool

    @property
    def group_timing(self) -> dict[str, float]:
        """Short consumer-group timeouts this broker accepts (Settings field -> value)."""
        return TANSU_GROUP_TIMING if self.embedded else KAFKA_GROUP_TIMING


#: A record to produce with headers: (key, value, [(name, value), ...]).
RecordWithHeaders = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


@pytest.fixture(scope="session")
def broker() -> Iterator[BrokerInfo]:
    url = os.environ.get(BROKER_ENV)
    if url:
        yield BrokerInfo(url=url, bootstrap=aiokafka_bootstrap(url), embedded=False)
        return
    with TansuBroker() as tansu:
        yield BrokerInfo(url=tansu.url, bootstrap=tansu.bootstrap, embedded=True)


@dataclass(frozen=True)
class TopicSet:
    """Fresh names for one test, so tests sharing a broker never see each other's records."""

    app_id: str
    input: str
    verdicts: str
    dlq: str
    control: str = ""

    @classmethod
    def fresh(cls) -> TopicSet:
        tag = uuid.uuid4().hex[:8]
        return cls(
            f"mw-{tag}",
            f"comments-{tag}",
            f"comments-{tag}.verdicts",
            f"comments-{tag}.dlq",
            f"moderation-{tag}.control",
        )


@pytest.fixture
def topics() -> TopicSet:
    return TopicSet.fresh()


def worker_env(
    broker: BrokerInfo, topics: TopicSet, *, partitions: int = 4, **settings: Any
) -> dict[str, str]:
    """`MODERATION_*` environment for a worker process on the test broker."""
    env = {
        "MODERATION_BROKER_URL": broker.url,
        "MODERATION_APP_ID": topics.app_id,
        "MODERATION_INPUT_TOPIC": topics.input,
        "MODERATION_VERDICT_TOPIC": topics.verdicts,
        "MODERATION_DLQ_TOPIC": topics.dlq,
        "MODERATION_CONTROL_TOPIC": topics.control,
        "MODERATION_INPUT_PARTITIONS": str(partitions),
        "MODERATION_BATCH_SIZE": "8",
        "MODERATION_MAX_WAIT_MS": "50",
        "MODERATION_MODEL_RETRIES": "1",
        "MODERATION_MODEL_RETRY_BACKOFF_S": "0.1",
        "MODERATION_LOG_LEVEL": "INFO",
        "MODERATION_COMMIT_INTERVAL_S": "0.5",
        "MODERATION_TOPIC_REPLICATION_FACTOR": "1",
    }
    env.update({f"MODERATION_{k.upper()}": str(v) for k, v in broker.group_timing.items()})
    env.update({f"MODERATION_{k.upper()}": str(v) for k, v in settings.items()})
    return env


# ---------------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------------


def _worker_main() -> None:
    """Entry point of a worker subprocess: settings from the environment, a `TrivialScorer`
    configured by `MODERATION_TEST_SCORER` (JSON keyword arguments)."""
    from adapters.moderation import Moderation
    from moderation_worker.settings import load_settings
    from moderation_worker.tools.trivial_scorer import TrivialClassifierSet, TrivialScorer

    spec = json.loads(os.environ.pop(SCORER_ENV, "{}") or "{}")
    disabled = os.environ.pop(DISABLE_CODECS_ENV, "")
    if disabled:
        import aiokafka.codec

        for codec in filter(None, (c.strip() for c in disabled.split(","))):
            setattr(aiokafka.codec, f"has_{codec}", lambda: False)
    settings = load_settings()
    if "classifiers" in spec:  # several keyword classifiers: routing, shadow, control topic
        model = lambda: TrivialClassifierSet(batch_size=settings.batch_size, **spec)  # noqa: E731
    else:
        model = lambda: TrivialScorer(batch_size=settings.batch_size, **spec)  # noqa: E731
    Moderation(settings, model).run()


class WorkerProcess(worker_process.WorkerProcess):
    """One worker process under test (`_worker_main`), its log captured to a file.

    The launcher is the tools' one, which the demo uses too; this adds the test entry point, the
    `TrivialScorer` spec and the test process's own environment (minus any config file).
    """

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        web_port: int,
        scorer: dict[str, Any] | None = None,
    ) -> None:
        self.scorer = scorer or {}
        full = {**os.environ, **env, SCORER_ENV: json.dumps(self.scorer)}
        full.pop("MODERATION_CONFIG_FILE", None)
        code = "from tests.fixtures_broker import _worker_main; _worker_main()"
        super().__init__(
            full,
            log_path,
            web_port,
            command=[sys.executable, "-c", code],
            cwd=REPO_ROOT,
            append_log=True,
            tail_lines=40,
        )

    def log_lines(self) -> list[dict[str, Any]]:
        """The worker's JSON log records (non-JSON lines are skipped)."""
        return self.log_records()


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[Any]:
    """Factory: `spawn_worker(env, scorer={...})` starts a worker; all are stopped afterwards."""
    started: list[WorkerProcess] = []

    def _spawn(env: dict[str, str], scorer: dict[str, Any] | None = None) -> WorkerProcess:
        n = len(started)
        worker = WorkerProcess(
            env=env,
            log_path=tmp_path / f"worker-{n}.log",
            web_port=free_port(),
            scorer=scorer or {},
        )
        started.append(worker.start())
        return worker

    yield _spawn
    for worker in started:
        worker.stop()


# ---------------------------------------------------------------------------------------------
# Talking to the broker from tests
# ---------------------------------------------------------------------------------------------


async def create_topics(broker: BrokerInfo, names: Iterable[str], partitions: int) -> None:
    """Topics with one replica (`adapters.kafka_admin.create_topics`, as the demo makes them)."""
    settings = Settings(broker_url=broker.url, topic_replication_factor=1)
    await kafka_admin.create_topics(settings, names, partitions=partitions)


async def produce(
    broker: BrokerInfo,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes | None] | RecordWithHeaders],
    *,
    compression_type: str | None = None,
    partition: int | None = None,
    max_request_size: int = 1_048_576,
) -> list[tuple[int, int]]:
    """Send (key, value) or (key, value, headers) records; return their (partition, offset).

    `compression_type` (gzip, snappy, lz4, zstd) compresses each record batch, as real producers
    do; None sends them uncompressed. `partition` pins every record to one partition (by
    default the key picks it).
    """
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap,
        linger_ms=5,
        compression_type=compression_type,
        max_request_size=max_request_size,
    )
    await producer.start()
    try:
        futures = []
        for key, value, *rest in records:
            headers = rest[0] if rest else None
            futures.append(
                await producer.send(
                    topic, key=key, value=value, headers=headers or None, partition=partition
                )
            )
        metadata = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in metadata]


@dataclass
class Outputs:
    """Everything read from the verdict and dead-letter topics."""

    verdicts: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    keys: dict[tuple[str, int, int], bytes | None] = field(default_factory=dict)

    @property
    def all(self) -> list[dict[str, Any]]:
        return self.verdicts + self.dead_letters

    def sources(self) -> list[tuple[int, int]]:
        """(partition, offset) of the input behind every output, duplicates included."""
        return [(o["source"]["partition"], o["source"]["offset"]) for o in self.all]

    def ids(self) -> set[str]:
        return {o["id"] for o in self.all if "id" in o}


async def read_outputs(
    broker: BrokerInfo,
    topics: TopicSet,
    *,
    until: Any = None,
    timeout: float = 30.0,
    idle: float = 0.0,
) -> Outputs:
    """Read both output topics from the start until `until(outputs)` holds (or `idle` seconds
    pass without a new record, or `timeout`)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topics.verdicts,
        topics.dlq,
        bootstrap_servers=broker.bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        metadata_max_age_ms=500,
    )
    await consumer.start()
    out = Outputs()
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for tp, messages in batch.items():
                for m in messages:
                    value = orjson.loads(m.value)
                    (out.verdicts if tp.topic == topics.verdicts else out.dead_letters).append(
                        value
                    )
                    src = value.get("source", {})
                    out.keys[(tp.topic, src.get("partition", -1), src.get("offset", -1))] = m.key
                    last_new = time.monotonic()
            if until is not None and until(out):
                break
            if idle and time.monotonic() - last_new >= idle:
                break
    finally:
        await consumer.stop()
    return out


async def committed_offsets(
    broker: BrokerInfo, group: str, topic: str, partitions: int
) -> dict[int, int]:
    """Committed offset per partition of `group` (0 when none), via `consumer.committed()`."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        out = {}
        for p in range(partitions):
            offset = await consumer.committed(TopicPartition(topic, p))
            out[p] = offset or 0
        return out
    finally:
        await consumer.stop()


def comment(i: int, text: str | None = None, **extra: Any) -> bytes:
    """A valid input event with id `c{i}`."""
    return orjson.dumps({"id": f"c{i}", "text": text or f"comment number {i}", **extra})

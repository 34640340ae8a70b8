"""The control topic on Kafka: create it, follow it into a `ControlState`, publish to it.

Every worker reads the whole compacted topic outside any consumer group (each worker needs every
record, and nothing is committed), applies it in order, and only then starts scoring; it keeps
following the topic after that, so an operator's change reaches the whole fleet in about a
fetch wait. A record the worker cannot apply is logged and counted, never fatal: one bad record
must not stop moderation. The record format is in `moderation_worker/policy.py`.

Example:
    state = ControlState(policy_from_settings(settings))
    reader = ControlTopicReader(settings, settings.control_topic, state)
    await reader.start()          # caught up: state.snapshot() is the fleet's policy
    ...
    await reader.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from adapters.kafka_admin import (
    TOPIC_ALREADY_EXISTS,
    admin_client,
    create_topics,
    kafka_consumer,
    kafka_producer,
)
from moderation_worker.policy import ControlState
from moderation_worker.settings import Settings

log = logging.getLogger("moderation_worker.control")

#: CreateTopics errors of a broker that refuses the topic config (not the topic): retry bare.
_CONFIG_REFUSED = (40, 42, 44)  # InvalidConfig, InvalidRequest, PolicyViolation
#: (offset, key, value) of one control record.
ControlRecord = tuple[int, bytes | None, bytes | None]


class ControlTopicError(RuntimeError):
    """The control topic cannot be read (to its end, in time); the message names the topic."""


async def ensure_control_topic(settings: Settings, topic: str) -> bool:
    """Create the control topic if missing (1 partition, compacted); True if created here.

    One partition keeps every record in one order. A broker that refuses `cleanup.policy=compact`
    gets the topic without it, and a warning: it then only grows, which is harmless at the size
    of a control topic. (Tansu 0.6 accepts the config, and any other, without a word.)
    """
    from aiokafka.admin import NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    admin = admin_client(settings, request_timeout_ms=15_000)
    await admin.start()
    try:
        if topic in set(await admin.list_topics()):
            return False
        compact = {"cleanup.policy": "compact"}
        new = NewTopic(topic, 1, settings.topic_replication_factor, topic_configs=compact)
        try:
            response = await admin.create_topics([new])
        except TopicAlreadyExistsError:
            return False
    finally:
        await admin.close()
    for _, code, *message in getattr(response, "topic_errors", ()):
        if code in _CONFIG_REFUSED:
            log.warning(
                "control topic created without cleanup.policy=compact: the broker refused it",
                extra={"topic": topic, "error": message[0] if message else code},
            )
            return bool(await create_topics(settings, [topic], partitions=1))
        if code not in (0, TOPIC_ALREADY_EXISTS):
            detail = message[0] if message and message[0] else ""
            raise for_code(code)(f"cannot create control topic {topic!r}: {detail}".rstrip(": "))
    return True


async def _assign_all(consumer: Any, topic: str, deadline: float) -> list[Any]:
    """Assign every partition of `topic`, from the beginning; returns them."""
    from aiokafka import TopicPartition

    while not (partitions := consumer.partitions_for_topic(topic)):
        if time.monotonic() > deadline:
            raise ControlTopicError(f"control topic {topic!r}: no partitions in the metadata")
        await consumer.topics()  # refreshes the metadata
        await asyncio.sleep(0.1)
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    return tps


async def _read_to_end(
    consumer: Any, tps: list[Any], handle: Callable[[Any], None], deadline: float, topic: str
) -> None:
    """Hand every record up to the end offsets of `tps` (as they are now) to `handle`."""
    end = await consumer.end_offsets(tps)
    while True:
        behind = {tp: end[tp] for tp in tps if await consumer.position(tp) < end[tp]}
        if not behind:
            return
        if time.monotonic() > deadline:
            at = {tp.partition: await consumer.position(tp) for tp in behind}
            raise ControlTopicError(
                f"control topic {topic!r}: not caught up in time (at {at}, end "
                f"{ {tp.partition: o for tp, o in behind.items()} })"
            )
        batch = await consumer.getmany(*behind, timeout_ms=200)
        for messages in batch.values():
            for message in messages:
                handle(message)


def _consumer(settings: Settings, fetch_max_wait_ms: int) -> Any:
    return kafka_consumer(
        settings,
        group_id=None,  # outside any group: every worker reads everything, commits nothing
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_max_wait_ms,
        metadata_max_age_ms=5_000,
    )


class ControlTopicReader:
    """Reads the control topic into `state`: all of it on `start()`, then every new record.

    Args:
        settings: the worker's settings (broker, security, replication of a created topic).
        topic: the control topic.
        state: the `ControlState` the worker decides under.
        on_record: called with ("applied", None) or ("rejected", reason) per record (metrics).
        fetch_max_wait_ms: how long a fetch waits for new records; bounds how late a change
            arrives on brokers that do not answer a waiting fetch early (Tansu).
    """

    def __init__(
        self,
        settings: Settings,
        topic: str,
        state: ControlState,
        on_record: Callable[[str, str | None], None] | None = None,
        *,
        fetch_max_wait_ms: int = 250,
    ) -> None:
        self.settings, self.topic, self.state = settings, topic, state
        self.on_record = on_record
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.caught_up = False
        self.records_applied = self.records_rejected = 0
        self.last_error: str | None = None
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        """Create the topic if missing, read it to its end, then follow it in the background.

        Raises `ControlTopicError` naming the topic if it cannot be read to the end in time.
        """
        from aiokafka.errors import KafkaError

        deadline = time.monotonic() + timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await ensure_control_topic(self.settings, self.topic)
                self._consumer = _consumer(self.settings, self.fetch_max_wait_ms)
                await self._consumer.start()
                tps = await _assign_all(self._consumer, self.topic, deadline)
                if len(tps) > 1:
                    log.warning(
                        "control topic has several partitions: records of different "
                        "partitions apply in no defined order; recreate it with one",
                        extra={"topic": self.topic, "partitions": len(tps)},
                    )
                await _read_to_end(self._consumer, tps, self._handle, deadline, self.topic)
        except TimeoutError:
            await self._close()
            raise ControlTopicError(
                f"control topic {self.topic!r}: not read to its end within {timeout_s:g} s"
            ) from None
        except KafkaError as exc:
            await self._close()
            raise ControlTopicError(f"control topic {self.topic!r}: {exc!r}") from exc
        except BaseException:
            await self._close()
            raise
        self.caught_up = True
        log.info(
            "control topic read",
            extra={
                "topic": self.topic,
                "version": self.state.snapshot().version,
                "records_applied": self.records_applied,
                "records_rejected": self.records_rejected,
            },
        )
        self._task = asyncio.create_task(self.run(), name=f"control-topic:{self.topic}")

    async def run(self) -> None:
        """Apply new records until `stop()`. A failed fetch is logged and retried: the worker
        keeps deciding under the last state rather than stop moderating (`last_error` says why)."""
        while self._consumer is not None:
            try:
                batch = await self._consumer.getmany(timeout_ms=self.fetch_max_wait_ms)
                self.last_error = None
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("control topic read failed; retrying", extra={"error": self.last_error})
                await asyncio.sleep(1.0)
                continue
            for messages in batch.values():
                for message in messages:
                    self._handle(message)

    def _handle(self, message: Any) -> None:
        try:
            state = self.state.apply(message.key, message.value, message.offset, message.partition)
        except Exception as exc:  # ControlRecordError; anything else is a bug, still not fatal
            self.records_rejected += 1
            result, reason = "rejected", str(exc)
            log.warning(
                "control record rejected",
                extra={"key": _printable(message.key), "offset": message.offset, "reason": reason},
            )
        else:
            self.records_applied += 1
            result, reason = "applied", None
            log.info(
                "control record applied",
                extra={"key": _printable(message.key), "offset": message.offset,
                       "version": state.version},
            )  # fmt: skip
        if self.on_record is not None:
            try:
                self.on_record(result, reason)
            except Exception:  # a metrics hook must never stop the control plane
                log.exception("control topic on_record hook failed")

    async def stop(self) -> None:
        """Stop following; the state keeps the last applied records."""
        task, self._task = self._task, None
        consumer, self._consumer = self._consumer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if consumer is not None:
            await consumer.stop()

    async def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()


def _printable(key: bytes | None) -> str | None:
    return None if key is None else key[:256].decode("utf-8", errors="replace")


async def publish_control(
    settings: Settings, topic: str, key: bytes, value: bytes | None, timeout_s: float = 30.0
) -> int:
    """Publish one control record (acks=all), creating the topic if missing; returns its offset."""
    await ensure_control_topic(settings, topic)
    producer = kafka_producer(settings, acks="all", request_timeout_ms=int(timeout_s * 1000))
    await producer.start()
    try:
        metadata = await asyncio.wait_for(
            producer.send_and_wait(topic, key=key, value=value), timeout_s
        )
    finally:
        await producer.stop()
    return int(metadata.offset)


async def read_control(
    settings: Settings, topic: str, timeout_s: float = 30.0
) -> list[ControlRecord]:
    """Every record now on the control topic, in order ([] when there is no topic)."""
    admin = admin_client(settings)
    await admin.start()
    try:
        if topic not in set(await admin.list_topics()):
            return []
    finally:
        await admin.close()
    records: list[ControlRecord] = []
    consumer = _consumer(settings, fetch_max_wait_ms=100)
    await consumer.start()
    deadline = time.monotonic() + timeout_s
    try:
        tps = await _assign_all(consumer, topic, deadline)
        await _read_to_end(
            consumer, tps, lambda m: records.append((m.offset, m.key, m.value)), deadline, topic
        )
    finally:
        await consumer.stop()
    return records

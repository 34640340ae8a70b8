"""Kafka into the console's state, and the console's two writes back: a threshold (one control
record) and a moderator's label (one record on the labels topic).

The comments, verdict, dead-letter and labels topics are read by one consumer in the console's
own group (`console.group_id`, so its lag shows in the cluster's tools), with every partition
assigned and, on start, positioned `backlog` records before the end (the page has something to
show at once) — the labels topic from its beginning (it is compacted: every decision). The
control topic is followed like a worker follows it, so the page knows the thresholds in force
and checks a change exactly as a worker would before publishing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson

from adapters.control_topic import ControlTopicReader, publish_control
from adapters.kafka_admin import create_topics, kafka_consumer, kafka_producer
from moderation_worker.control_records import (
    decode_record,
    record_for_threshold,
    validate_record,
)
from moderation_worker.events import utc_now
from moderation_worker.loop.labels import ModeratorLabel, label_record
from moderation_worker.policy import ControlState, PolicyState, policy_from_settings
from moderation_worker.settings import Settings
from moderation_worker.tools.console.state import ConsoleState

log = logging.getLogger("moderation_worker.console")


class ConsoleFeed:
    """Follows the topics into `state`; publishes thresholds and labels for the page."""

    def __init__(self, settings: Settings, state: ConsoleState, backlog: int = 500) -> None:
        self.settings, self.state, self.backlog = settings, state, backlog
        self.control = ControlState(policy_from_settings(settings))
        self._reader: ControlTopicReader | None = None
        self._consumer: Any = None
        self._producer: Any = None
        self._task: asyncio.Task[None] | None = None
        self.errors = 0

    def policy(self) -> PolicyState:
        return self.control.snapshot()

    async def start(self) -> None:
        s = self.settings
        topics = [s.input_topic, s.verdict_topic, s.dlq_topic, s.loop.labels_topic]
        await create_topics(s, [s.loop.labels_topic])
        if s.control_topic:
            self._reader = ControlTopicReader(s, s.control_topic, self.control)
            await self._reader.start()
        self._producer = kafka_producer(s, acks="all")
        await self._producer.start()
        self._consumer = kafka_consumer(
            s,
            group_id=s.console.group_id,
            enable_auto_commit=True,
            auto_offset_reset="latest",
            fetch_max_wait_ms=200,
            metadata_max_age_ms=5_000,
        )
        await self._consumer.start()
        await self._assign(topics)
        self._task = asyncio.create_task(self._follow(), name="console-feed")

    async def _assign(self, topics: list[str]) -> None:
        from aiokafka import TopicPartition

        existing = await self._consumer.topics()
        tps = [
            TopicPartition(topic, p)
            for topic in topics
            if topic in existing
            for p in sorted(self._consumer.partitions_for_topic(topic) or ())
        ]
        self._consumer.assign(tps)
        ends = await self._consumer.end_offsets(tps)
        starts = await self._consumer.beginning_offsets(tps)
        for tp in tps:
            if tp.topic == self.settings.loop.labels_topic:
                self._consumer.seek(tp, starts[tp])
            else:
                self._consumer.seek(tp, max(starts[tp], ends[tp] - self.backlog))

    async def _follow(self) -> None:
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=500, max_records=2000)
            except Exception as exc:  # keep showing the last state; say what is wrong
                self.errors += 1
                log.warning("console feed: fetch failed", extra={"error": repr(exc)})
                await asyncio.sleep(1.0)
                continue
            for tp, messages in batch.items():
                for m in messages:
                    try:
                        self._take(tp.topic, m.value)
                    except Exception:  # a record the page cannot show is skipped, counted
                        self.errors += 1

    def _take(self, topic: str, value: bytes | None) -> None:
        s = self.settings
        if value is None:
            return
        data = orjson.loads(value)
        if topic == s.verdict_topic:
            self.state.add_verdict(data)
        elif topic == s.input_topic:
            if isinstance(data.get("id"), str) and isinstance(data.get("text"), str):
                self.state.add_comment(data["id"], data["text"])
        elif topic == s.dlq_topic:
            self.state.add_dead_letter(data)
        elif topic == s.loop.labels_topic:
            label = data.get("label")
            if isinstance(data.get("id"), str) and isinstance(data.get("classifier"), str):
                self.state.add_label(data["classifier"], data["id"], int(bool(label)))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for closer in (self._consumer, self._producer, self._reader):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer.stop()

    # ------------------------------------------------------------------ writes
    async def publish_threshold(
        self,
        user: str,
        classifier: str,
        threshold: float,
        community: str | None,
        reason: str | None,
    ) -> dict[str, Any]:
        """Validate as a worker would (`ControlRecordError` if not), publish, log who."""
        topic = self.settings.control_topic
        if not topic:
            raise ValueError("no control topic is configured: thresholds cannot change live")
        key, value = record_for_threshold(classifier, threshold, community, by=user, reason=reason)
        value = orjson.dumps({**orjson.loads(value or b"{}"), "at": utc_now()})
        validate_record(self.policy(), *decode_record(key, value))
        offset = await publish_control(self.settings, topic, key, value)
        log.info(
            "console: threshold published",
            extra={"user": user, "key": key.decode(), "threshold": threshold, "offset": offset},
        )
        return {"key": key.decode(), "offset": offset, "target_version": offset + 1}

    async def publish_label(
        self, user: str, classifier: str, comment_id: str, label: int
    ) -> dict[str, Any]:
        text = self.state.texts.get(comment_id)
        if text is None:
            raise LookupError(f"the console has not seen the text of comment {comment_id!r}")
        community = next(
            (s.community for s in reversed(self.state.seen) if s.id == comment_id), None
        )
        record = ModeratorLabel(
            comment_id, text, int(label), classifier, community, user, utc_now()
        )
        key, value = label_record(record)
        meta = await self._producer.send_and_wait(self.settings.loop.labels_topic, value, key)
        self.state.add_label(classifier, comment_id, int(label))
        log.info(
            "console: label published",
            extra={"user": user, "id": comment_id, "classifier": classifier, "label": label},
        )
        return {"offset": int(meta.offset)}

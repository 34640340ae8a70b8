"""Outcomes to the broker through the Faust app's own producer.

The pipeline acks an input only after `publish()` returns, so `publish()` returns only once the
broker accepted every record of the batch (or raises, and nothing of the batch is acked).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import faust

from adapters import codecs
from moderation_worker.batching import Outcome
from moderation_worker.events import SourcePosition
from moderation_worker.settings import Settings

log = logging.getLogger("moderation_worker.worker")


class FaustSink:
    """Publishes outcomes through Faust's producer and returns once the broker accepted all.

    Each outcome becomes one record that fits the producer's request limit, with the input's
    headers passed on (`codecs.build_record`). A record the producer or broker still refuses
    for its size is replaced by a minimal one (id, outcome, reason, no `meta`, no copied
    headers): one event's output must never stop the worker.

    Under `exactly_once` each record goes into the transaction of its *input* partition (the
    transaction Faust commits that partition's offsets with), so a verdict and the offset of
    its comment commit or abort together.

    Args:
        app: the Faust app whose producer publishes (the standalone app or a host app).
        settings: output topic names and the processing guarantee.
    """

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.app = app
        self.verdict_topic = settings.verdict_topic
        self.dlq_topic = settings.dlq_topic
        self.input_topic = settings.input_topic
        self.exactly_once = settings.processing_guarantee == "exactly_once"
        self._max_request_bytes = int(app.conf.producer_max_request_size)

    def _transactional_id(self, source: SourcePosition) -> str | None:
        if not self.exactly_once:
            return None
        group = self.app.assignor.group_for_topic(source.topic)
        return f"{self.app.conf.id}-{group}-{source.partition}"

    def _topic(self, outcome: Outcome[Any]) -> str:
        return self.verdict_topic if outcome.verdict is not None else self.dlq_topic

    async def _send(self, outcome: Outcome[Any], record: codecs.OutputRecord) -> Any:
        return await self.app.producer.send(
            self._topic(outcome),
            record.key,
            record.value,
            None,  # partition from the key, so per-key order and affinity hold
            None,
            record.headers,
            transactional_id=self._transactional_id(outcome.event.source),
        )

    async def publish(self, outcomes: Sequence[Outcome[Any]]) -> None:
        pending: list[tuple[Outcome[Any], Any]] = []
        for outcome in outcomes:
            try:
                record = codecs.build_record(outcome, self._max_request_bytes)
                pending.append((outcome, await self._send(outcome, record)))
            except Exception as exc:
                if not _too_large(exc):
                    raise
                pending.append((outcome, await self._send_minimal(outcome, exc)))
        results = await asyncio.gather(*(fut for _, fut in pending), return_exceptions=True)
        for (outcome, _), result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                if not _too_large(result):
                    raise result
                await (await self._send_minimal(outcome, result))

    async def _send_minimal(self, outcome: Outcome[Any], error: BaseException) -> Any:
        """Send the smallest record that still says what became of the event."""
        log.warning(
            "output refused for its size; sending a minimal record",
            extra={"source": outcome.event.source.to_dict(), "error": str(error)[:300]},
        )
        return await self._send(outcome, codecs.minimal_record(outcome))


def _too_large(exc: BaseException) -> bool:
    """A producer or broker refusal of one record for its size (not a broker outage)."""
    from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (MessageSizeTooLargeError, RecordListTooLargeError)):
            return True
        seen = seen.__cause__
    return False

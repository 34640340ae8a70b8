"""The learner process (`moderation-worker learn`): moderator labels from Kafka into the label
store, cycles in a thread, the resulting control records back to the fleet.

Its own consumer group (`loop.group_id`), so scoring workers never train and the learner never
takes their partitions. Labels are validated like comments: a bad one goes to the labels
dead-letter topic with its reason, never stops the learner. Offsets are committed only after
the store has fsynced the batch, so a crash loses no label (a replayed one is a duplicate,
and the latest decision per comment wins anyway). Run one learner per store; a second one
finds the classifier's training lock held and skips it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from adapters.control_topic import ControlTopicReader, publish_control
from adapters.kafka_admin import create_topics, kafka_consumer, kafka_producer
from moderation_worker.control_records import Record
from moderation_worker.events import DeadLetter, InvalidEvent, SourcePosition
from moderation_worker.loop.labels import ModeratorLabel, parse_label
from moderation_worker.loop.store import LabelStore, TrainingLocked
from moderation_worker.model.lora import LoraAdapter
from moderation_worker.model.prompts import PromptSettings
from moderation_worker.model.sources import load_model_source, resolve_lora
from moderation_worker.policy import ControlState, policy_from_settings
from moderation_worker.settings import DEFAULT_CLASSIFIER, Settings
from moderation_worker.tools.learning.coordinator import LoopCoordinator

log = logging.getLogger("moderation_worker.learner")


def configured_loras(settings: Settings) -> dict[str, str | None]:
    """classifier -> its configured LoRA spec, as the worker builds them."""
    if settings.classifiers:
        return {c.name: c.lora for c in settings.classifiers}
    return {DEFAULT_CLASSIFIER: settings.lora_weights}


def build_coordinator(settings: Settings, state: ControlState, store: LabelStore):
    """Load the base model and the configured adapters; the coordinator on top."""
    base = load_model_source(settings.model)
    configured = {}
    for name, spec in configured_loras(settings).items():
        path = resolve_lora(settings.model, spec)
        configured[name] = LoraAdapter.load(path, base_model=base.name) if path else None
    calibrated = {n: a.metadata.threshold if a else None for n, a in configured.items()}
    state.rebase(policy_from_settings(settings, calibrated))

    def resolve(lora: str, sha256: str | None) -> LoraAdapter | None:
        path = resolve_lora(settings.model, lora)
        adapter = LoraAdapter.load(path, base_model=base.name) if path else None
        if sha256 and (adapter is None or adapter.sha256 != sha256):
            raise ValueError(f"sha256 of {lora} is not {sha256}")
        return adapter

    return LoopCoordinator(
        settings.loop,
        store,
        base,
        configured,
        state.snapshot,
        resolve,
        zero_shot_prompt=PromptSettings(sequence_length=settings.sequence_length),
        log=lambda message: log.info(message),
    )


class Learner:
    """Labels in, cycles, control records out. `run_once()` for a single pass (demo, cron,
    tests); `run()` until cancelled."""

    def __init__(
        self,
        settings: Settings,
        coordinator_factory: Callable[[Settings, ControlState, LabelStore], Any] = (
            build_coordinator
        ),
    ) -> None:
        self.settings, self.loop = settings, settings.loop
        self.store = LabelStore(self.loop.store_dir)
        self.state = ControlState(policy_from_settings(settings))
        self.factory = coordinator_factory
        self.coordinator: Any = None
        self.classifiers = list(configured_loras(settings))
        self.labels_stored = self.dead_letters = 0
        self._consumer: Any = None
        self._producer: Any = None
        self._control: ControlTopicReader | None = None

    async def start(self) -> None:
        topic = self.settings.control_topic
        if not topic:
            raise ValueError("the learner publishes candidates on the control topic: set one")
        await create_topics(self.settings, [self.loop.labels_topic, self.loop.labels_dlq_topic])
        self._control = ControlTopicReader(self.settings, topic, self.state)
        await self._control.start()
        loop = asyncio.get_running_loop()
        self.coordinator = await loop.run_in_executor(
            None, self.factory, self.settings, self.state, self.store
        )
        self._producer = kafka_producer(self.settings, acks="all")
        await self._producer.start()
        self._consumer = kafka_consumer(
            self.settings,
            self.loop.labels_topic,
            group_id=self.loop.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=250,
        )
        await self._consumer.start()
        log.info("learner started", extra={"labels_topic": self.loop.labels_topic})

    async def stop(self) -> None:
        for closer in (self._consumer, self._producer, self._control):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer.stop()
        self._consumer = self._producer = self._control = None

    # ------------------------------------------------------------------ labels
    async def ingest(self, timeout_ms: int = 500) -> int:
        """One fetch: valid labels into the store (fsynced), bad ones to the dead-letter topic,
        then the offsets committed. Returns how many records were fetched."""
        batch = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=1000)
        good: list[ModeratorLabel] = []
        sources: list[str] = []
        sends = []
        fetched = 0
        for tp, messages in batch.items():
            for m in messages:
                fetched += 1
                position = SourcePosition(tp.topic, tp.partition, m.offset)
                try:
                    good.append(parse_label(m.value or b"", self.classifiers))
                    sources.append(f"{tp.topic}/{tp.partition}@{m.offset}")
                except InvalidEvent as exc:
                    letter = DeadLetter(exc.reason, str(exc), m.value or b"", position)
                    sends.append(await self._send_dead_letter(m.key, letter))
        if sends:
            await asyncio.gather(*sends)
            self.dead_letters += len(sends)
        if good:
            await asyncio.get_running_loop().run_in_executor(None, self.store.append, good, sources)
            self.labels_stored += len(good)
        if fetched:
            await self._consumer.commit()
        return fetched

    async def _send_dead_letter(self, key: bytes | None, letter: DeadLetter) -> Any:
        import orjson

        log.warning("label dead-lettered", extra={"reason": letter.reason, "error": letter.error})
        value = orjson.dumps(letter.to_dict())
        return await self._producer.send(self.loop.labels_dlq_topic, key=key, value=value)

    async def rebuild(self, timeout_s: float = 120.0) -> int:
        """A fresh store from the labels topic (read from its beginning, outside the group):
        the old labels directory is moved aside; returns how many labels were stored."""
        from adapters.control_topic import _assign_all, _read_to_end

        moved = self.store.reset_labels()
        log.warning("label store reset for a rebuild", extra={"moved_to": str(moved)})
        consumer = kafka_consumer(
            self.settings, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await consumer.start()
        good: list[ModeratorLabel] = []
        sources: list[str] = []

        def keep(m: Any) -> None:
            try:
                good.append(parse_label(m.value or b"", self.classifiers))
                sources.append(f"{m.topic}/{m.partition}@{m.offset}")
            except InvalidEvent:
                pass  # it went to the dead-letter topic when it first arrived

        try:
            deadline = time.monotonic() + timeout_s
            topic = self.loop.labels_topic
            tps = await _assign_all(consumer, topic, deadline)
            await _read_to_end(consumer, tps, keep, deadline, topic)
        finally:
            await consumer.stop()
        self.store.append(good, sources)
        return len(good)

    async def caught_up(self) -> bool:
        assigned = self._consumer.assignment()
        if not assigned:
            return False
        ends = await self._consumer.end_offsets(list(assigned))
        positions = {tp: await self._consumer.position(tp) for tp in assigned}
        return all(positions[tp] >= ends[tp] for tp in assigned)

    # ------------------------------------------------------------------ cycles
    async def publish(self, records: list[Record]) -> None:
        topic = self.settings.control_topic
        assert topic
        for key, value in records:
            await publish_control(self.settings, topic, key, value)

    async def run_due(self, force: bool = False) -> list[Any]:
        """Run every due cycle (one at a time, in a thread), then promote or withdraw the
        candidates whose shadow time is over. Returns the cycle results."""
        results = []
        loop = asyncio.get_running_loop()
        for classifier in self.classifiers:
            reason = self.coordinator.due(classifier, force=force)
            if reason is None:
                continue
            try:
                result, records = await loop.run_in_executor(
                    None, self.coordinator.cycle, classifier, reason
                )
            except TrainingLocked as exc:
                log.warning("cycle skipped: %s", exc)
                continue
            await self.publish(records)
            results.append(result)
        await self.publish(self.coordinator.tick())
        return results

    async def run_once(self, force: bool = False, timeout_s: float = 60.0) -> list[Any]:
        """Read the labels topic to its end, run the due cycles, and return their results."""
        deadline = time.monotonic() + timeout_s
        while True:
            fetched = await self.ingest()
            if not fetched and await self.caught_up():
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"labels topic not read to its end in {timeout_s:g} s")
        return await self.run_due(force=force)

    async def run(self) -> None:
        """Ingest continuously; look for due cycles every `check_interval_s`."""
        cycles: asyncio.Task[Any] | None = None
        last_check = 0.0
        while True:
            await self.ingest()
            now = time.monotonic()
            if (cycles is None or cycles.done()) and now - last_check >= self.loop.check_interval_s:
                if cycles is not None and cycles.exception() is not None:
                    log.error("learning cycle failed", exc_info=cycles.exception())
                last_check = now
                cycles = asyncio.create_task(self.run_due(), name="learning-cycles")

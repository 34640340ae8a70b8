"""The in-memory broker commits by Faust's rule, so fast tests see the ack-order bugs Faust would.

`OffsetTracker` runs Faust's own consumer code (`FaustOffsetRule`); these tests pin that rule
down on the cases where it differs from "the contiguous run of acks after the last commit",
compare it with a real Faust consumer on random ack orders, and show that a pipeline whose acks
overtake an unpublished event now fails `assert_nothing_committed_without_output`, where the
old contiguous-prefix tracker let it pass.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import faust
import pytest
from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP, Message

from adapters.memory_broker import FaustOffsetRule, MemoryBroker, MemoryWorker, OffsetTracker
from moderation_worker.batching import InputEvent
from tests.test_worker_memory import (
    GROUP,
    IN,
    assert_nothing_committed_without_output,
    outputs,
    produce_comments,
    setup,
    worker,
)


def test_the_rule_is_fausts_own_code() -> None:
    for name in ("ack", "_new_offset", "_should_commit", "_filter_committable_offsets"):
        assert getattr(FaustOffsetRule, name) is getattr(FaustConsumer, name)


def commits(committed: int, acks: list[int]) -> list[int]:
    """The committed offset after each ack, through `OffsetTracker` on a `MemoryBroker`."""
    broker = MemoryBroker()
    broker.create_topic(IN, 1)
    broker.commit(GROUP, IN, 0, committed)
    tracker = OffsetTracker(broker, GROUP, IN)
    out = []
    for offset in acks:
        tracker.ack(0, offset)
        out.append(broker.committed(GROUP, IN, 0))
    return out


@pytest.mark.parametrize(
    ("committed", "acks", "expected", "why"),
    [
        (0, [0, 1, 2], [1, 2, 3], "in order: the contiguous prefix, as before"),
        (0, [3], [4], "nothing committed yet: the first ack commits, however far ahead"),
        (10, [11], [12], "a gap of one after a commit is not seen: 10 is skipped"),
        (10, [12], [10], "a gap of two or more holds the commit"),
        (10, [12, 10], [10, 11], "the hole at 11 then holds it"),
        (5, [4], [5], "acks below the committed offset are ignored"),
    ],
)
def test_faust_commits_past_an_overtaken_event(
    committed: int, acks: list[int], expected: list[int], why: str
) -> None:
    assert commits(committed, acks) == expected, why


async def test_the_tracker_commits_what_a_real_faust_consumer_commits() -> None:
    """Random ack orders (each offset acked once, some twice, some below the commit), random
    starting commits: a real `faust.transport.drivers.aiokafka.Consumer`, committing after every
    ack as the tracker does, ends each step at the same offset."""
    app = faust.App("mw-offset-rule", broker="kafka://127.0.0.1:1")
    consumer = app.consumer
    app.topics.acks_enabled_for = lambda topic: True  # type: ignore[method-assign]
    rng = random.Random(20240607)
    for trial in range(300):
        tp = TP(IN, trial)  # a fresh partition per trial in the real consumer
        start = rng.choice([0, 0, 1, rng.randrange(2, 50)])
        n = rng.randrange(1, 25)
        acks = list(range(max(0, start - 3), start + n))
        rng.shuffle(acks)
        acks += rng.sample(acks, k=min(3, len(acks)))  # duplicates are ignored by both
        window = rng.randrange(0, 4)  # Faust commits on a timer: sometimes several acks apart

        consumer._committed_offset[tp] = start if start else None  # as perform_seek
        real = []
        for i, offset in enumerate(acks):
            consumer.ack(Message(IN, trial, offset, 0.0, 0, None, b"k", b"v", None))
            if window == 0 or i % (window + 1) == window:
                new = consumer._filter_committable_offsets([tp])
                consumer._committed_offset.update(new)
            real.append(consumer._committed_offset[tp] or 0)

        rule = FaustOffsetRule()
        rule.seek_committed(tp, start)
        mine = []
        for i, offset in enumerate(acks):
            rule.ack_offset(tp, offset)
            if window == 0 or i % (window + 1) == window:
                rule.commit(tp)
            mine.append(rule._committed_offset[tp] or 0)
        assert mine == real, (start, acks, window)


def test_in_order_acks_commit_exactly_the_contiguous_prefix() -> None:
    """For a correct pipeline (acks in arrival order) the Faust rule and the old strict one
    agree: every ack commits right behind itself."""
    rng = random.Random(7)
    for _ in range(200):
        start = rng.randrange(0, 30)
        acks = list(range(start, start + rng.randrange(1, 20)))
        assert commits(start, acks) == [a + 1 for a in acks]


# ---------------------------------------------------------------------------------------------
# A deliberately broken pipeline: one event is overtaken, so acks leave out of offset order
# ---------------------------------------------------------------------------------------------


class ContiguousPrefixTracker:
    """The tracker `MemoryWorker` used before: commits only the contiguous prefix of acks."""

    def __init__(self, broker: MemoryBroker, group: str, topic: str) -> None:
        self.broker, self.group, self.topic = broker, group, topic
        self._acked: dict[int, set[int]] = defaultdict(set)

    def ack(self, partition: int, offset: int) -> None:
        acked = self._acked[partition]
        acked.add(offset)
        position = self.broker.committed(self.group, self.topic, partition)
        while position in acked:
            acked.discard(position)
            position += 1
        self.broker.commit(self.group, self.topic, partition, position)


def overtaking(
    submit: Callable[[InputEvent[Any]], Awaitable[None]], partition: int, offset: int
) -> tuple[Callable[[InputEvent[Any]], Awaitable[None]], list[InputEvent[Any]]]:
    """Wrap `BatchPipeline.submit` so the event at (partition, offset) is held back (a slow
    branch of a concurrent pipeline, say) while the events behind it are scored, published and
    acked: their acks overtake it."""
    held: list[InputEvent[Any]] = []

    async def _submit(event: InputEvent[Any]) -> None:
        if (event.source.partition, event.source.offset) == (partition, offset):
            held.append(event)
            return
        await submit(event)

    return _submit, held


async def run_overtaken(tracker_cls: type | None) -> MemoryBroker:
    broker, sink = setup(partitions=1)
    produce_comments(broker, 12)
    w: MemoryWorker = worker(broker, sink)
    if tracker_cls is not None:
        w.offsets = tracker_cls(broker, GROUP, IN)
    w.pipeline.submit, held = overtaking(w.pipeline.submit, 0, 5)  # type: ignore[method-assign]
    await w.start()
    await w.wait_idle()
    await w.kill()  # the worker dies before the held event is ever published
    assert [e.source.offset for e in held] == [5]
    assert len(outputs(broker)) == 11
    return broker


async def test_an_overtaking_ack_now_commits_past_the_unpublished_event() -> None:
    broker = await run_overtaken(None)  # MemoryWorker's own tracker: Faust's rule
    assert broker.committed(GROUP, IN, 0) == 12
    with pytest.raises(AssertionError, match=r"committed 12 past unpublished \[5\]"):
        assert_nothing_committed_without_output(broker)


async def test_the_old_contiguous_tracker_was_blind_to_it() -> None:
    broker = await run_overtaken(ContiguousPrefixTracker)
    assert broker.committed(GROUP, IN, 0) == 5  # stopped at the hole: the bug went unseen
    assert_nothing_committed_without_output(broker)

"""Length-aware batching: one queue per length bucket, and acknowledgements that stay in
arrival order per partition although batches now finish out of order."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest

from moderation_worker.batching import Batcher, BucketedBatcher, InputEvent, Outcome, admit
from moderation_worker.events import SourcePosition
from moderation_worker.ordered_acks import AckLedger
from moderation_worker.pipeline import BatchPipeline
from moderation_worker.processor import BatchProcessor
from moderation_worker.tools.trivial_scorer import TrivialScorer

BUCKETS = (8, 16, 32)


def event(i: int, words: int = 1, partition: int = 0, raw: bytes | None = None, now: float = 0.0):
    text = " ".join(["w"] * words)
    payload = raw if raw is not None else orjson.dumps({"id": f"c{i}", "text": text})
    return admit(
        payload,
        key=f"k{i}".encode(),
        source=SourcePosition("comments", partition, i),
        handle=(partition, i),
        received_at=now,
    )


def words_bucket(e: InputEvent[Any]) -> int:
    """A text's 'prompt length' is its word count; the bucket is the smallest that holds it."""
    assert e.comment is not None
    n = len(e.comment.text.split())
    return next((b for b in BUCKETS if b >= n), BUCKETS[-1])


class BucketedScorer(TrivialScorer):
    """A TrivialScorer with length buckets (word counts) that records each call's longest row."""

    length_buckets = BUCKETS

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__(batch_size=batch_size)
        self.longest: list[int] = []

    def length_bucket(self, text: str) -> int:
        n = len(text.split())
        return next((b for b in BUCKETS if b >= n), BUCKETS[-1])

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        self.longest.append(max(len(t.split()) for t in texts))
        return super().predict_proba(texts)


# -- BucketedBatcher ----------------------------------------------------------------------------


def test_rows_of_different_lengths_fill_different_batches() -> None:
    batcher = BucketedBatcher(2, 1.0, bucket_of=words_bucket)
    assert batcher.add(event(0, words=3), now=0) is None
    assert batcher.add(event(1, words=30), now=0) is None  # would stretch event 0 to 32
    full = batcher.add(event(2, words=5), now=0)
    assert full is not None and full.bucket == 8
    assert [e.source.offset for e in full.events] == [0, 2]
    assert len(batcher) == 1  # the long one still waits in its own queue


def test_the_earliest_deadline_of_any_queue_is_the_batcher_deadline() -> None:
    batcher = BucketedBatcher(4, 0.5, bucket_of=words_bucket)
    batcher.add(event(0, words=20), now=1.0)
    batcher.add(event(1, words=2), now=1.2)
    assert batcher.deadline() == pytest.approx(1.5)
    assert batcher.take_due(now=1.49) is None
    due = batcher.take_due(now=1.5)
    assert due is not None and due.closed_by == "deadline" and due.bucket == 32


def test_an_overdue_partial_batch_is_topped_up_with_shorter_rows_only() -> None:
    batcher = BucketedBatcher(4, 0.5, bucket_of=words_bucket)
    batcher.add(event(0, words=12, now=0.0), now=0.0)  # bucket 16, overdue first
    batcher.add(event(1, words=2, now=0.1), now=0.1)  # bucket 8: shorter, fits a 16 batch
    batcher.add(event(2, words=30, now=0.2), now=0.2)  # bucket 32: longer, must not join
    batcher.add(event(3, words=4, now=0.3), now=0.3)
    batcher.add(event(4, words=14, now=0.4), now=0.4)  # bucket 16 again
    due = batcher.take_due(now=0.5)
    assert due is not None and due.bucket == 16
    assert [e.source.offset for e in due.events] == [0, 4, 1, 3]  # then oldest shorter rows
    assert due.n_scorable == 4
    rest = batcher.drain()
    assert rest is not None and rest.bucket == 32 and [e.source.offset for e in rest.events] == [2]
    assert batcher.drain() is None and len(batcher) == 0


def test_a_long_batch_takes_the_oldest_shorter_rows_across_queues() -> None:
    batcher = BucketedBatcher(3, 0.5, bucket_of=words_bucket)
    batcher.add(event(0, words=30, now=0.0), now=0.0)
    batcher.add(event(1, words=2, now=0.1), now=0.1)  # bucket 8
    batcher.add(event(2, words=12, now=0.05), now=0.2)  # bucket 16, arrived earlier
    due = batcher.take_due(now=0.5)
    assert due is not None and due.bucket == 32
    assert [e.source.offset for e in due.events] == [0, 2, 1]


def test_invalid_events_ride_in_the_shortest_open_queue() -> None:
    batcher = BucketedBatcher(2, 1.0, bucket_of=words_bucket)
    batcher.add(event(0, words=30), now=0)
    batcher.add(event(1, words=2), now=0)
    assert batcher.add(event(2, raw=b"{not json"), now=0) is None
    full = batcher.add(event(3, words=1), now=0)
    assert full is not None and full.bucket == 8
    assert [e.source.offset for e in full.events] == [1, 2, 3]


def test_arguments_are_validated_like_the_plain_batcher() -> None:
    with pytest.raises(ValueError):
        BucketedBatcher(0, 1.0, bucket_of=words_bucket)
    with pytest.raises(ValueError):
        Batcher(1, 0.0)


# -- AckLedger ----------------------------------------------------------------------------------


def test_ledger_holds_back_a_finished_event_until_older_ones_of_its_partition_finish() -> None:
    ledger: AckLedger[Any] = AckLedger()
    events = [event(i, partition=i % 2) for i in range(6)]  # p0: 0 2 4, p1: 1 3 5
    for e in events:
        ledger.admit(e)
    assert ledger.finish([events[2], events[3]]) == []  # p0 waits for 0, p1 for 1
    assert ledger.held_back == 2
    released = ledger.finish([events[1]])
    assert [e.source.offset for e in released] == [1, 3]  # p1 runs on; p0 still held
    released = ledger.finish([events[0], events[4], events[5]])
    assert sorted(e.source.offset for e in released) == [0, 2, 4, 5]
    assert [e.source.offset for e in released if e.source.partition == 0] == [0, 2, 4]
    assert len(ledger) == 0 and ledger.held_back == 0


def test_ledger_refuses_an_event_it_never_admitted() -> None:
    with pytest.raises(KeyError):
        AckLedger().finish([event(1)])


# -- through the pipeline -----------------------------------------------------------------------


class ListSink:
    def __init__(self) -> None:
        self.published: list[Outcome[Any]] = []

    async def publish(self, outcomes: Sequence[Outcome[Any]]) -> None:
        self.published.extend(outcomes)


async def run_pipeline(model: Any, events: list[InputEvent[Any]], **kw: Any):
    sink, acked = ListSink(), []
    published_before_ack: list[bool] = []

    def ack(e: InputEvent[Any]) -> None:
        published_before_ack.append(any(o.event is e for o in sink.published))
        acked.append(e)

    pipeline = BatchPipeline(BatchProcessor(model, threshold=0.5), sink, ack, max_wait_s=0.01, **kw)
    runner = asyncio.create_task(pipeline.run())
    try:
        for e in events:
            await pipeline.submit(e)
        async with asyncio.timeout(10):
            await pipeline.finish()
    finally:
        runner.cancel()
    assert all(published_before_ack)
    return pipeline, sink, acked


async def test_pipeline_batches_by_length_and_acks_in_arrival_order_per_partition() -> None:
    rng = random.Random(7)
    events = [event(i, words=rng.choice([1, 3, 12, 30]), partition=i % 3) for i in range(60)]
    events[17] = event(17, raw=b"[]", partition=17 % 3)  # a dead letter among them
    model = BucketedScorer(batch_size=4)
    pipeline, sink, acked = await run_pipeline(model, events)
    assert isinstance(pipeline.batcher, BucketedBatcher)
    assert len(acked) == len(events) == len(sink.published)
    for p in range(3):
        mine = [e.source.offset for e in acked if e.source.partition == p]
        assert mine == sorted(mine) == [i for i in range(60) if i % 3 == p]
    assert sum(1 for o in sink.published if o.dead_letter is not None) == 1
    # Batches no longer mix lengths: most calls stay within one short bucket.
    short_calls = sum(1 for n in model.longest if n <= 8)
    assert short_calls >= len(model.longest) // 3


async def test_same_verdicts_with_and_without_length_queues() -> None:
    events = [event(i, words=1 + (i * 7) % 31) for i in range(40)]
    _, on, _ = await run_pipeline(BucketedScorer(), events)
    _, off, _ = await run_pipeline(BucketedScorer(), events, batch_by_length=False)
    by_id = {o.verdict.id: o.verdict.results for o in off.published if o.verdict}
    assert {o.verdict.id: o.verdict.results for o in on.published if o.verdict} == by_id


async def test_a_model_without_buckets_keeps_the_plain_batcher() -> None:
    pipeline, _, acked = await run_pipeline(
        TrivialScorer(batch_size=4), [event(i) for i in range(9)]
    )
    assert type(pipeline.batcher) is Batcher and len(acked) == 9


async def test_the_real_tiny_gemma_scores_exactly_the_same_through_length_queues(
    tiny_model: Any,
) -> None:
    """The real classifier: rows queued by their token length score identically."""
    from moderation_worker.model.classifier import AgileClassifier

    clf = AgileClassifier(tiny_model, batch_size=4, length_buckets=(32, 64, 96))
    texts = ["ok", "you are " + "very " * 40 + "rude", "nice", "fine " * 70, "meh", "hi there"]
    events = [
        admit(
            orjson.dumps({"id": f"c{i}", "text": t}),
            key=None,
            source=SourcePosition("comments", 0, i),
            handle=i,
            received_at=0.0,
        )
        for i, t in enumerate(texts * 3)
    ]
    buckets = {clf.length_bucket(t) for t in texts}
    assert len(buckets) >= 2, buckets
    pipeline, sink, acked = await run_pipeline(clf, events)
    assert isinstance(pipeline.batcher, BucketedBatcher)
    assert [e.handle for e in acked] == list(range(len(events)))
    expected = clf.p_positive(texts * 3)
    got = {o.verdict.id: o.verdict.results[0].p for o in sink.published}
    np.testing.assert_allclose([got[f"c{i}"] for i in range(len(events))], expected, atol=1e-6)


class ChokingScorer(BucketedScorer):
    """Its length lookup raises on one text, as a tokenizer might on hostile input."""

    def length_bucket(self, text: str) -> int:
        if "CHOKE" in text:
            raise UnicodeError("tokenizer choked")
        return super().length_bucket(text)


async def test_a_text_whose_length_cannot_be_read_still_gets_its_outcome() -> None:
    events = [event(0, words=3), event(1, words=2), event(2, words=20), event(3, words=1)]
    events[1] = admit(
        orjson.dumps({"id": "c1", "text": "CHOKE me"}),
        key=None,
        source=SourcePosition("comments", 0, 1),
        handle=(0, 1),
        received_at=0.0,
    )
    _, sink, acked = await run_pipeline(ChokingScorer(), events)
    assert [e.source.offset for e in acked] == [0, 1, 2, 3]
    assert {o.event.source.offset for o in sink.published} == {0, 1, 2, 3}

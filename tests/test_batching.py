"""The Kafka-free core: batching, the batch step with failure isolation, ordered acks."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest

from moderation_worker.batching import Batch, Batcher, InputEvent, Outcome, admit, pad_rows
from moderation_worker.events import (
    EMPTY_TEXT,
    INVALID_JSON,
    SCORING_FAILED,
    TEXT_TOO_LONG,
    SourcePosition,
)
from moderation_worker.pipeline import BatchPipeline, PipelineFailure
from moderation_worker.processor import BatchProcessor, BatchResult, ModelUnavailable
from moderation_worker.tools.trivial_scorer import TrivialScorer


def event(i: int, text: str | None = None, raw: bytes | None = None, **kw: Any) -> InputEvent[int]:
    payload = (
        raw
        if raw is not None
        else orjson.dumps({"id": f"c{i}", "text": f"t{i}" if text is None else text})
    )
    return admit(
        payload,
        key=f"k{i}".encode(),
        source=SourcePosition("comments", 0, i),
        handle=i,
        received_at=kw.get("now", 0.0),
        max_text_chars=kw.get("max_text_chars", 100),
    )


class RecordingModel(TrivialScorer):
    """TrivialScorer that records the row count of every call and fails on marked rows."""

    def __init__(self, batch_size: int = 4, bad: str = "BAD", **kw: Any) -> None:
        super().__init__(batch_size=batch_size, **kw)
        self.bad = bad
        self.shapes: list[int] = []

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        self.shapes.append(len(texts))
        if any(self.bad in t for t in texts):
            raise RuntimeError("tokenizer exploded")
        return super().predict_proba(texts)


# -- admission ----------------------------------------------------------------------------------


def test_admit_keeps_bad_input_with_its_reason_instead_of_raising() -> None:
    assert event(1).scorable
    assert event(2, raw=b"{nope").error.reason == INVALID_JSON
    assert event(3, text=" ").error.reason == EMPTY_TEXT
    assert event(4, text="x" * 101).error.reason == TEXT_TOO_LONG
    tombstone = admit(None, key=None, source=SourcePosition("t", 0, 0), handle=0, received_at=0)
    assert tombstone.raw == b"" and tombstone.error.reason == INVALID_JSON


# -- batcher ------------------------------------------------------------------------------------


def test_batcher_flushes_when_full() -> None:
    batcher: Batcher[int] = Batcher(batch_size=3, max_wait_s=1.0)
    assert batcher.add(event(0), now=0.0) is None
    assert batcher.add(event(1), now=0.1) is None
    full = batcher.add(event(2), now=0.2)
    assert full is not None and full.closed_by == "full" and len(full) == 3
    assert len(batcher) == 0 and batcher.deadline() is None


def test_batcher_deadline_runs_from_the_oldest_event() -> None:
    batcher: Batcher[int] = Batcher(batch_size=8, max_wait_s=0.2)
    batcher.add(event(0), now=10.0)
    batcher.add(event(1), now=10.15)
    assert batcher.deadline() == pytest.approx(10.2)
    assert batcher.take_due(now=10.19) is None
    due = batcher.take_due(now=10.2)
    assert due is not None and due.closed_by == "deadline" and len(due) == 2


def test_invalid_events_ride_along_without_taking_a_model_row() -> None:
    batcher: Batcher[int] = Batcher(batch_size=2, max_wait_s=1.0)
    assert batcher.add(event(0, raw=b"\xff"), now=0) is None
    assert batcher.add(event(1), now=0) is None
    assert batcher.add(event(2, raw=b"[]"), now=0) is None
    full = batcher.add(event(3), now=0)
    assert full is not None and full.n_scorable == 2 and len(full) == 4


def test_a_flood_of_invalid_events_still_flushes_at_max_events() -> None:
    batcher: Batcher[int] = Batcher(batch_size=2, max_wait_s=1.0, max_events=5)
    results = [batcher.add(event(i, raw=b"x"), now=0) for i in range(5)]
    assert results[:4] == [None] * 4 and results[4] is not None


def test_drain_returns_the_open_batch() -> None:
    batcher: Batcher[int] = Batcher(batch_size=4, max_wait_s=1.0)
    assert batcher.drain() is None
    batcher.add(event(0), now=0)
    drained = batcher.drain()
    assert drained is not None and drained.closed_by == "drain"


def test_pad_rows_repeats_the_first_row_to_the_fixed_shape() -> None:
    assert pad_rows(["a", "b"], 4) == ["a", "b", "a", "a"]
    assert pad_rows(["a"], 1) == ["a"]
    with pytest.raises(ValueError):
        pad_rows([], 4)
    with pytest.raises(ValueError):
        pad_rows(["a", "b"], 1)


# -- batch step ---------------------------------------------------------------------------------


def test_every_model_call_has_the_fixed_shape_and_padding_makes_no_verdicts() -> None:
    model = RecordingModel(batch_size=4)
    result = BatchProcessor(model, threshold=0.5).process([event(0), event(1), event(2)])
    assert model.shapes == [4]
    assert [o.verdict.id for o in result.outcomes] == ["c0", "c1", "c2"]
    assert result.fill_ratio == pytest.approx(0.75)
    assert result.outcomes[0].verdict.source == SourcePosition("comments", 0, 0)


def test_one_outcome_per_event_in_input_order() -> None:
    events = [event(0), event(1, raw=b"nope"), event(2), event(3, text="")]
    result = BatchProcessor(RecordingModel(batch_size=4), threshold=0.5).process(events)
    assert [o.event for o in result.outcomes] == events
    kinds = ["v" if o.verdict else o.dead_letter.reason for o in result.outcomes]
    assert kinds == ["v", INVALID_JSON, "v", EMPTY_TEXT]
    assert result.rows == 2


def test_a_poisonous_comment_dead_letters_alone() -> None:
    model = RecordingModel(batch_size=8)
    events = [event(i, text="BAD" if i == 5 else f"fine {i}") for i in range(8)]
    result = BatchProcessor(model, threshold=0.5).process(events)
    failed = [o for o in result.outcomes if o.dead_letter]
    assert [o.dead_letter.id for o in failed] == ["c5"]
    assert failed[0].dead_letter.reason == SCORING_FAILED
    assert "tokenizer exploded" in failed[0].dead_letter.error
    assert failed[0].dead_letter.original == events[5].raw
    assert sum(o.verdict is not None for o in result.outcomes) == 7
    assert set(model.shapes) == {8}  # bisection keeps the fixed shape too
    assert len(model.shapes) <= 2 + 2 * 3  # whole call, canary, then log2(8) levels of halves


def test_several_poisonous_comments_are_all_isolated() -> None:
    model = RecordingModel(batch_size=8)
    events = [event(i, text="BAD" if i in (0, 3, 7) else f"ok {i}") for i in range(8)]
    result = BatchProcessor(model, threshold=0.5).process(events)
    assert [o.dead_letter.id for o in result.outcomes if o.dead_letter] == ["c0", "c3", "c7"]


def test_a_batch_of_only_poison_is_dead_lettered_when_the_model_itself_works() -> None:
    model = RecordingModel(batch_size=4)
    result = BatchProcessor(model, threshold=0.5).process([event(0, text="BAD")])
    assert result.outcomes[0].dead_letter.reason == SCORING_FAILED


def test_a_broken_model_raises_instead_of_dead_lettering_everything() -> None:
    model = TrivialScorer(batch_size=4, fail_after_calls=0)
    with pytest.raises(ModelUnavailable):
        BatchProcessor(model, threshold=0.5).process([event(0), event(1)])
    assert model.calls == 2  # the batch and the canary; no bisection of a dead model


class NaNRows(TrivialScorer):
    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        probs = super().predict_proba(texts)
        probs[[i for i, t in enumerate(texts) if "nan" in t]] = np.nan
        return probs


def test_non_finite_probabilities_fail_only_their_row() -> None:
    events = [event(0, text="nan here"), event(1)]
    result = BatchProcessor(NaNRows(batch_size=4), threshold=0.5).process(events)
    assert result.outcomes[0].dead_letter.reason == SCORING_FAILED
    assert result.outcomes[1].verdict is not None


class WrongShape(TrivialScorer):
    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return super().predict_proba(texts)[:1]


def test_a_model_returning_the_wrong_shape_is_unavailable() -> None:
    with pytest.raises(ModelUnavailable):
        BatchProcessor(WrongShape(batch_size=4), threshold=0.5).process([event(0)])


def test_threshold_is_read_once_per_batch() -> None:
    values = iter([0.0, 1.0])
    processor = BatchProcessor(TrivialScorer(batch_size=2), threshold=lambda: next(values))
    first = processor.process([event(0)])
    second = processor.process([event(0)])
    assert first.outcomes[0].verdict.hateful and first.outcomes[0].verdict.threshold == 0.0
    assert not second.outcomes[0].verdict.hateful and second.threshold == 1.0


def test_outcome_is_exactly_one_of_verdict_or_dead_letter() -> None:
    with pytest.raises(ValueError):
        Outcome(event(0))


# -- pipeline -----------------------------------------------------------------------------------


class ListSink:
    def __init__(self, fail: int = 0, delay: float = 0.0) -> None:
        self.published: list[Outcome[int]] = []
        self.fail = fail
        self.delay = delay
        self.calls = 0

    async def publish(self, outcomes: Sequence[Outcome[int]]) -> None:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            self.fail -= 1
            raise ConnectionError("broker said no")
        self.published.extend(outcomes)


class Observer:
    def __init__(self) -> None:
        self.events = 0
        self.batches: list[tuple[Batch[int], BatchResult[int]]] = []

    def on_event(self, event: InputEvent[int]) -> None:
        self.events += 1

    def on_batch_done(
        self, batch: Batch[int], result: BatchResult[int], published_at: float
    ) -> None:
        self.batches.append((batch, result))


def make_pipeline(
    sink: ListSink, acked: list[int], batch_size: int = 4, max_wait_s: float = 0.02, **kw: Any
) -> BatchPipeline[int]:
    def ack(e: InputEvent[int]) -> None:
        acked.append(e.handle)

    model = kw.pop("model", None) or TrivialScorer(batch_size=batch_size)
    return BatchPipeline(
        BatchProcessor(model, threshold=0.5),
        sink,
        ack,
        max_wait_s=max_wait_s,
        retry_backoff_s=0.001,
        **kw,
    )


async def run_until_acked(pipeline: BatchPipeline[int], acked: list[int], n: int) -> None:
    runner = asyncio.create_task(pipeline.run())
    try:
        async with asyncio.timeout(5):
            while len(acked) < n:
                if runner.done():
                    runner.result()
                await asyncio.sleep(0.001)
    finally:
        runner.cancel()


async def test_pipeline_acks_every_event_in_order_after_publishing() -> None:
    sink, acked, observer = ListSink(), [], Observer()
    pipeline = make_pipeline(sink, acked, observer=observer)
    publish_seen_before_ack: list[bool] = []
    original_ack = pipeline._ack

    def ack(e: InputEvent[int]) -> None:
        publish_seen_before_ack.append(any(o.event is e for o in sink.published))
        original_ack(e)

    pipeline._ack = ack
    runner = asyncio.create_task(pipeline.run())
    for i in range(10):
        await pipeline.submit(event(i, raw=b"junk" if i == 4 else None))
    await run_until_acked(pipeline, acked, 10)
    runner.cancel()
    assert acked == list(range(10))
    assert all(publish_seen_before_ack)
    assert [o.event.handle for o in sink.published] == list(range(10))
    assert observer.events == 10 and sum(len(b) for b, _ in observer.batches) == 10


async def test_a_partial_batch_waits_for_the_deadline_then_flushes() -> None:
    sink, acked = ListSink(), []
    pipeline = make_pipeline(sink, acked, batch_size=8, max_wait_s=0.05)
    runner = asyncio.create_task(pipeline.run())
    loop = asyncio.get_running_loop()
    started = loop.time()
    await pipeline.submit(event(0))
    async with asyncio.timeout(2):
        while not acked:
            await asyncio.sleep(0.001)
    waited = loop.time() - started
    runner.cancel()
    assert 0.04 <= waited < 0.5


async def test_a_full_batch_does_not_wait_for_the_deadline() -> None:
    sink, acked = ListSink(), []
    pipeline = make_pipeline(sink, acked, batch_size=2, max_wait_s=30.0)
    runner = asyncio.create_task(pipeline.run())
    await pipeline.submit(event(0))
    await pipeline.submit(event(1))
    async with asyncio.timeout(2):
        while len(acked) < 2:
            await asyncio.sleep(0.001)
    runner.cancel()


async def test_a_failed_publish_stops_the_pipeline_with_nothing_of_that_batch_acked() -> None:
    sink, acked = ListSink(fail=1), []
    pipeline = make_pipeline(sink, acked, batch_size=2)
    runner = asyncio.create_task(pipeline.run())
    for i in range(2):
        await pipeline.submit(event(i))
    with pytest.raises(PipelineFailure, match="left unacknowledged"):
        async with asyncio.timeout(2):
            await runner
    assert acked == []
    with pytest.raises(PipelineFailure):  # the consumer loop learns about it on its next submit
        await pipeline.submit(event(3))


async def test_a_broken_model_is_retried_then_fails_the_pipeline_unacked() -> None:
    sink, acked = ListSink(), []
    model = TrivialScorer(batch_size=2, fail_after_calls=0)
    pipeline = make_pipeline(sink, acked, batch_size=2, model=model, model_retries=2)
    runner = asyncio.create_task(pipeline.run())
    await pipeline.submit(event(0))
    await pipeline.submit(event(1))
    with pytest.raises(PipelineFailure, match="model unavailable"):
        async with asyncio.timeout(2):
            await runner
    assert model.calls == 3 * 2 and acked == [] and sink.calls == 0


async def test_a_model_that_recovers_during_retries_loses_nothing() -> None:
    class Flaky(TrivialScorer):
        def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
            if self.calls < 2:
                self.calls += 1
                raise RuntimeError("CUDA hiccup")
            return super().predict_proba(texts)

    sink, acked = ListSink(), []
    pipeline = make_pipeline(sink, acked, batch_size=2, model=Flaky(batch_size=2))
    runner = asyncio.create_task(pipeline.run())
    await pipeline.submit(event(0))
    await pipeline.submit(event(1))
    await run_until_acked(pipeline, acked, 2)
    runner.cancel()
    assert [o.verdict.id for o in sink.published] == ["c0", "c1"]


async def test_submit_applies_backpressure_while_a_full_batch_is_queued() -> None:
    sink, acked = ListSink(delay=0.2), []
    pipeline = make_pipeline(sink, acked, batch_size=1, max_ready=1)
    runner = asyncio.create_task(pipeline.run())
    await pipeline.submit(event(0))  # taken by the flusher, publishing for 0.2 s
    await asyncio.sleep(0.01)
    await pipeline.submit(event(1))  # queued as the one ready batch
    third = asyncio.create_task(pipeline.submit(event(2)))
    await asyncio.sleep(0.05)
    assert not third.done()  # waits for space
    async with asyncio.timeout(3):
        await third
        while len(acked) < 3:
            await asyncio.sleep(0.005)
    runner.cancel()
    assert acked == [0, 1, 2]


async def test_cancelling_mid_batch_acks_nothing_of_that_batch() -> None:
    sink, acked = ListSink(), []
    model = TrivialScorer(batch_size=2, delay_s=0.3)
    pipeline = make_pipeline(sink, acked, batch_size=2, model=model)
    runner = asyncio.create_task(pipeline.run())
    await pipeline.submit(event(0))
    await pipeline.submit(event(1))
    await asyncio.sleep(0.05)  # the batch is in the model now
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    await asyncio.sleep(0.35)
    assert acked == [] and sink.published == []


async def test_flush_processes_what_is_buffered() -> None:
    sink, acked = ListSink(), []
    pipeline = make_pipeline(sink, acked, batch_size=8, max_wait_s=60)
    for i in range(3):
        await pipeline.submit(event(i))
    await pipeline.flush()
    assert acked == [0, 1, 2] and pipeline.idle

"""At-least-once through the in-memory broker: fast versions of the crash and hostile-input tests.

`MemoryWorker` runs the same `BatchPipeline` as the Faust worker and commits acknowledged
offsets by Faust's own rule (tests/test_memory_offsets.py), so "which offsets are committed when
things go wrong" is checked here in milliseconds; the broker tests repeat the important cases
through Faust and a real broker.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import orjson
import pytest

from adapters.memory_broker import MemoryBroker, MemorySink, MemoryWorker, Record
from adapters.metrics import PipelineMetrics
from moderation_worker.batching import Batcher, admit
from moderation_worker.events import REASONS, SourcePosition
from moderation_worker.pipeline import PipelineFailure
from moderation_worker.processor import BatchProcessor
from moderation_worker.tools.trivial_scorer import TrivialScorer

GROUP, IN, OUT, DLQ = "g", "comments", "comments.verdicts", "comments.dlq"


def setup(partitions: int = 3) -> tuple[MemoryBroker, MemorySink]:
    broker = MemoryBroker()
    broker.create_topic(IN, partitions)
    return broker, MemorySink(broker, OUT, DLQ)


def produce_comments(broker: MemoryBroker, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        value = orjson.dumps({"id": f"c{i}", "text": f"comment {i}", "lang": "en"})
        broker.produce(IN, value, key=f"user{i % 7}".encode())


def worker(broker: MemoryBroker, sink: MemorySink, **scorer: Any) -> MemoryWorker:
    model = TrivialScorer(batch_size=4, **scorer)
    return MemoryWorker(broker, GROUP, IN, BatchProcessor(model, threshold=0.5), sink)


def outputs(broker: MemoryBroker) -> list[dict[str, Any]]:
    return [orjson.loads(r.value) for r in broker.records(OUT) + broker.records(DLQ)]


def assert_nothing_committed_without_output(broker: MemoryBroker) -> None:
    """The at-least-once invariant: every offset below the committed one has an output."""
    have = {(o["source"]["partition"], o["source"]["offset"]) for o in outputs(broker)}
    for p in range(broker.partitions(IN)):
        committed = broker.committed(GROUP, IN, p)
        missing = [o for o in range(committed) if (p, o) not in have]
        assert not missing, f"partition {p}: committed {committed} past unpublished {missing}"


def assert_every_input_has_an_output(broker: MemoryBroker) -> None:
    have = {(o["source"]["partition"], o["source"]["offset"]) for o in outputs(broker)}
    want = {(r.partition, r.offset) for r in broker.records(IN)}
    assert want <= have, f"no output for {sorted(want - have)}"


HOSTILE: list[tuple[bytes | None, str | None]] = [
    (b"\xff\xfe not utf-8", "not_utf8"),
    (b'{"id": "x", "text": ', "invalid_json"),
    (None, "invalid_json"),  # tombstone
    (b"[1, 2, 3]", "not_an_object"),
    (b'"just a string"', "not_an_object"),
    (b'{"text": "no id"}', "missing_id"),
    (b'{"id": 42, "text": "numeric id"}', "bad_id"),
    (b'{"id": "", "text": "empty id"}', "bad_id"),
    (b'{"id": "h1"}', "missing_text"),
    (b'{"id": "h2", "text": ["not", "a", "string"]}', "bad_text"),
    (b'{"id": "h3", "text": "   "}', "empty_text"),
    (orjson.dumps({"id": "h4", "text": "x" * 20_001}), "text_too_long"),
    (b'{"id": "h5", "text": "POISON pill"}', "scoring_failed"),
    (b'{"id": "ok1", "text": "a perfectly fine comment", "lang": "en"}', None),
    (b'{"id": "ok2", "text": "you idiot"}', None),
    # Near the 1 MB message limit: the outputs must shrink to fit instead of crashing the worker.
    (b"\xff" * 800_000, "not_utf8"),
    (orjson.dumps({"id": "big-meta", "text": "fine", "blob": "x" * 800_000}), None),
]


def check_original(out: dict[str, Any], value: bytes | None) -> None:
    """A dead letter's original bytes, whole or (for huge inputs) a declared prefix."""
    original = base64.b64decode(out["original_b64"])
    if out.get("original_truncated"):
        assert (value or b"").startswith(original) and out["original_size"] == len(value or b"")
    else:
        assert original == (value or b"")


async def test_hostile_mix_yields_exactly_one_output_per_input() -> None:
    broker, sink = setup(partitions=2)
    for i, (value, _) in enumerate(HOSTILE):
        broker.produce(IN, value, key=f"k{i}".encode())
    metrics = PipelineMetrics()
    model = TrivialScorer(batch_size=4, poison_marker="POISON")
    w = MemoryWorker(
        broker, GROUP, IN, BatchProcessor(model, threshold=0.5), sink, observer=metrics
    )
    await w.run_until_idle()

    by_source = {}
    for record in broker.records(OUT) + broker.records(DLQ):
        o = orjson.loads(record.value)
        key = (o["source"]["partition"], o["source"]["offset"])
        assert key not in by_source, f"two outputs for {key}"
        by_source[key] = (record.topic, o, record.key)
    inputs = {(r.partition, r.offset): r for r in broker.records(IN)}
    assert by_source.keys() == inputs.keys()

    for key, record in inputs.items():
        topic, out, out_key = by_source[key]
        reason = HOSTILE[int(record.key[1:])][1]
        assert out_key == record.key  # published with the input's key
        assert out["source"] == {"topic": IN, "partition": key[0], "offset": key[1]}
        if reason is None:
            assert topic == OUT and out["id"] in ("ok1", "ok2", "big-meta")
        else:
            assert topic == DLQ and out["reason"] == reason and out["reason"] in REASONS
            check_original(out, record.value)
            assert out["error"]
    ok1 = next(o for _, o, _ in by_source.values() if o.get("id") == "ok1" and "p_hateful" in o)
    assert ok1["meta"] == {"lang": "en"}
    assert ok1["model"]["base_model"] == "trivial-keyword-scorer"

    dead = {
        s.labels["reason"]: s.value
        for m in metrics.registry.collect()
        if m.name == "moderation_dead_letters"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert sum(dead.values()) == 14 and dead["invalid_json"] == 2 and dead["not_utf8"] == 2
    assert metrics.registry.get_sample_value("moderation_events_in_total") == len(HOSTILE)
    assert_nothing_committed_without_output(broker)
    assert broker.committed(GROUP, IN, 0) + broker.committed(GROUP, IN, 1) == len(HOSTILE)


async def test_failed_publish_then_restart_loses_nothing() -> None:
    broker, sink = setup()
    produce_comments(broker, 40)
    first = worker(broker, sink)
    await first.start()
    await asyncio.sleep(0.05)
    sink.fail_publishes = 1  # the broker refuses the next produce request
    produce_comments(broker, 20, start=40)
    with pytest.raises(PipelineFailure):
        await first.wait_idle()
    await first.kill()
    assert_nothing_committed_without_output(broker)
    assert len(outputs(broker)) < 60

    await worker(broker, sink).run_until_idle()  # the restart resumes from committed offsets
    assert_every_input_has_an_output(broker)
    assert_nothing_committed_without_output(broker)


async def test_killed_mid_batch_then_restart_loses_nothing() -> None:
    broker, sink = setup()
    produce_comments(broker, 24)
    slow = worker(broker, sink, delay_s=0.05)
    await slow.start()
    while len(outputs(broker)) < 8:
        await asyncio.sleep(0.005)
    await slow.kill()  # a batch is in the model or queued: none of it may be committed
    assert len(outputs(broker)) < 24
    assert_nothing_committed_without_output(broker)

    await worker(broker, sink).run_until_idle()
    assert_every_input_has_an_output(broker)
    ids = [o["id"] for o in outputs(broker)]
    assert set(ids) == {f"c{i}" for i in range(24)}  # duplicates allowed, by id


async def test_broken_model_stops_unacked_and_a_healthy_restart_scores_everything() -> None:
    broker, sink = setup()
    produce_comments(broker, 30)
    broken = worker(broker, sink, fail_after_calls=2)
    with pytest.raises(PipelineFailure, match="model unavailable"):
        await broken.run_until_idle()
    assert_nothing_committed_without_output(broker)
    assert not any(o.get("reason") == "scoring_failed" for o in outputs(broker))

    await worker(broker, sink).run_until_idle()
    assert_every_input_has_an_output(broker)


async def take_style_worker(broker: MemoryBroker, sink: MemorySink) -> None:
    """What `stream.take()` does: ack the buffer in `finally:`, even when processing raised."""
    processor = BatchProcessor(TrivialScorer(batch_size=4), threshold=0.5)
    batcher: Batcher[Record] = Batcher(4, max_wait_s=0.01)
    records = broker.records(IN)
    committed: dict[int, int] = {}
    for record in records:
        e = admit(
            record.value,
            key=record.key,
            source=SourcePosition(IN, record.partition, record.offset),
            handle=record,
            received_at=0.0,
        )
        batch = batcher.add(e, now=0.0)
        if batch is None:
            continue
        try:
            await sink.publish(processor.process(batch.events).outcomes)
        finally:
            for ev in batch.events:
                committed[ev.handle.partition] = ev.handle.offset + 1
                broker.commit(GROUP, IN, ev.handle.partition, ev.handle.offset + 1)


async def test_the_invariant_check_catches_take_style_acking() -> None:
    """Proof that the tests above would fail if acking were done the way `take()` does it."""
    broker, sink = setup(partitions=1)
    produce_comments(broker, 16)
    sink.fail_publishes = 1
    with pytest.raises(ConnectionError):
        await take_style_worker(broker, sink)
    with pytest.raises(AssertionError, match="committed .* past unpublished"):
        assert_nothing_committed_without_output(broker)


async def test_headers_reach_the_output_and_ours_are_added() -> None:
    broker, sink = setup(partitions=1)
    trace = ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    broker.produce(
        IN,
        orjson.dumps({"id": "h1", "text": "hi"}),
        key=b"k",
        headers=[trace, ("x-moderation-model", b"x")],
    )
    w = MemoryWorker(broker, GROUP, IN, BatchProcessor(TrivialScorer(batch_size=2), 0.5), sink)
    await w.run_until_idle()
    (record,) = broker.records(OUT)
    headers = dict(record.headers)
    assert headers["traceparent"] == trace[1]
    assert headers["x-moderation-model"] == b"trivial-keyword-scorer", "input cannot forge ours"
    assert orjson.loads(record.value)["latency_ms"] >= 0

"""Hardening of the event path without a broker: any record ends as one publishable output.

The hostile corpus runs through the same core step and record builder the Faust sink uses;
every output must fit the producer's request limit, match its published JSON Schema, and carry
the input's headers on. Time limits and the per-shape canary are checked on the pipeline.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Sequence
from typing import Any

import jsonschema
import numpy as np
import orjson
import pytest

from adapters import codecs
from moderation_worker import schemas
from moderation_worker.batching import Outcome, admit
from moderation_worker.events import REASONS, SourcePosition, parse_comment
from moderation_worker.pipeline import BatchPipeline, PipelineFailure
from moderation_worker.processor import BatchProcessor, ModelUnavailable
from moderation_worker.tools.trivial_scorer import TrivialScorer
from tests.hostile_corpus import CORPUS, VERDICT

LIMIT = codecs.DEFAULT_MAX_REQUEST_BYTES


def validate(value: dict[str, Any], verdict: bool) -> None:
    schema = schemas.load("verdict" if verdict else "dead-letter")
    jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())


def corpus_outcomes() -> list[Outcome[int]]:
    events = [
        admit(
            c.value,
            key=c.key,
            source=SourcePosition("comments", 0, i),
            handle=i,
            received_at=0.0,
            headers=c.headers,
        )
        for i, c in enumerate(CORPUS)
    ]
    processor = BatchProcessor(TrivialScorer(batch_size=4, poison_marker="POISON"), 0.5)
    return processor.process(events).outcomes


def test_the_corpus_is_large_and_covers_every_reason_but_none() -> None:
    assert len(CORPUS) >= 40
    expected = {c.expect for c in CORPUS}
    assert set(REASONS) <= expected
    assert VERDICT in expected


def test_dead_letter_schema_lists_exactly_the_reasons_the_code_emits() -> None:
    enum = schemas.load("dead-letter")["properties"]["reason"]["enum"]
    assert sorted(enum) == sorted(REASONS)


@pytest.mark.parametrize("case_index", range(len(CORPUS)), ids=[c.name for c in CORPUS])
def test_every_hostile_record_becomes_one_publishable_schema_valid_output(
    case_index: int,
) -> None:
    case = CORPUS[case_index]
    outcome = corpus_outcomes()[case_index]
    record = codecs.build_record(outcome, LIMIT)
    value = orjson.loads(record.value)
    is_verdict = outcome.verdict is not None
    assert (VERDICT if is_verdict else value["reason"]) == case.expect
    assert record.size <= LIMIT, "the producer would refuse it and the worker crash-loop"
    validate(value, is_verdict)

    headers = dict(record.headers)
    assert headers["x-moderation-outcome"] == (b"verdict" if is_verdict else b"dead_letter")
    assert headers["x-moderation-schema-version"] == b"1"
    if is_verdict:
        assert float(headers["x-moderation-threshold"]) == value["threshold"]
        assert headers["x-moderation-model"] == b"trivial-keyword-scorer"
    else:
        assert headers["x-moderation-reason"] == case.expect.encode()
    for name, header_value in case.headers:
        if name == "traceparent":
            assert headers["traceparent"] == header_value
    if case.key is not None and len(case.key) > codecs.MAX_KEY_BYTES:
        digest = hashlib.sha256(case.key).hexdigest()
        assert record.key == b"sha256:" + digest.encode()
        assert value["original_key_sha256"] == digest
        assert headers["x-moderation-original-key-sha256"] == digest.encode()
    else:
        assert record.key == case.key


def test_a_forged_moderation_header_is_replaced_not_passed_on() -> None:
    i = next(i for i, c in enumerate(CORPUS) if c.name == "forged moderation header")
    record = codecs.build_record(corpus_outcomes()[i], LIMIT)
    outcomes = [v for k, v in record.headers if k == "x-moderation-outcome"]
    assert outcomes == [b"dead_letter"]


def test_oversized_headers_are_dropped_except_trace_context() -> None:
    i = next(i for i, c in enumerate(CORPUS) if c.name == "200 kB of headers")
    record = codecs.build_record(corpus_outcomes()[i], LIMIT)
    names = [k for k, _ in record.headers]
    assert "traceparent" in names and "h0" not in names
    assert dict(record.headers)["x-moderation-headers-dropped"] == b"20"


def test_integers_beyond_64_bits_reach_the_verdict_exactly() -> None:
    i = next(i for i, c in enumerate(CORPUS) if c.name == "integer beyond 64 bits")
    record = codecs.build_record(corpus_outcomes()[i], LIMIT)
    assert b'"n":1180591620717411303424' in record.value


def test_small_integers_and_nested_ids_are_untouched() -> None:
    comment = parse_comment(
        b'{"id": "a", "text": "t", "user": {"id": 7}, "n": -9223372036854775808}'
    )
    assert comment.meta == {"user": {"id": 7}, "n": -(2**63)}


def test_a_verdict_whose_meta_cannot_be_encoded_drops_meta_and_says_why() -> None:
    (outcome,) = corpus_outcomes()[-1:]
    assert outcome.verdict is not None
    deep: Any = []
    for _ in range(400):  # past orjson's encoder limit, as a lower max_event_depth never allows
        deep = [deep]
    verdict = type(outcome.verdict)(**{**outcome.verdict.__dict__, "meta": {"m": deep}})
    record = codecs.build_record(Outcome(outcome.event, verdict=verdict), LIMIT)
    value = orjson.loads(record.value)
    assert value["meta_dropped"] is True and "meta" not in value and value["meta_error"]
    validate(value, verdict=True)


def test_a_minimal_record_is_small_and_valid_for_both_outcomes() -> None:
    for outcome in corpus_outcomes():
        record = codecs.minimal_record(outcome)
        assert len(record.value) < 4_000 and len(record.key or b"") <= 256 + 7
        validate(orjson.loads(record.value), outcome.verdict is not None)


def test_dead_letters_keep_the_original_bytes_or_a_declared_prefix() -> None:
    for case, outcome in zip(CORPUS, corpus_outcomes(), strict=True):
        if outcome.dead_letter is None:
            continue
        value = orjson.loads(codecs.build_record(outcome, LIMIT).value)
        original = base64.b64decode(value["original_b64"])
        if value.get("original_truncated"):
            assert (case.value or b"").startswith(original)
            assert value["original_size"] == len(case.value or b"")
        else:
            assert original == (case.value or b"")


def test_verdicts_carry_latency_from_receipt_to_score() -> None:
    clock = iter([10.0, 10.25, 10.25, 10.25]).__next__
    processor = BatchProcessor(TrivialScorer(batch_size=2), 0.5, clock=clock)
    event = admit(
        b'{"id": "a", "text": "x"}',
        key=None,
        source=SourcePosition("c", 0, 0),
        handle=0,
        received_at=10.0,
    )
    clock()  # the first tick is the receipt
    (outcome,) = processor.process([event]).outcomes
    assert outcome.verdict is not None and outcome.verdict.latency_ms == pytest.approx(250.0)


# ------------------------------------------------------------------------------ canary per shape


class ShapeBrokenModel(TrivialScorer):
    """Fails every call whose longest text is over 20 characters: one compiled shape is broken."""

    def canary_texts(self) -> list[str]:
        return ["short", "a much longer canary text for the long shape"]

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        if max(len(t) for t in texts) > 20:
            raise RuntimeError("XLA: the long shape fails to run")
        return super().predict_proba(texts)


def test_a_broken_shape_is_the_models_fault_not_the_comments() -> None:
    processor = BatchProcessor(ShapeBrokenModel(batch_size=2), 0.5)
    long_comments = [
        admit(
            orjson.dumps({"id": f"c{i}", "text": "a long comment that needs the long shape"}),
            key=None,
            source=SourcePosition("c", 0, i),
            handle=i,
            received_at=0.0,
        )
        for i in range(2)
    ]
    with pytest.raises(ModelUnavailable, match="canary 2 of 2"):
        processor.process(long_comments)


def test_with_only_the_short_canary_the_same_failure_would_dead_letter_every_long_comment() -> None:
    model = ShapeBrokenModel(batch_size=2)
    model.canary_texts = lambda: ["short"]  # type: ignore[method-assign]
    processor = BatchProcessor(model, 0.5)
    event = admit(
        orjson.dumps({"id": "c", "text": "a long comment that needs the long shape"}),
        key=None,
        source=SourcePosition("c", 0, 0),
        handle=0,
        received_at=0.0,
    )
    (outcome,) = processor.process([event]).outcomes
    assert outcome.dead_letter is not None  # the blind spot the per-shape canary closes


def test_warm_up_runs_every_shape_and_fails_on_a_broken_one() -> None:
    assert BatchProcessor(TrivialScorer(batch_size=2), 0.5).warm_up() == 1
    with pytest.raises(ModelUnavailable):
        BatchProcessor(ShapeBrokenModel(batch_size=2), 0.5).warm_up()


# ------------------------------------------------------------------------------ time limits


class HangingSink:
    async def publish(self, outcomes: Sequence[Outcome[int]]) -> None:
        await asyncio.sleep(3600)


class ListSink:
    def __init__(self) -> None:
        self.published: list[Outcome[int]] = []

    async def publish(self, outcomes: Sequence[Outcome[int]]) -> None:
        self.published.extend(outcomes)


def _event(i: int, text: str = "fine") -> Any:
    return admit(
        orjson.dumps({"id": f"c{i}", "text": text}),
        key=None,
        source=SourcePosition("c", 0, i),
        handle=i,
        received_at=0.0,
    )


async def _run_to_failure(pipeline: BatchPipeline[int], n: int) -> PipelineFailure:
    runner = asyncio.create_task(pipeline.run())
    for i in range(n):
        await pipeline.submit(_event(i, "HANG" if i == 0 else "fine"))
    with pytest.raises(PipelineFailure) as info:
        async with asyncio.timeout(10):
            await runner
    assert pipeline.failure is info.value, "the failure is visible (health) as it happens"
    return info.value


async def test_a_hung_model_fails_the_pipeline_within_the_limit_with_nothing_acked() -> None:
    acked: list[int] = []
    sink = ListSink()
    model = TrivialScorer(batch_size=2, hang_marker="HANG", hang_s=5.0)
    pipeline = BatchPipeline(
        BatchProcessor(model, 0.5),
        sink,
        lambda e: acked.append(e.handle),
        max_wait_s=0.01,
        model_timeout_s=0.3,
    )
    failure = await _run_to_failure(pipeline, 2)
    assert failure.reason == "model_timeout"
    assert acked == [] and sink.published == []


async def test_a_stalled_publish_fails_the_pipeline_within_the_limit_with_nothing_acked() -> None:
    acked: list[int] = []
    pipeline = BatchPipeline(
        BatchProcessor(TrivialScorer(batch_size=2), 0.5),
        HangingSink(),
        lambda e: acked.append(e.handle),
        max_wait_s=0.01,
        publish_timeout_s=0.3,
    )
    failure = await _run_to_failure(pipeline, 2)
    assert failure.reason == "publish_timeout"
    assert acked == []


# ------------------------------------------------------------------------------ web and topics


def test_the_web_server_binds_loopback_with_faust_debug_pages_off_by_default() -> None:
    from adapters.options import faust_options
    from moderation_worker.settings import Settings

    options = faust_options(Settings())
    assert options["web_bind"] == "127.0.0.1"
    for page in ("router", "tables", "graph", "stats", "metrics"):
        assert options[f"web_{page}_enabled"] is False
    assert options["topic_replication_factor"] == 3
    assert options["producer_request_timeout"] == Settings().publish_timeout_s
    container = faust_options(Settings(web_bind="0.0.0.0", topic_replication_factor=1))
    assert container["web_bind"] == "0.0.0.0" and container["topic_replication_factor"] == 1


def test_health_reports_a_reason_code_never_the_exception_text() -> None:
    from adapters.health import failure_reason

    secret = PipelineFailure(
        "broker kafka-7.internal:9093 said: comment 'you are…'", "publish_failed"
    )
    assert failure_reason(secret) == "publish_failed"
    assert failure_reason(RuntimeError("anything")) == "internal_error"


# ------------------------------------------------------------------------------ the Faust sink


class SizeLimitedProducer:
    """Stands in for a broker whose topic `max.message.bytes` is smaller than the producer's
    limit (Tansu ignores that topic setting, so this refusal cannot be staged on it)."""

    def __init__(self, broker_limit: int, fail_other: bool = False) -> None:
        self.broker_limit = broker_limit
        self.fail_other = fail_other
        self.accepted: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]] = []

    async def send(self, topic, key, value, partition, timestamp, headers, **kw):  # noqa: ANN001
        from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.fail_other:
            future.set_exception(KafkaConnectionError("broker down"))
        elif len(value) + len(key or b"") > self.broker_limit:
            future.set_exception(MessageSizeTooLargeError("broker: record too large"))
        else:
            self.accepted.append((topic, key, value, headers))
            future.set_result(None)
        return future


def _sink(producer: SizeLimitedProducer) -> Any:
    from types import SimpleNamespace

    from adapters.sink import FaustSink
    from moderation_worker.settings import Settings

    conf = SimpleNamespace(producer_max_request_size=1_000_000, id="t")
    return FaustSink(SimpleNamespace(conf=conf, producer=producer), Settings())


async def test_a_record_the_broker_refuses_for_its_size_is_replaced_by_a_minimal_one() -> None:
    outcomes = corpus_outcomes()
    big = next(o for c, o in zip(CORPUS, outcomes, strict=True) if c.name == "800 kB meta")
    small = next(o for c, o in zip(CORPUS, outcomes, strict=True) if c.name == "fine")
    producer = SizeLimitedProducer(broker_limit=10_000)
    await _sink(producer).publish([big, small])
    assert len(producer.accepted) == 2, "one record per outcome, none lost"
    values = {orjson.loads(v)["id"]: orjson.loads(v) for _, _, v, _ in producer.accepted}
    assert values["big-meta"]["minimal"] is True and "meta" not in values["big-meta"]
    assert "minimal" not in values["ok1"]
    validate(values["big-meta"], verdict=True)


async def test_a_broker_outage_is_not_mistaken_for_a_size_refusal() -> None:
    from aiokafka.errors import KafkaConnectionError

    with pytest.raises(KafkaConnectionError):
        await _sink(SizeLimitedProducer(10_000, fail_other=True)).publish(corpus_outcomes()[-1:])

"""The Faust adapter's pieces that need no broker: configuration, readiness, threshold reload,
codecs, JSON logs and the Tansu helper."""

from __future__ import annotations

import asyncio
import base64
import logging
import sys
import threading
from pathlib import Path

import faust
import orjson
import pytest
from faust.serializers import codecs as faust_codecs
from faust.types.enums import ProcessingGuarantee

from adapters import codecs
from adapters.jsonlog import JsonFormatter, logging_config
from adapters.moderation import Moderation
from adapters.sink import FaustSink
from adapters.tansu import TansuBroker, free_port, kafka_ready
from moderation_worker.batching import Outcome, admit
from moderation_worker.events import SourcePosition
from moderation_worker.processor import BatchProcessor
from moderation_worker.settings import Settings, SettingsError
from moderation_worker.threshold_source import ThresholdSource
from moderation_worker.tools.trivial_scorer import TrivialScorer


def settings(**kw: object) -> Settings:
    return Settings(broker_url="kafka://127.0.0.1:1", **kw)


def build_app(s: Settings, model: object) -> faust.App:
    return Moderation(s, model).standalone_app()  # type: ignore[arg-type]


def test_app_is_configured_from_settings() -> None:
    s = settings(
        app_id="mw-test-conf",
        session_timeout_s=3,
        heartbeat_interval_s=0.5,
        rebalance_timeout_s=3,
        commit_interval_s=0.5,
        web_port=7001,
        input_partitions=4,
    )
    app = build_app(s, TrivialScorer(batch_size=8))
    conf = app.conf
    assert conf.id == "mw-test-conf"
    assert (conf.broker_session_timeout, conf.broker_heartbeat_interval) == (3, 0.5)
    assert (conf.broker_rebalance_timeout, conf.broker_commit_interval) == (3, 0.5)
    assert conf.consumer_auto_offset_reset == "earliest"
    assert conf.stream_wait_empty and conf.web_port == 7001 and conf.topic_partitions == 4
    assert conf.processing_guarantee == ProcessingGuarantee.AT_LEAST_ONCE
    agent = next(iter(app.agents.values()))
    assert agent.channel.get_topic_name() == "comments"
    assert {"/health", "/metrics"} <= set(app.web.views)


def test_exactly_once_is_a_config_choice_and_uses_the_input_partitions_transaction() -> None:
    s = settings(app_id="mw-test-eos", processing_guarantee="exactly_once")
    app = build_app(s, TrivialScorer(batch_size=8))
    assert app.conf.processing_guarantee == ProcessingGuarantee.EXACTLY_ONCE
    app.assignor.group_for_topic = lambda topic: 0  # type: ignore[method-assign]
    sink = FaustSink(app, s)
    tid = sink._transactional_id(SourcePosition("comments", 3, 17))
    # Faust names a partition's transactional producer "{app id}-{topic group}-{partition}".
    assert tid == "mw-test-eos-0-3"
    assert (
        FaustSink(build_app(settings(app_id="x"), TrivialScorer()), settings())._transactional_id(
            SourcePosition("comments", 3, 17)
        )
        is None
    )


async def test_a_model_factory_is_loaded_once_and_readiness_follows() -> None:
    calls = []

    def factory() -> TrivialScorer:
        calls.append(1)
        return TrivialScorer(batch_size=8)

    app = build_app(settings(app_id="mw-test-factory"), factory)
    state = Moderation.of(app)
    body, status = state.health()
    assert status == 503 and body["status"] == "starting" and not body["model_loaded"]
    await state.load_model()
    await state.load_model()
    assert calls == [1] and state.model is not None
    body, status = state.health()
    assert body["model_loaded"] and body["model"]["base_model"] == "trivial-keyword-scorer"
    assert status == 503  # no pipeline yet: the agent has not started consuming


def test_threshold_source_rereads_the_file_and_keeps_the_old_value_on_error(tmp_path: Path) -> None:
    path = tmp_path / "threshold.toml"
    path.write_text("threshold = 0.3\n")
    holder = ThresholdSource(settings(threshold_file=path))
    assert holder() == 0.3
    path.write_text("threshold = 0.8\n")
    assert holder.reload().value == 0.8 and holder() == 0.8
    path.write_text("threshold = banana\n")
    with pytest.raises(SettingsError):
        holder.reload()
    assert holder() == 0.8


def test_sighup_handler_counts_reloads_and_survives_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "threshold.toml"
    path.write_text("threshold = 0.3\n")
    state = Moderation.of(
        build_app(settings(app_id="mw-test-hup", threshold_file=path), TrivialScorer())
    )
    path.write_text("threshold = 0.6\n")
    state.reload_threshold()
    path.unlink()
    state.reload_threshold()  # logged and counted, never raised into the event loop
    reg = state.metrics.registry
    assert reg.get_sample_value("moderation_threshold_reloads_total", {"result": "ok"}) == 1
    assert reg.get_sample_value("moderation_threshold_reloads_total", {"result": "error"}) == 1
    assert reg.get_sample_value("moderation_threshold") == 0.6 and state.threshold() == 0.6


def test_reload_settings_hook_lets_the_cli_rebuild_everything(tmp_path: Path) -> None:
    holder = ThresholdSource(
        settings(threshold=0.2), reload_settings=lambda: settings(threshold=0.9)
    )
    assert holder() == 0.2 and holder.reload().value == 0.9


def test_orjson_codec_is_registered_with_faust() -> None:
    obj = {"id": "c1", "p": 0.25, "meta": {"x": [1, 2]}}
    assert faust_codecs.loads("orjson", faust_codecs.dumps("orjson", obj)) == obj
    assert codecs.loads(codecs.dumps(obj)) == obj


def _outcome(raw: bytes, model: TrivialScorer | None = None) -> Outcome[int]:
    event = admit(raw, key=b"k", source=SourcePosition("c", 0, 0), handle=0, received_at=0)
    processor = BatchProcessor(model or TrivialScorer(batch_size=1), threshold=0.5)
    return processor.process([event]).outcomes[0]


def test_outputs_shrink_to_fit_the_message_size_limit() -> None:
    limit = 10_000
    small = _outcome(orjson.dumps({"id": "a", "text": "hi", "lang": "en"}))
    assert orjson.loads(codecs.encode_outcome(small, limit))["meta"] == {"lang": "en"}

    big_meta = _outcome(orjson.dumps({"id": "a", "text": "hi", "blob": "x" * 50_000}))
    out = codecs.encode_outcome(big_meta, limit)
    assert len(out) <= limit and orjson.loads(out)["meta_dropped"] is True
    assert orjson.loads(out)["id"] == "a"

    big_dlq = _outcome(b"\xff" * 50_000)
    out = codecs.encode_outcome(big_dlq, limit)
    value = orjson.loads(out)
    assert len(out) <= limit and value["original_truncated"] and value["original_size"] == 50_000
    assert b"\xff" * 100 in base64.b64decode(value["original_b64"])

    huge_id = _outcome(orjson.dumps({"id": "i" * 50_000, "text": "hi"}))
    out = codecs.encode_outcome(huge_id, limit)
    assert len(out) <= limit and orjson.loads(out)["truncated"] is True


def test_json_log_lines_carry_extras_and_exceptions() -> None:
    formatter = JsonFormatter()
    record = logging.makeLogRecord(
        {"name": "w", "levelname": "INFO", "msg": "batch %d", "args": (3,), "batch_rows": 8}
    )
    out = orjson.loads(formatter.format(record))
    assert out["msg"] == "batch 3" and out["batch_rows"] == 8 and out["level"] == "INFO"
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.makeLogRecord({"msg": "failed", "exc_info": sys.exc_info()})
    assert "ValueError: boom" in orjson.loads(formatter.format(record))["exc"]
    config = logging_config("DEBUG")
    assert config["root"]["level"] == "DEBUG"


def test_kafka_ready_is_false_where_nothing_listens() -> None:
    assert not kafka_ready("127.0.0.1", free_port(), timeout=0.2)


@pytest.mark.broker
def test_tansu_starts_answers_and_stops_cleanly() -> None:
    broker = TansuBroker()
    with broker:
        assert broker.running and kafka_ready(broker.host, broker.port)
        assert broker.url == f"kafka://127.0.0.1:{broker.port}"
    assert not broker.running and not kafka_ready("127.0.0.1", broker.port, timeout=0.2)


async def test_worker_state_executor_is_single_threaded() -> None:
    """One model call at a time: the model is not assumed to be thread-safe."""
    state = Moderation.of(build_app(settings(app_id="mw-test-exec"), TrivialScorer()))
    loop = asyncio.get_running_loop()
    names = await asyncio.gather(
        *(
            loop.run_in_executor(state.executor, lambda: threading.current_thread().name)
            for _ in range(4)
        )
    )
    assert len(set(names)) == 1

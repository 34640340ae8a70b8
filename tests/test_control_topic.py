"""The control topic through a real Kafka-protocol broker (embedded Tansu, or
MODERATION_TEST_BROKER): a reader catches up before it returns, follows live changes, shrugs off
malformed records, and the `control` commands check before they publish."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters.control_topic import (
    ControlTopicReader,
    ensure_control_topic,
    publish_control,
    read_control,
)
from moderation_worker.cli import main
from moderation_worker.control_records import record_for_mode, record_for_threshold, tombstone
from moderation_worker.policy import ControlState, PolicyState, policy_from_settings
from moderation_worker.settings import ClassifierConfig, Settings
from tests.fixtures_broker import BrokerInfo, produce

pytestmark = pytest.mark.broker


def control_settings(broker: BrokerInfo) -> Settings:
    return Settings(
        broker_url=broker.url,
        topic_replication_factor=1,
        control_topic=f"control-{uuid.uuid4().hex[:8]}",
        classifiers=(
            ClassifierConfig(name="hate", threshold=0.5),
            ClassifierConfig(name="violence"),
        ),
        routes={"gaming": ("hate", "violence")},
    )


async def until(state: ControlState, check: Callable[[PolicyState], bool], within: float) -> float:
    """Seconds until `check(state.snapshot())` holds; fails after `within` seconds."""
    start = time.monotonic()
    while not check(state.snapshot()):
        assert time.monotonic() - start < within, f"not applied within {within} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_a_reader_catches_up_then_follows_live_changes(broker: BrokerInfo) -> None:
    settings = control_settings(broker)
    topic = settings.control_topic
    assert topic is not None
    for record in (
        record_for_threshold("hate", 0.7, by="alice", reason="launch"),
        record_for_threshold("hate", 0.9, "gaming"),
        record_for_mode("violence", "shadow"),
    ):
        await publish_control(settings, topic, *record)
    await produce(broker, topic, [(b"threshold/nope", b'{"threshold": 0.1}'), (b"k", b"{bad")])
    assert await publish_control(settings, topic, *record_for_threshold("hate", 0.75)) == 5

    state = ControlState(policy_from_settings(settings))
    events: list[tuple[str, str | None]] = []
    reader = ControlTopicReader(settings, topic, state, on_record=lambda *e: events.append(e))
    await reader.start(timeout_s=20)
    try:
        # caught up before start() returned: the latest of every key, in order
        snap = state.snapshot()
        assert reader.caught_up and snap.version == 6
        assert snap.threshold("hate").to_dict() == {
            "value": 0.75,
            "source": "control",
            "detail": "threshold/hate",
        }
        assert snap.threshold("hate", "gaming").value == 0.9 and snap.mode("violence") == "shadow"
        assert (reader.records_applied, reader.records_rejected) == (4, 2)
        assert [r for r, _ in events].count("rejected") == 2
        assert "no classifier 'nope'" in next(reason for r, reason in events if reason)

        # a record published while it runs is applied within 2 s
        await publish_control(settings, topic, *record_for_threshold("violence", 0.33, "kids"))
        await until(state, lambda s: s.threshold("violence", "kids").value == 0.33, within=2.0)
        assert state.snapshot().threshold("violence", "kids").source == "control"
        assert state.snapshot().threshold("violence", "news").source == "default"

        # a malformed one is counted and ignored
        before = state.snapshot()
        await produce(broker, topic, [(b"mode/hate", b'{"mode": "off"}')])
        deadline = time.monotonic() + 5
        while reader.records_rejected < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert reader.records_rejected == 3 and state.snapshot() is before

        # a tombstone removes the override: the configured value is back
        await publish_control(settings, topic, *tombstone("threshold/hate"))
        await until(state, lambda s: s.threshold("hate").source == "setting", within=2.0)
        assert state.snapshot().threshold("hate").value == 0.5
        assert state.snapshot().threshold("hate", "gaming").value == 0.9
        assert "threshold/hate" not in state.snapshot().overrides
    finally:
        await reader.stop()


async def test_a_missing_topic_is_created_and_read_as_empty(broker: BrokerInfo) -> None:
    settings = control_settings(broker)
    topic = settings.control_topic
    assert topic is not None
    assert await read_control(settings, topic) == []
    state = ControlState(policy_from_settings(settings))
    reader = ControlTopicReader(settings, topic, state)
    await reader.start(timeout_s=20)
    await reader.stop()
    assert reader.caught_up and state.snapshot().version == 0
    assert await ensure_control_topic(settings, topic) is False  # there now
    assert await read_control(settings, topic) == []


@pytest.fixture
def cli_env(broker: BrokerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A config file with two classifiers and a fresh control topic, as the CLI reads it (from
    MODERATION_CONFIG_FILE, or --config)."""
    topic = f"control-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "worker.toml"
    config.write_text(
        f'broker_url = "{broker.url}"\ntopic_replication_factor = 1\n'
        f'control_topic = "{topic}"\n\n'
        '[[classifiers]]\nname = "hate"\n\n[[classifiers]]\nname = "violence"\nmode = "shadow"\n'
    )
    monkeypatch.setenv("MODERATION_CONFIG_FILE", str(config))  # restored after the test
    return Settings(broker_url=broker.url, topic_replication_factor=1, control_topic=topic)


def records_on(settings: Settings) -> list[Any]:
    assert settings.control_topic is not None
    return asyncio.run(read_control(settings, settings.control_topic))


@pytest.mark.parametrize(
    "argv",
    [
        ["set-threshold", "hate", "1.5"],
        ["set-threshold", "hate", "nan"],
        ["set-threshold", "hate", "high"],
        ["set-threshold", "nope", "0.5"],
        ["set-threshold", "hate", "0.5", "--community", "a/b"],
        ["set-route", "gaming", "hate,nope"],
        ["set-route", "gaming", ","],
        ["clear", "threshold"],
    ],
)
def test_the_cli_rejects_a_bad_change_and_publishes_nothing(
    cli_env: Settings, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    config = ["--config", os.environ["MODERATION_CONFIG_FILE"]]
    assert main(["control", *argv, *config]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moderation-worker control: error:")
    assert records_on(cli_env) == []


def test_the_cli_publishes_and_shows(cli_env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--by", "ops", "--reason", "raid"]
    assert main(["control", "set-threshold", "hate", "0.8", "--community", "gaming", *common]) == 0
    out = orjson.loads(capsys.readouterr().out)
    assert (out["key"], out["offset"], out["value"]["threshold"]) == (
        "threshold/hate/gaming",
        0,
        0.8,
    )
    assert out["value"]["by"] == "ops" and out["value"]["at"]
    assert main(["control", "set-mode", "violence", "enforce"]) == 0
    assert main(["control", "set-route", "*", "hate,violence"]) == 0
    assert main(["control", "clear", "mode/violence"]) == 0
    capsys.readouterr()
    assert main(["control", "show"]) == 0
    shown = orjson.loads(capsys.readouterr().out)
    state = shown["state"]
    assert shown["topic"] == cli_env.control_topic and state["version"] == 4
    assert state["classifiers"]["hate"]["community_thresholds"]["gaming"]["source"] == "control"
    assert state["classifiers"]["violence"]["mode"] == "shadow"  # the clear restored the config
    assert state["default_route"] == ["hate", "violence"]
    assert [(r["offset"], r["key"], r["result"]) for r in shown["records"]] == [
        (0, "threshold/hate/gaming", "applied"),
        (1, "mode/violence", "applied"),
        (2, "route/*", "applied"),
        (3, "mode/violence", "applied"),
    ]
    assert shown["records"][3]["value"] is None


def test_without_a_control_topic_the_commands_say_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MODERATION_CONFIG_FILE", raising=False)
    monkeypatch.setenv("MODERATION_CONTROL_TOPIC", "")
    assert main(["control", "show"]) == 2
    assert "control_topic is not set" in capsys.readouterr().err


def test_calibrate_publish_checks_first_then_publishes_the_threshold(
    cli_env: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moderation_worker.threshold_source import write_threshold_file
    from moderation_worker.thresholds import ThresholdChoice
    from moderation_worker.tools import commands

    calls: list[str] = []

    def fake_calibrate(args: Any) -> int:  # the real one trains nothing but needs a model
        calls.append(args.out)
        write_threshold_file(
            args.out, ThresholdChoice(0.37, "max-f1", 0.9, 0.1, 0.8, 0.9, 0.85, 50, 10)
        )
        return 0

    monkeypatch.setattr(commands, "cmd_calibrate", fake_calibrate)
    out = str(tmp_path / "t.toml")
    argv = ["calibrate", "--model", "tiny", "--data", "d.csv", "--out", out, "--publish"]
    assert main([*argv, "--classifier", "nope"]) == 2
    assert main(argv) == 2  # two classifiers configured: which one?
    assert calls == [] and records_on(cli_env) == []
    assert main([*argv, "--classifier", "violence"]) == 0
    [(offset, key, value)] = records_on(cli_env)
    assert (offset, key) == (0, b"threshold/violence")
    published = orjson.loads(value)
    assert (published["threshold"], published["by"]) == (0.37, "calibrate")
    assert "max-f1" in published["reason"] and published["at"]

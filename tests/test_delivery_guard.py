"""Faust's own environment variables must not silently weaken at-least-once delivery.

Each of them overrides what `Moderation.standalone_app()` passes to `faust.App`; the worker must
refuse to start, naming the value and the variable, instead of running with acks=0 or skipping
comments.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import faust
import pytest

from adapters.delivery_guard import DeliveryConfigError, check_delivery_conf
from adapters.moderation import Moderation
from adapters.options import faust_options
from moderation_worker.cli import main
from moderation_worker.settings import Settings, SettingsError
from moderation_worker.tools.trivial_scorer import TrivialScorer
from tests.fixtures_broker import REPO_ROOT, BrokerInfo, TopicSet, worker_env

FAUST_ENV = (
    "PRODUCER_ACKS",
    "STREAM_WAIT_EMPTY",
    "CONSUMER_AUTO_OFFSET_RESET",
    "PROCESSING_GUARANTEE",
    "APP_ENV_PREFIX",
    "NO_CYTHON",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in FAUST_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MODERATION_CONFIG_FILE", raising=False)


def settings(**kw: Any) -> Settings:
    return Settings(broker_url="kafka://127.0.0.1:1", app_id="mw-delivery-guard", **kw)


def build(**kw: Any) -> faust.App:
    return Moderation(settings(**kw), TrivialScorer(batch_size=8)).standalone_app()


def test_the_default_configuration_passes() -> None:
    app = build()
    assert app.conf.producer_acks == -1 and app.conf.stream_wait_empty


@pytest.mark.parametrize(
    ("variable", "value", "shown"),
    [
        ("PRODUCER_ACKS", "0", "producer_acks=0"),
        ("PRODUCER_ACKS", "1", "producer_acks=1"),
        ("STREAM_WAIT_EMPTY", "false", "stream_wait_empty=False"),
        ("CONSUMER_AUTO_OFFSET_RESET", "latest", "consumer_auto_offset_reset=latest"),
        ("PROCESSING_GUARANTEE", "exactly_once", "processing_guarantee=exactly_once"),
    ],
)
def test_a_weakening_faust_variable_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, shown: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(DeliveryConfigError) as err:
        build()
    message = str(err.value)
    assert f"{shown} (set by environment variable {variable}) breaks at-least-once" in message
    assert f"unset {variable}" in message
    assert isinstance(err.value, SettingsError)  # the CLI's clean exit-2 path


def test_processing_guarantee_must_match_the_settings_either_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROCESSING_GUARANTEE", "at_least_once")
    with pytest.raises(DeliveryConfigError, match="PROCESSING_GUARANTEE"):
        build(processing_guarantee="exactly_once")
    monkeypatch.setenv("PROCESSING_GUARANTEE", "exactly_once")
    build(processing_guarantee="exactly_once")  # agreeing with the settings is fine


def test_producer_acks_all_spelled_out_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRODUCER_ACKS", "all")
    build()


def test_faust_env_prefix_is_honoured_in_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_ENV_PREFIX", "MW_")
    monkeypatch.setenv("MW_PRODUCER_ACKS", "0")
    with pytest.raises(DeliveryConfigError, match="environment variable MW_PRODUCER_ACKS"):
        build()


def test_every_offence_is_listed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRODUCER_ACKS", "0")
    monkeypatch.setenv("CONSUMER_AUTO_OFFSET_RESET", "latest")
    with pytest.raises(DeliveryConfigError) as err:
        build()
    assert "PRODUCER_ACKS" in str(err.value) and "CONSUMER_AUTO_OFFSET_RESET" in str(err.value)


def test_a_weak_value_passed_in_code_is_refused_too() -> None:
    s = settings()
    conf = faust.Settings(s.app_id, **{**faust_options(s), "producer_acks": 1})
    with pytest.raises(DeliveryConfigError, match=r"producer_acks=1 \(passed to faust.App\)"):
        check_delivery_conf(conf, s)


def test_no_cython_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_CYTHON", "1")
    with pytest.raises(DeliveryConfigError, match="environment variable NO_CYTHON"):
        build()


def test_a_missing_compiled_stream_iterator_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import faust.streams

    assert faust.streams._CStreamIterator is not None, "this venv has the compiled iterator"
    monkeypatch.setattr(faust.streams, "_CStreamIterator", None)
    with pytest.raises(DeliveryConfigError, match=r"faust\._cython\.streams cannot be imported"):
        build()


def test_cli_worker_refuses_before_loading_the_model(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODERATION_BROKER_URL", "kafka://127.0.0.1:1")
    monkeypatch.setenv("PRODUCER_ACKS", "0")
    loaded: list[str] = []
    import moderation_worker.model.sources

    monkeypatch.setattr(
        moderation_worker.model.sources, "build_classifier", lambda *a, **k: loaded.append("model")
    )
    with pytest.raises(SystemExit) as exc:
        main(["worker"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "producer_acks=0 (set by environment variable PRODUCER_ACKS)" in err
    assert "Traceback" not in err and not loaded


def test_cli_worker_process_exits_2_with_the_message_and_no_traceback(tmp_path: Any) -> None:
    env = {k: v for k, v in os.environ.items() if k not in FAUST_ENV}
    env.pop("MODERATION_CONFIG_FILE", None)
    env.update(
        MODERATION_BROKER_URL="kafka://127.0.0.1:1",  # nothing listens: the check comes first
        STREAM_WAIT_EMPTY="false",
        TMPDIR=str(tmp_path),
    )
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "moderation_worker.cli", "worker"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "stream_wait_empty=False (set by environment variable STREAM_WAIT_EMPTY)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 60  # no model load, no broker wait


@pytest.mark.broker
def test_a_worker_process_with_producer_acks_0_exits_non_zero_naming_it(
    broker: BrokerInfo, topics: TopicSet, spawn_worker: Any
) -> None:
    """The worker entry point the broker tests use (`Moderation.run` -> `standalone_app`)."""
    worker = spawn_worker({**worker_env(broker, topics, partitions=1), "PRODUCER_ACKS": "0"})
    rc = worker.wait(60)
    assert rc != 0
    assert "producer_acks=0 (set by environment variable PRODUCER_ACKS)" in worker.log_tail(20_000)
    assert worker.health() is None  # it never served /health as ready


@pytest.mark.parametrize(
    ("variable", "value", "setting"),
    [
        ("WEB_BIND", "0.0.0.0", "web_bind"),
        ("TOPIC_REPLICATION_FACTOR", "1", "topic_replication_factor"),
    ],
)
def test_any_faust_variable_overriding_a_worker_option_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, setting: str
) -> None:
    from adapters.delivery_guard import DeliveryConfigError, preflight
    from moderation_worker.settings import Settings

    monkeypatch.setenv(variable, value)
    with pytest.raises(DeliveryConfigError) as info:
        preflight(Settings())
    assert f"{setting}=" in str(info.value) and f"unset {variable}" in str(info.value)


def test_a_faust_variable_that_agrees_with_the_worker_is_not_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from adapters.delivery_guard import preflight
    from moderation_worker.settings import Settings

    monkeypatch.setenv("WEB_BIND", "127.0.0.1")
    preflight(Settings())

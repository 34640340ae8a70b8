"""Settings: env prefix, TOML file, precedence, and failures that name the setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moderation_worker.settings import (
    CONFIG_FILE_ENV,
    Settings,
    SettingsError,
    load_settings,
)
from moderation_worker.threshold_source import (
    ThresholdInForce,
    read_threshold_file,
    threshold_for,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MODERATION_* variables from the outside; whatever a test sets is undone after it."""
    monkeypatch.setenv(CONFIG_FILE_ENV, "placeholder")  # recorded, so teardown removes it again
    for name in list(os.environ):
        if name.startswith("MODERATION_"):
            monkeypatch.delenv(name)


def test_defaults_are_right_for_apache_kafka() -> None:
    s = Settings()
    assert (s.input_topic, s.verdict_topic, s.dlq_topic) == (
        "comments",
        "comments.verdicts",
        "comments.dlq",
    )
    assert s.processing_guarantee == "at_least_once"
    assert (s.session_timeout_s, s.heartbeat_interval_s, s.rebalance_timeout_s) == (60, 3, 60)
    assert s.max_text_chars == 20_000


def test_environment_variables_use_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODERATION_BATCH_SIZE", "32")
    monkeypatch.setenv("MODERATION_PROCESSING_GUARANTEE", "exactly_once")
    monkeypatch.setenv("MODERATION_SESSION_TIMEOUT_S", "3")
    monkeypatch.setenv("MODERATION_HEARTBEAT_INTERVAL_S", "0.5")
    s = Settings()
    assert s.batch_size == 32 and s.processing_guarantee == "exactly_once"
    assert (s.session_timeout_s, s.heartbeat_interval_s) == (3.0, 0.5)


def test_toml_file_is_read_and_env_wins_over_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('input_topic = "posts"\nbatch_size = 16\nmax_wait_ms = 50\n')
    monkeypatch.setenv("MODERATION_BATCH_SIZE", "4")
    s = load_settings(config)
    assert (s.input_topic, s.batch_size, s.max_wait_ms) == ("posts", 4, 50)


@pytest.mark.parametrize(
    ("env", "value", "names"),
    [
        ("MODERATION_BATCH_SIZE", "0", "batch_size"),
        ("MODERATION_MAX_WAIT_MS", "soon", "max_wait_ms"),
        ("MODERATION_THRESHOLD", "1.5", "threshold"),
        ("MODERATION_PROCESSING_GUARANTEE", "at_most_once", "processing_guarantee"),
        ("MODERATION_BROKER_URL", "localhost:9092", "broker_url"),
        ("MODERATION_VERDICT_TOPIC", "comments", "topics must differ"),
        ("MODERATION_HEARTBEAT_INTERVAL_S", "120", "heartbeat_interval_s"),
        ("MODERATION_MODEL_RETRIES", "-1", "model_retries"),
    ],
)
def test_invalid_config_fails_at_start_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, names: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError, match=names):
        load_settings()


def test_unknown_keys_in_the_file_are_rejected(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text("batch_sise = 16\n")
    with pytest.raises(SettingsError, match="batch_sise"):
        load_settings(config)


def test_missing_or_broken_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(SettingsError, match="TOML"):
        load_settings(bad)


class Calibrated:
    calibrated_threshold = 0.61


def test_threshold_precedence_value_then_file_then_model_then_default(tmp_path: Path) -> None:
    path = tmp_path / "threshold.toml"
    path.write_text('threshold = 0.42\npolicy = "max_f1"\n')
    assert threshold_for(Settings()) == ThresholdInForce(0.5, "default", "no threshold configured")
    assert threshold_for(Settings(), Calibrated()).value == 0.61
    assert threshold_for(Settings(), Calibrated()).source == "model"
    in_force = threshold_for(Settings(threshold_file=path), Calibrated())
    assert (in_force.value, in_force.source) == (0.42, "file") and "max_f1" in in_force.detail
    in_force = threshold_for(Settings(threshold_file=path, threshold=0.3), Calibrated())
    assert (in_force.value, in_force.source) == (0.3, "setting")


def test_threshold_file_is_reread_on_every_resolution(tmp_path: Path) -> None:
    """What SIGHUP relies on: the same settings object picks up an edited file."""
    path = tmp_path / "threshold.toml"
    path.write_text("threshold = 0.42\n")
    settings = Settings(threshold_file=path)
    assert threshold_for(settings).value == 0.42
    path.write_text("threshold = 0.7\n")
    assert threshold_for(settings).value == 0.7


@pytest.mark.parametrize("content", ["threshold = 1.5\n", 'threshold = "high"\n', "x = 1\n"])
def test_bad_threshold_files_are_rejected(tmp_path: Path, content: str) -> None:
    path = tmp_path / "t.toml"
    path.write_text(content)
    with pytest.raises(SettingsError, match="threshold"):
        read_threshold_file(path)
    with pytest.raises(SettingsError, match="does not exist"):
        read_threshold_file(tmp_path / "absent.toml")


def test_public_dict_is_json_friendly() -> None:
    d = Settings(threshold_file=Path("/tmp/t.toml")).public_dict()
    assert d["threshold_file"] == "/tmp/t.toml" and d["batch_size"] == 8


def test_length_buckets_setting(monkeypatch) -> None:
    from moderation_worker.settings import Settings, SettingsError, load_settings

    assert Settings().length_buckets == (64, 96)
    monkeypatch.setenv("MODERATION_LENGTH_BUCKETS", "[64, 32, 64]")
    assert load_settings().length_buckets == (32, 64)
    monkeypatch.setenv("MODERATION_LENGTH_BUCKETS", "[]")
    assert load_settings().length_buckets == ()
    monkeypatch.setenv("MODERATION_LENGTH_BUCKETS", "[4]")
    with pytest.raises(SettingsError, match="length_buckets"):
        load_settings()

"""Settings of the classifiers, routes and the control topic: TOML and environment spellings, and
every inconsistent combination refused at start with the setting named."""

from __future__ import annotations

from pathlib import Path

import pytest

from moderation_worker.settings import ClassifierConfig, Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODERATION_CONFIG_FILE", "MODERATION_CONTROL_TOPIC", "MODERATION_CLASSIFIERS"):
        monkeypatch.delenv(name, raising=False)


def test_defaults() -> None:
    s = Settings()
    assert s.control_topic == "moderation.control" and s.routing_field == "community"
    assert s.classifiers == () and s.routes == {} and s.default_route is None
    assert s.spare_classifier_slots == 2


def test_the_toml_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(
        """
control_topic = "ops.control"
routing_field = "tenant"
default_route = ["hate"]

[[classifiers]]
name = "hate"
threshold = 0.6
community_thresholds = { kids = 0.3 }

[[classifiers]]
name = "violence"
lora = "path/x.lora.h5"
mode = "shadow"

[routes]
gaming = ["hate", "violence"]
"""
    )
    s = load_settings(config)
    monkeypatch.delenv("MODERATION_CONFIG_FILE")
    assert [c.name for c in s.classifiers] == ["hate", "violence"]
    violence = s.classifiers[1]
    assert (violence.lora, violence.mode, violence.threshold) == ("path/x.lora.h5", "shadow", None)
    assert s.classifiers[0].community_thresholds == {"kids": 0.3}
    assert s.routes == {"gaming": ("hate", "violence")} and s.default_route == ("hate",)
    assert (s.control_topic, s.routing_field) == ("ops.control", "tenant")
    assert s.public_dict()["classifiers"][1]["mode"] == "shadow"


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODERATION_CONTROL_TOPIC", "")
    monkeypatch.setenv("MODERATION_CLASSIFIERS", '[{"name": "hate"}, {"name": "violence"}]')
    monkeypatch.setenv("MODERATION_ROUTES", '{"gaming": ["violence"]}')
    monkeypatch.setenv("MODERATION_SPARE_CLASSIFIER_SLOTS", "0")
    s = Settings()
    assert s.control_topic is None and s.spare_classifier_slots == 0
    assert [c.name for c in s.classifiers] == ["hate", "violence"]
    assert s.routes == {"gaming": ("violence",)}
    assert Settings(control_topic="  ").control_topic is None
    assert Settings(control_topic=None).control_topic is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classifiers": [{"name": "Hate"}]}, "classifiers.0.name"),
        ({"classifiers": [{"name": "-x"}]}, "classifiers.0.name"),
        ({"classifiers": [{"name": "x" * 65}]}, "classifiers.0.name"),
        ({"classifiers": [{"name": "hate", "mode": "off"}]}, "classifiers.0.mode"),
        ({"classifiers": [{"name": "hate", "threshold": 1.5}]}, "classifiers.0.threshold"),
        ({"classifiers": [{"name": "hate", "treshold": 0.5}]}, "classifiers.0.treshold"),
        (
            {"classifiers": [{"name": "hate", "community_thresholds": {"kids": -1}}]},
            "community_thresholds",
        ),
        ({"classifiers": [{"name": "hate", "community_thresholds": {"a/b": 0.5}}]}, "'a/b'"),
        ({"classifiers": [{"name": "hate"}, {"name": "hate"}]}, "unique"),
        ({"routes": {"gaming": ["violence"]}}, "routes.gaming"),
        ({"classifiers": [{"name": "hate"}], "routes": {"gaming": []}}, "routes.gaming"),
        ({"routes": {"gaming": ["hate", "hate"]}}, "distinct"),
        ({"routes": {"*": ["hate"]}}, "'\\*'"),
        ({"routes": {"x" * 129: ["hate"]}}, "1 to 128"),
        ({"default_route": ["violence"]}, "default_route"),
        ({"default_route": []}, "default_route"),
        ({"classifiers": [{"name": "v"}], "threshold": 0.5}, "threshold"),
        ({"classifiers": [{"name": "v"}], "threshold_file": "t.toml"}, "threshold_file"),
        ({"spare_classifier_slots": -1}, "spare_classifier_slots"),
        ({"routing_field": " "}, "routing_field"),
        ({"control_topic": "comments"}, "control_topic"),
    ],
)
def test_inconsistent_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(**kwargs)


def test_the_default_classifier_accepts_routes_naming_it() -> None:
    s = Settings(routes={"gaming": ("hate",)}, default_route=("hate",), threshold=0.4)
    assert s.routes == {"gaming": ("hate",)}


def test_classifier_config_is_frozen() -> None:
    c = ClassifierConfig(name="hate")
    assert (c.lora, c.mode, c.threshold, c.community_thresholds) == ("default", "enforce", None, {})
    with pytest.raises(ValueError):
        c.name = "other"  # type: ignore[misc]

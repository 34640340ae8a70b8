"""`moderation_worker.policy`: which classifiers score an event, the threshold in force and where
it came from, and control records that are applied exactly or rejected with the state unchanged."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from moderation_worker.control_records import (
    DEFAULT_ROUTE_KEY,
    ENFORCE,
    SHADOW,
    ControlRecordError,
    decode_record,
    parse_key,
    record_for_adapter,
    record_for_mode,
    record_for_route,
    record_for_threshold,
    tombstone,
    validate_record,
)
from moderation_worker.policy import (
    ClassifierPolicy,
    ControlState,
    PolicyState,
    policy_from_settings,
    single_classifier_policy,
)
from moderation_worker.settings import ClassifierConfig, Settings, SettingsError


def make_state(**overrides) -> PolicyState:
    classifiers = {
        "hate": ClassifierPolicy(
            "hate", threshold=0.6, community_thresholds={"gaming": 0.7}, calibrated_threshold=0.4
        ),
        "violence": ClassifierPolicy("violence", mode=SHADOW, calibrated_threshold=0.3),
        "directed": ClassifierPolicy("directed"),
    }
    base = PolicyState(
        classifiers=classifiers,
        default_route=("hate",),
        routes={"gaming": ("hate", "violence"), "kids": ("hate", "violence", "directed")},
    )
    return replace(base, **overrides)


def applied(state: ControlState, *records, start: int = 0) -> PolicyState:
    for offset, (key, value) in enumerate(records, start):
        state.apply(key, value, offset)
    return state.snapshot()


# --------------------------------------------------------------------------- routing
@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"community": "gaming"}, ("hate", "violence")),
        ({"community": "kids", "lang": "en"}, ("hate", "violence", "directed")),
        ({"community": "unknown"}, ("hate",)),
        ({"community": ""}, ("hate",)),
        ({"community": 7}, ("hate",)),
        ({"community": ["gaming"]}, ("hate",)),
        ({"community": None}, ("hate",)),
        ({}, ("hate",)),
        (None, ("hate",)),
    ],
)
def test_an_event_is_routed_by_its_community_else_the_default_route(meta, expected) -> None:
    assert make_state().route(meta) == expected


def test_the_routing_field_is_configurable() -> None:
    state = make_state(routing_field="tenant")
    assert state.route({"tenant": "gaming", "community": "kids"}) == ("hate", "violence")
    assert state.community({"tenant": "x"}) == "x" and state.community({"tenant": 1}) is None


# --------------------------------------------------------------------------- thresholds
def test_threshold_resolution_order_with_every_level() -> None:
    control = ControlState(make_state())
    t = control.snapshot().threshold
    # config: community-specific, then classifier-wide
    assert (t("hate", "gaming").value, t("hate", "gaming").source) == (0.7, "setting")
    assert "community_thresholds.gaming" in t("hate", "gaming").detail
    assert (t("hate", "news").value, t("hate", "news").source) == (0.6, "setting")
    assert t("hate", None).value == 0.6
    # adapter metadata, then 0.5
    assert (t("violence", "gaming").value, t("violence", "gaming").source) == (0.3, "model")
    assert (t("directed", None).value, t("directed", None).source) == (0.5, "default")

    state = applied(control, record_for_threshold("hate", 0.8))
    assert state.threshold("hate", "news").to_dict() == {
        "value": 0.8,
        "source": "control",
        "detail": "threshold/hate",
    }
    # control's classifier-wide beats config's community-specific
    assert state.threshold("hate", "gaming").value == 0.8
    state = applied(control, record_for_threshold("hate", 0.9, "gaming"), start=1)
    assert state.threshold("hate", "gaming").detail == "threshold/hate/gaming"
    assert state.threshold("hate", "gaming").value == 0.9
    assert state.threshold("hate", "news").value == 0.8
    assert state.threshold("hate", None).value == 0.8


def test_modes_come_from_control_else_config() -> None:
    control = ControlState(make_state())
    assert control.snapshot().mode("violence") == SHADOW
    state = applied(control, record_for_mode("violence", ENFORCE), record_for_mode("hate", SHADOW))
    assert (state.mode("violence"), state.mode("hate"), state.mode("directed")) == (
        ENFORCE,
        SHADOW,
        ENFORCE,
    )


def test_routes_from_control_replace_config_and_the_default() -> None:
    control = ControlState(make_state())
    state = applied(
        control,
        record_for_route("gaming", ["directed"]),
        record_for_route("news", ["hate", "directed"]),
        record_for_route(DEFAULT_ROUTE_KEY, ["violence"]),
    )
    assert state.route({"community": "gaming"}) == ("directed",)
    assert state.route({"community": "news"}) == ("hate", "directed")
    assert state.route({"community": "kids"}) == ("hate", "violence", "directed")
    assert state.route({}) == ("violence",)


# --------------------------------------------------------------------------- tombstones, version
def test_tombstones_remove_overrides_and_the_config_is_back() -> None:
    control = ControlState(make_state())
    applied(
        control,
        record_for_threshold("hate", 0.9, "gaming"),
        record_for_mode("hate", SHADOW),
        record_for_route("gaming", ["directed"]),
        record_for_route("*", ["directed"]),
    )
    state = applied(
        control,
        tombstone("threshold/hate/gaming"),
        tombstone("mode/hate"),
        tombstone("route/gaming"),
        tombstone("route/*"),
        start=4,
    )
    assert state.threshold("hate", "gaming").source == "setting"
    assert state.mode("hate") == ENFORCE
    assert state.route({"community": "gaming"}) == ("hate", "violence")
    assert state.route({}) == ("hate",)
    assert dict(state.overrides) == {} and state.version == 8
    # a tombstone of a key with no override, or of a classifier no longer configured, is fine
    assert applied(control, tombstone("threshold/gone/x"), start=8).version == 9


def test_version_is_the_last_applied_offset_plus_one() -> None:
    assert ControlState(make_state()).snapshot().version == 0
    assert ControlState(make_state(), version=None).snapshot().version is None
    control = ControlState(make_state())
    state = control.apply(*record_for_threshold("hate", 0.1), offset=41)
    assert state.version == 42 and control.applied == 1
    with pytest.raises(ControlRecordError):
        control.apply(*record_for_threshold("hate", 2.0), offset=42)
    assert control.snapshot() is state and control.rejected == 1
    assert state.overrides["threshold/hate"]["offset"] == 41


def test_the_audit_trail_is_kept_and_shown() -> None:
    control = ControlState(make_state())
    key, value = record_for_threshold("hate", 0.75, "kids", by="alice", reason="raid")
    state = control.apply(key, value, 3)
    shown = state.to_dict()
    assert shown["overrides"]["threshold/hate/kids"] == {
        "threshold": 0.75,
        "by": "alice",
        "reason": "raid",
        "offset": 3,
        "partition": 0,
    }
    hate = shown["classifiers"]["hate"]
    assert hate["community_thresholds"]["kids"]["source"] == "control"
    assert hate["community_thresholds"]["gaming"]["value"] == 0.7
    assert shown["classifiers"]["violence"]["mode"] == SHADOW and shown["version"] == 4
    orjson.dumps(shown)  # JSON-able


# --------------------------------------------------------------------------- malformed records
BAD_RECORDS = [
    (None, b'{"threshold": 0.5}', "needs a key"),
    (b"\xff\xfe", b'{"threshold": 0.5}', "not UTF-8"),
    (b"thresholds/hate", b'{"threshold": 0.5}', "unknown control key"),
    (b"threshold", b'{"threshold": 0.5}', "unknown control key"),
    (b"threshold/hate/gaming/x", b'{"threshold": 0.5}', "unknown control key"),
    (b"mode/hate/gaming", b'{"mode": "shadow"}', "unknown control key"),
    (b"threshold/nope", b'{"threshold": 0.5}', "no classifier 'nope'"),
    (b"mode/nope", b'{"mode": "shadow"}', "no classifier"),
    (b"threshold/hate/", b'{"threshold": 0.5}', "community"),
    (b"threshold/hate/" + b"x" * 129, b'{"threshold": 0.5}', "1 to 128"),
    (b"threshold/hate/a\tb", b'{"threshold": 0.5}', "printable"),
    (b"threshold/hate/*", b'{"threshold": 0.5}', "not '\\*'"),
    (b"threshold/hate", b'{"threshold": 1.5}', "in \\[0, 1\\]"),
    (b"threshold/hate", b'{"threshold": -0.1}', "in \\[0, 1\\]"),
    (b"threshold/hate", b'{"threshold": true}', "in \\[0, 1\\]"),
    (b"threshold/hate", b'{"threshold": "0.5"}', "in \\[0, 1\\]"),
    (b"threshold/hate", b'{"threshold": null}', "in \\[0, 1\\]"),
    (b"threshold/hate", b'{"threshold": 1e999}', "not JSON"),
    (b"threshold/hate", b'{"treshold": 0.5}', "with 'threshold'"),
    (b"threshold/hate", b'{"threshold": 0.5, "comment": "x"}', "unknown field"),
    (b"threshold/hate", b'{"threshold": 0.5, "by": 7}', "'by' must be"),
    (b"threshold/hate", b'{"threshold": 0.5, "at": "yesterday"}', "ISO 8601"),
    (b"mode/hate", b'{"mode": "off"}', "mode must be one of"),
    (b"mode/hate", b'{"mode": "SHADOW"}', "mode must be one of"),
    (b"route/gaming", b'{"classifiers": []}', "non-empty list"),
    (b"route/gaming", b'{"classifiers": "hate"}', "non-empty list"),
    (b"route/gaming", b'{"classifiers": ["hate", "nope"]}', "non-empty list"),
    (b"route/gaming", b'{"classifiers": ["hate", "hate"]}', "distinct"),
    (b"route/*", b'{"classifiers": [1]}', "non-empty list"),
    (b"route/a/b", b'{"classifiers": ["hate"]}', "unknown control key"),
    (b"threshold/hate", b"0.5", "JSON object"),
    (b"threshold/hate", b"[0.5]", "JSON object"),
    (b"threshold/hate", b"{not json", "not JSON"),
    (b"threshold/hate", b"", "not JSON"),
    (b"threshold/hate", b'{"threshold": 0.5, "reason": "' + b"x" * 70_000 + b'"}', "64 KiB"),
    (b"adapter/hate", b'{"lora": ""}', "lora must be"),
    (b"adapter/hate", b'{"lora": 7}', "lora must be"),
    (b"adapter/hate", b'{"lora": "x.lora.h5", "sha256": "abc"}', "64 lower-case hex"),
    (b"adapter/hate", b'{"lora": "x.lora.h5", "rank": 4}', "unknown field"),
    (b"adapter/nope", b'{"lora": "x.lora.h5"}', "no classifier"),
    (b"adapter/hate/gaming", b'{"lora": "x.lora.h5"}', "unknown control key"),
    (b"bogus", None, "unknown control key"),
    (b"threshold/hate/a/b", None, "unknown control key"),
]


@pytest.mark.parametrize(("key", "value", "reason"), BAD_RECORDS)
def test_a_malformed_record_is_rejected_and_the_state_is_unchanged(key, value, reason) -> None:
    control = ControlState(make_state())
    before = applied(control, record_for_threshold("hate", 0.33))
    with pytest.raises(ControlRecordError, match=reason):
        control.apply(key, value, offset=1)
    assert control.snapshot() is before
    assert (control.applied, control.rejected) == (1, 1)


def test_validate_record_and_builders_agree() -> None:
    state = make_state()
    for record in (
        record_for_threshold("hate", 0, "gaming", by="me", reason="r"),
        record_for_threshold("directed", 1),
        record_for_mode("violence", "enforce"),
        record_for_route("*", ("hate", "directed")),
        tombstone("mode/hate"),
    ):
        validate_record(state, *decode_record(*record))
    assert orjson.loads(record_for_threshold("hate", 0.5, by="a")[1]) == {
        "threshold": 0.5,
        "by": "a",
    }
    assert parse_key("threshold/hate/gaming") == ("threshold", ("hate", "gaming"))
    with pytest.raises(ControlRecordError, match="in \\[0, 1\\]"):
        validate_record(state, "threshold/hate", {"threshold": float("nan")})
    with pytest.raises(ControlRecordError):
        validate_record(state, "threshold/hate", ["threshold"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- from the settings
def test_policy_from_settings_with_classifiers_and_routes() -> None:
    settings = Settings(
        classifiers=(
            ClassifierConfig(name="hate", threshold=0.6, community_thresholds={"kids": 0.3}),
            ClassifierConfig(name="violence", lora="v.lora.h5", mode="shadow"),
        ),
        routes={"gaming": ("hate", "violence")},
        routing_field="tenant",
    )
    state = policy_from_settings(settings, calibrated={"violence": 0.42})
    assert list(state.classifiers) == ["hate", "violence"]
    assert state.default_route == ("hate", "violence") and state.version is None
    assert state.route({"tenant": "gaming"}) == ("hate", "violence")
    assert state.threshold("hate", "kids").value == 0.3
    assert state.threshold("violence").to_dict()["source"] == "model"
    assert state.mode("violence") == SHADOW
    assert policy_from_settings(
        replace_settings(settings, default_route=("hate",))
    ).default_route == ("hate",)


def replace_settings(settings: Settings, **changes) -> Settings:
    return Settings(**{**settings.model_dump(exclude_unset=True), **changes})


def test_without_classifiers_one_hate_classifier_from_threshold_or_file(tmp_path: Path) -> None:
    state = policy_from_settings(Settings(), calibrated={"hate": 0.45})
    assert list(state.classifiers) == ["hate"] and state.default_route == ("hate",)
    assert state.threshold("hate").source == "model"
    in_force = policy_from_settings(Settings(threshold=0.7)).threshold("hate", "any")
    assert (in_force.value, in_force.source, in_force.detail) == (0.7, "setting", "threshold")
    path = tmp_path / "threshold.toml"
    path.write_text('threshold = 0.61\npolicy = "max-f1"\n')
    in_force = policy_from_settings(Settings(threshold_file=path)).threshold("hate")
    assert (in_force.value, in_force.source) == (0.61, "setting")
    assert str(path) in in_force.detail and "max-f1" in in_force.detail
    path.write_text("threshold = 2\n")
    with pytest.raises(SettingsError):
        policy_from_settings(Settings(threshold_file=path))


def test_rebase_keeps_the_overrides_the_new_base_admits() -> None:
    control = ControlState(make_state())
    applied(control, record_for_threshold("violence", 0.2), record_for_mode("directed", SHADOW))
    calibrated = replace(make_state().classifiers["hate"], calibrated_threshold=0.35)
    smaller = make_state(
        classifiers={"hate": calibrated, "violence": make_state().classifiers["violence"]},
        routes={},
    )
    dropped = control.rebase(smaller)
    assert [key for key, _ in dropped] == ["mode/directed"]
    state = control.snapshot()
    assert state.threshold("violence").value == 0.2 and state.version == 2
    assert state.classifiers["hate"].calibrated_threshold == 0.35


def test_snapshots_are_immutable_and_swapped_whole() -> None:
    control = ControlState(make_state())
    state = control.snapshot()
    with pytest.raises(TypeError):
        state.routes["x"] = ("hate",)  # type: ignore[index]
    seen: list[PolicyState] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(control.snapshot())

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(200):
        control.apply(*record_for_threshold("hate", i / 200, "gaming"), offset=i)
    stop.set()
    reader.join()
    for snap in seen:  # every snapshot is whole: its version and its override agree
        if snap.version:
            assert snap.control_thresholds[("hate", "gaming")] == (snap.version - 1) / 200


def test_any_value_is_applied_or_rejected_never_anything_else() -> None:
    odd = [None, True, 0, -1, 2**63, 1.0, "", "hate", [], [None], [{}], [["hate"]], {}, {"a": 1}]
    odd += [["hate", 1], ["hate"], "shadow", "2024-01-01T00:00:00Z", "x" * 3000]
    control = ControlState(make_state())
    offset = 0
    for key in ("threshold/hate", "threshold/hate/kids", "mode/hate", "route/*", "route/kids"):
        for main in ("threshold", "mode", "classifiers"):
            for given in odd:
                for extra in ({}, {"by": given}, {"at": given}):
                    value = orjson.dumps({main: given, **extra})
                    try:
                        control.apply(key.encode(), value, offset)
                    except ControlRecordError:
                        continue
                    offset += 1
    assert control.applied == offset and control.applied > 0 and control.rejected > 500


def test_an_adapter_override_is_state_and_a_tombstone_removes_it() -> None:
    control = ControlState(make_state())
    state = applied(control, record_for_adapter("violence", "/m/v2.lora.h5", "a" * 64, by="ops"))
    assert dict(state.control_adapters["violence"]) == {"lora": "/m/v2.lora.h5", "sha256": "a" * 64}
    assert state.to_dict()["classifiers"]["violence"]["adapter_override"]["lora"] == "/m/v2.lora.h5"
    state = control.apply(*tombstone("adapter/violence"), offset=5)
    assert not state.control_adapters and state.version == 6


def test_a_single_classifier_policy() -> None:
    state = single_classifier_policy("spam", 0.3)
    assert state.route({"community": "x"}) == ("spam",) and state.mode("spam") == ENFORCE
    assert state.threshold("spam", "x").to_dict() == {
        "value": 0.3,
        "source": "setting",
        "detail": "threshold",
    }
    assert single_classifier_policy("spam").threshold("spam").source == "default"

"""Moderator labels: every bad record has its reason, the split is fixed, the latest wins."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import orjson
import pytest
from pydantic import ValidationError

from moderation_worker.events import (
    BAD_ID,
    DUPLICATE_KEY,
    EMPTY_TEXT,
    INVALID_JSON,
    MISSING_ID,
    NOT_UTF8,
    REASONS,
    SCORING_FAILED,
    TOO_DEEP,
    InvalidEvent,
)
from moderation_worker.loop.labels import (
    BAD_CLASSIFIER,
    BAD_FIELD,
    BAD_LABEL,
    LABEL_REASONS,
    UNKNOWN_CLASSIFIER,
    ModeratorLabel,
    decided_time,
    label_json,
    label_record,
    latest,
    parse_label,
    split_of,
)
from moderation_worker.settings import ClassifierConfig


def record(**fields: object) -> bytes:
    base: dict[str, object] = {"id": "c1", "text": "some comment", "label": 1, "classifier": "hate"}
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not ...})


def reason_of(raw: bytes | str, **kwargs: object) -> str:
    with pytest.raises(InvalidEvent) as info:
        parse_label(raw, **kwargs)  # type: ignore[arg-type]
    assert str(info.value)
    return info.value.reason


@pytest.mark.parametrize(
    "label",
    [
        ModeratorLabel(id="c1", text="t", label=1, classifier="hate"),
        ModeratorLabel(id="c2", text="t ü 🙂", label=0, classifier="spam-v2"),
        ModeratorLabel(
            id="c3",
            text="x",
            label=1,
            classifier="violence",
            community="gaming",
            moderator="mod@example.org",
            decided_at="2024-05-01T12:30:00+02:00",
        ),
    ],
)
def test_a_label_round_trips_through_its_json(label: ModeratorLabel) -> None:
    assert parse_label(label_json(label)) == label
    key, value = label_record(label)
    assert key == f"{label.classifier}/{label.id}".encode() and value == label_json(label)
    assert parse_label(value.decode("utf-8"), classifiers={label.classifier}) == label


@pytest.mark.parametrize(("given", "stored"), [(True, 1), (False, 0), (1, 1), (0, 0)])
def test_label_accepts_booleans_and_0_or_1(given: object, stored: int) -> None:
    label = parse_label(record(label=given))
    assert label.label == stored and type(label.label) is int


def test_optional_fields_may_be_null_and_extra_fields_are_ignored() -> None:
    raw = record(community=None, moderator=None, decided_at=None, note="why", score=[1, {"a": 2}])
    assert parse_label(raw) == ModeratorLabel(
        id="c1", text="some comment", label=1, classifier="hate"
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (record(label=...), BAD_LABEL),
        (record(label=None), BAD_LABEL),
        (record(label="yes"), BAD_LABEL),
        (record(label="1"), BAD_LABEL),
        (record(label=2), BAD_LABEL),
        (record(label=-1), BAD_LABEL),
        (record(label=1.0), BAD_LABEL),
        (record(label=[1]), BAD_LABEL),
        (
            b'{"id": "c1", "text": "t", "label": 100000000000000000000000, "classifier": "h"}',
            BAD_LABEL,
        ),
        (record(classifier=...), BAD_CLASSIFIER),
        (record(classifier="Hate"), BAD_CLASSIFIER),
        (record(classifier="hate/x"), BAD_CLASSIFIER),
        (record(classifier="-hate"), BAD_CLASSIFIER),
        (record(classifier="hate\n"), BAD_CLASSIFIER),
        (record(classifier="h" * 65), BAD_CLASSIFIER),
        (record(classifier=3), BAD_CLASSIFIER),
        (record(community="a/b"), BAD_FIELD),
        (record(community="*"), BAD_FIELD),
        (record(community=""), BAD_FIELD),
        (record(community=7), BAD_FIELD),
        (record(moderator="m" * 257), BAD_FIELD),
        (record(moderator=""), BAD_FIELD),
        (record(moderator="a\nb"), BAD_FIELD),
        (record(moderator=42), BAD_FIELD),
        (record(decided_at="yesterday"), BAD_FIELD),
        (record(decided_at="2024-13-01"), BAD_FIELD),
        (record(decided_at="2024-01-01T00:00:00" + "0" * 60), BAD_FIELD),
        (record(decided_at=1714567890), BAD_FIELD),
        # Everything a comment already checks keeps the comment's reason.
        (b"\xff\xfe", NOT_UTF8),
        (b"not json", INVALID_JSON),
        (record(id=...), MISSING_ID),
        (record(id=""), BAD_ID),
        (record(text="   "), EMPTY_TEXT),
        (record(deep=[[[[[[[[[[0]]]]]]]]]]), TOO_DEEP),
        (b'{"id": "a", "id": "b", "text": "t", "label": 1, "classifier": "hate"}', DUPLICATE_KEY),
        (b'{"id": "a", "text": "t", "label": 0, "label": 1, "classifier": "hate"}', DUPLICATE_KEY),
        (
            b'{"id": "a", "text": "t", "label": 1, "classifier": "a", "classifier": "b"}',
            DUPLICATE_KEY,
        ),
        (
            b'{"id": "a", "text": "t", "label": 1, "\\u006cabel": 0, "classifier": "a"}',
            DUPLICATE_KEY,
        ),
    ],
)
def test_each_bad_label_has_its_reason(raw: bytes, reason: str) -> None:
    assert reason_of(raw, max_depth=8) == reason
    assert reason in LABEL_REASONS


def test_a_field_named_like_a_label_field_elsewhere_is_not_a_duplicate() -> None:
    raw = record(note="label", nested={"label": 0, "classifier": "x"}, text='say "label"')
    assert parse_label(raw).label == 1


def test_bad_field_messages_name_the_field() -> None:
    for name, value in [("community", "a/b"), ("moderator", "m" * 300), ("decided_at", "soon")]:
        with pytest.raises(InvalidEvent, match=name):
            parse_label(record(**{name: value}))


def test_unknown_classifier_lists_the_known_ones_truncated() -> None:
    assert (
        reason_of(record(classifier="spam"), classifiers=["hate", "violence"]) == UNKNOWN_CLASSIFIER
    )
    with pytest.raises(InvalidEvent, match=r"known: hate, violence\)"):
        parse_label(record(classifier="spam"), classifiers=("violence", "hate"))
    many = [f"c{i:02d}" for i in range(25)]
    with pytest.raises(InvalidEvent, match="and 15 more") as info:
        parse_label(record(classifier="spam"), classifiers=many)
    assert "c09" in str(info.value) and "c10" not in str(info.value)
    with pytest.raises(TypeError):
        parse_label(record(classifier="hat"), classifiers="hate")  # not a set of one name


@pytest.mark.parametrize(
    "name", ["hate", "a", "9x", "spam_v-2", "h" * 64, "h" * 65, "Hate", "_a", ""]
)
def test_classifier_names_agree_with_the_settings_pattern(name: str) -> None:
    try:
        ClassifierConfig(name=name)
        configurable = True
    except ValidationError:
        configurable = False
    try:
        parse_label(record(classifier=name))
        accepted = True
    except InvalidEvent:
        accepted = False
    assert accepted == configurable


def test_label_reasons_are_the_comment_reasons_but_scoring_plus_the_label_ones() -> None:
    assert SCORING_FAILED not in LABEL_REASONS
    assert set(LABEL_REASONS) == (set(REASONS) - {SCORING_FAILED}) | {
        BAD_LABEL,
        BAD_CLASSIFIER,
        UNKNOWN_CLASSIFIER,
        BAD_FIELD,
    }
    assert len(set(LABEL_REASONS)) == len(LABEL_REASONS)


def test_decided_time_is_aware_and_naive_times_are_utc() -> None:
    def at(text: str | None) -> datetime | None:
        return decided_time(
            ModeratorLabel(id="a", text="t", label=1, classifier="h", decided_at=text)
        )

    assert at(None) is None
    assert at("2024-01-01T10:00:00") == datetime(2024, 1, 1, 10, tzinfo=UTC)
    assert at("2024-01-01T12:00:00+02:00") == datetime(2024, 1, 1, 10, tzinfo=UTC)
    assert at("2024-01-01T10:00:00Z") == at("2024-01-01T10:00:00")


def test_split_is_the_stated_hash_and_deterministic() -> None:
    comment_id = "kommentar-ü-42"
    digest = hashlib.sha256(("hate" + "\x00" + comment_id).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    expected = "holdout" if u < 0.2 else "validation" if u < 0.35 else "train"
    assert split_of("hate", comment_id) == expected
    assert all(split_of("hate", comment_id) == expected for _ in range(3))
    # The edges of the formula: everything is held out / nothing is.
    assert (
        split_of("hate", comment_id, holdout_fraction=u + 1e-12, validation_fraction=0) == "holdout"
    )
    assert (
        split_of("hate", comment_id, holdout_fraction=u - 1e-12, validation_fraction=0) == "train"
    )
    assert split_of("hate", comment_id, u - 1e-12, 2e-12) == "validation"


def test_split_proportions_hold_overall_and_per_class() -> None:
    ids = [f"id-{i}" for i in range(20_000)]
    classes = [hash_class(i) for i in ids]  # a label independent of the split hash
    for cls in (None, 0, 1):
        chosen = [i for i, c in zip(ids, classes, strict=True) if cls is None or c == cls]
        assert len(chosen) > 9_000
        splits = [split_of("hate", i, 0.2, 0.15) for i in chosen]
        for name, fraction in (("holdout", 0.2), ("validation", 0.15), ("train", 0.65)):
            assert abs(splits.count(name) / len(chosen) - fraction) < 0.015, (cls, name)


def hash_class(comment_id: str) -> int:
    return hashlib.md5(comment_id.encode()).digest()[0] % 2


def test_split_depends_on_the_classifier() -> None:
    ids = [f"id-{i}" for i in range(500)]
    assert [split_of("hate", i) for i in ids] != [split_of("spam", i) for i in ids]


@pytest.mark.parametrize(
    ("holdout", "validation"),
    [
        (-0.1, 0.1),
        (1.0, 0.0),
        (0.2, 1.0),
        (0.6, 0.4),
        (0.7, 0.5),
        (float("nan"), 0.1),
        (True, 0.1),
        ("0.2", 0.1),
    ],
)
def test_split_fractions_are_validated(holdout: object, validation: object) -> None:
    with pytest.raises(ValueError):
        split_of("hate", "x", holdout, validation)  # type: ignore[arg-type]


def lab(
    comment_id: str = "c", label: int = 1, classifier: str = "hate", at: str | None = None
) -> ModeratorLabel:
    return ModeratorLabel(
        id=comment_id, text="t", label=label, classifier=classifier, decided_at=at
    )


def test_latest_prefers_the_later_decision_time_over_arrival() -> None:
    late = lab(label=0, at="2024-01-02T00:00:00Z")
    early = lab(label=1, at="2024-01-01T23:00:00-02:00")  # 2024-01-02T01:00Z: later still
    assert latest([(1, late), (2, early)]) == {"hate/c": (2, early)}
    older = lab(label=1, at="2024-01-01T00:00:00")
    assert latest([(5, late), (9, older)]) == {"hate/c": (5, late)}
    assert latest([(9, older), (5, late)]) == {"hate/c": (5, late)}  # input order irrelevant


def test_latest_falls_back_to_arrival_without_both_times_and_on_ties() -> None:
    timed, untimed = lab(label=1, at="2030-01-01T00:00:00Z"), lab(label=0)
    assert latest([(1, timed), (2, untimed)]) == {"hate/c": (2, untimed)}
    assert latest([(2, timed), (1, untimed)]) == {"hate/c": (2, timed)}
    a, b = lab(label=1, at="2024-01-01T10:00:00Z"), lab(label=0, at="2024-01-01T12:00:00+02:00")
    assert latest([(4, b), (3, a)]) == {"hate/c": (4, b)}
    assert latest([(3, b), (4, a)]) == {"hate/c": (4, a)}


def test_latest_keeps_classifiers_and_ids_apart() -> None:
    pairs = [
        (1, lab("c", 1, "hate")),
        (2, lab("c", 0, "spam")),
        (3, lab("d", 0, "hate")),
        (4, lab("c", 0, "hate")),
    ]
    best = latest(iter(pairs))
    assert {k: (s, v.label) for k, (s, v) in best.items()} == {
        "hate/c": (4, 0),
        "spam/c": (2, 0),
        "hate/d": (3, 0),
    }
    assert latest([]) == {}

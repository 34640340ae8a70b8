"""Events: every way a raw event can be wrong has its own reason, and outputs serialise cleanly."""

from __future__ import annotations

import base64

import orjson
import pytest

from moderation_worker.events import (
    BAD_ID,
    BAD_TEXT,
    EMPTY_TEXT,
    INVALID_JSON,
    MISSING_ID,
    MISSING_TEXT,
    NOT_AN_OBJECT,
    NOT_UTF8,
    REASONS,
    TEXT_TOO_LONG,
    DeadLetter,
    InvalidEvent,
    ModelIdentity,
    SourcePosition,
    Verdict,
    parse_comment,
    utc_now,
)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xc3\x28", NOT_UTF8),
        (b"", INVALID_JSON),
        (b"{'id': 1}", INVALID_JSON),
        (b'{"id": "a", "text": NaN}', INVALID_JSON),
        (b'{"id": "a", "text": "\\ud800"}', INVALID_JSON),  # lone surrogate
        (b"null", NOT_AN_OBJECT),
        (b"[]", NOT_AN_OBJECT),
        (b"3", NOT_AN_OBJECT),
        (b'{"text": "t"}', MISSING_ID),
        (b'{"id": 1, "text": "t"}', BAD_ID),
        (b'{"id": "", "text": "t"}', BAD_ID),
        (b'{"id": null, "text": "t"}', BAD_ID),
        (b'{"id": "a"}', MISSING_TEXT),
        (b'{"id": "a", "text": 5}', BAD_TEXT),
        (b'{"id": "a", "text": null}', BAD_TEXT),
        (b'{"id": "a", "text": ""}', EMPTY_TEXT),
        (b'{"id": "a", "text": " \\n\\t "}', EMPTY_TEXT),
        (b'{"id": "a", "text": "12345678901"}', TEXT_TOO_LONG),
    ],
)
def test_each_kind_of_bad_event_has_its_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_comment(raw, max_text_chars=10)
    assert info.value.reason == reason and reason in REASONS
    assert str(info.value)


def test_a_valid_event_keeps_other_fields_as_meta() -> None:
    raw = orjson.dumps({"id": "c1", "text": "hello", "user": {"n": 1}, "lang": "en"})
    comment = parse_comment(raw)
    assert (comment.id, comment.text) == ("c1", "hello")
    assert comment.meta == {"user": {"n": 1}, "lang": "en"}


def test_text_at_the_limit_is_accepted_and_str_input_works() -> None:
    assert (
        parse_comment('{"id": "a", "text": "1234567890"}', max_text_chars=10).text == "1234567890"
    )


def test_verdict_dict_has_the_documented_fields() -> None:
    verdict = Verdict(
        id="c1",
        p_hateful=0.7,
        hateful=True,
        label="hateful",
        threshold=0.5,
        model=ModelIdentity("gemma3-270m", "abc"),
        scored_at=utc_now(),
        source=SourcePosition("comments", 2, 41),
        meta={"lang": "en"},
    )
    out = orjson.loads(orjson.dumps(verdict.to_dict()))
    assert out["model"] == {"base_model": "gemma3-270m", "lora_sha256": "abc"}
    assert out["source"] == {"topic": "comments", "partition": 2, "offset": 41}
    assert out["meta"] == {"lang": "en"}
    assert {"id", "p_hateful", "hateful", "label", "threshold", "scored_at"} <= out.keys()


def test_dead_letter_carries_the_original_bytes_in_base64() -> None:
    original = b"\xff\x00 binary"
    dl = DeadLetter(
        reason=NOT_UTF8, error="boom", original=original, source=SourcePosition("c", 0, 1)
    )
    out = dl.to_dict()
    assert base64.b64decode(out["original_b64"]) == original
    assert out["reason"] == NOT_UTF8 and out["error"] == "boom" and out["failed_at"]
    assert "id" not in out

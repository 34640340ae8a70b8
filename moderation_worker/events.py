"""Comment, verdict and dead-letter types, and the validation that turns raw bytes into a comment.

The stream worker, the `score` command and the demo all speak these types, so a verdict means
the same thing wherever it is produced. Nothing here knows about Kafka: a `SourcePosition` is
just three values that an adapter fills in.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Any

import orjson

# Machine-readable reasons a raw event cannot be scored. Dead letters carry one of these.
NOT_UTF8 = "not_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_ID = "missing_id"
BAD_ID = "bad_id"
MISSING_TEXT = "missing_text"
BAD_TEXT = "bad_text"
EMPTY_TEXT = "empty_text"
TEXT_TOO_LONG = "text_too_long"
TOO_DEEP = "too_deep"
DUPLICATE_KEY = "duplicate_key"
SCORING_FAILED = "scoring_failed"

REASONS = (
    NOT_UTF8,
    INVALID_JSON,
    NOT_AN_OBJECT,
    MISSING_ID,
    BAD_ID,
    MISSING_TEXT,
    BAD_TEXT,
    EMPTY_TEXT,
    TEXT_TOO_LONG,
    TOO_DEEP,
    DUPLICATE_KEY,
    SCORING_FAILED,
)

DEFAULT_MAX_TEXT_CHARS = 20_000
#: An id names a comment in every verdict, log line and join; longer ones are refused.
MAX_ID_CHARS = 1_024
#: Deepest nesting of objects/arrays an event may have (the top-level object is depth 1).
#: orjson refuses to encode past ~255 levels, so a deeper event could never become a verdict.
DEFAULT_MAX_DEPTH = 64

#: Version of the dead-letter JSON (see `moderation_worker/schemas/`).
SCHEMA_VERSION = 1
#: Version of the verdict JSON: 2 added a result per classifier and the combined decision;
#: every version-1 field is still there, with its version-1 meaning for the primary classifier.
VERDICT_SCHEMA_VERSION = 2


class InvalidEvent(ValueError):
    """A raw event that cannot become a `Comment`; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SourcePosition:
    """Where an event came from, so a verdict or dead letter can be traced back to it."""

    topic: str
    partition: int
    offset: int

    def to_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


@dataclass(frozen=True)
class Comment:
    """A comment to score. `meta` holds every other field of the input event, untouched."""

    id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelIdentity:
    """Which model produced a verdict: the base model and the hash of the LoRA weights file."""

    base_model: str
    lora_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"base_model": self.base_model, "lora_sha256": self.lora_sha256}


@dataclass(frozen=True)
class ClassifierResult:
    """One classifier's part of a verdict: its score, the threshold it met or not, its mode.

    A `shadow` result is published but never counts towards `Verdict.flagged`.
    """

    name: str
    p: float
    flagged: bool
    threshold: float
    threshold_source: str
    mode: str
    label: str
    model: ModelIdentity

    def to_dict(self) -> dict[str, Any]:
        return {
            "p": self.p,
            "flagged": self.flagged,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "mode": self.mode,
            "label": self.label,
            "lora_sha256": self.model.lora_sha256,
        }


@dataclass(frozen=True)
class Verdict:
    """One decision about one comment.

    `flagged` is the decision: some enforced classifier flagged the comment. `results` has
    every classifier that scored it (enforced and shadow), and `control_version` the control
    state the thresholds came from. The version-1 fields (`p_hateful`, `hateful`, `label`,
    `threshold`, `model`) describe the `primary` classifier: the first enforced one routed for
    the comment, so a one-classifier deployment reads exactly as before.
    `p_hateful` is the softmax probability of the positive label among the label tokens;
    `latency_ms` is the time from the worker receiving the event to its score.
    """

    id: str
    p_hateful: float
    hateful: bool
    label: str
    threshold: float
    model: ModelIdentity
    scored_at: str
    source: SourcePosition | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    latency_ms: float | None = None
    results: tuple[ClassifierResult, ...] = ()
    flagged: bool | None = None  # None: same as `hateful` (a verdict made without results)
    primary: str | None = None
    community: str | None = None
    control_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        flagged = self.hateful if self.flagged is None else self.flagged
        out: dict[str, Any] = {
            "schema_version": VERDICT_SCHEMA_VERSION,
            "id": self.id,
            "flagged": flagged,
            "flagged_by": [r.name for r in self.results if r.flagged and r.mode == "enforce"],
            "classifiers": {r.name: r.to_dict() for r in self.results},
            "primary": self.primary,
            "community": self.community,
            "control_version": self.control_version,
            "p_hateful": self.p_hateful,
            "hateful": self.hateful,
            "label": self.label,
            "threshold": self.threshold,
            "model": self.model.to_dict(),
            "scored_at": self.scored_at,
        }
        if self.latency_ms is not None:
            out["latency_ms"] = round(self.latency_ms, 3)
        if self.source is not None:
            out["source"] = self.source.to_dict()
        if self.meta:
            out["meta"] = self.meta
        return out


@dataclass(frozen=True)
class DeadLetter:
    """An input that produced no verdict, with enough context to replay or debug it."""

    reason: str
    error: str
    original: bytes
    source: SourcePosition | None = None
    id: str | None = None
    failed_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "reason": self.reason,
            "error": self.error,
            "original_b64": base64.b64encode(self.original).decode("ascii"),
            "failed_at": self.failed_at or utc_now(),
        }
        if self.id is not None:
            out["id"] = self.id
        if self.source is not None:
            out["source"] = self.source.to_dict()
        return out


def utc_now() -> str:
    """ISO-8601 UTC timestamp with milliseconds, the format of `scored_at`."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def parse_comment(
    raw: bytes | str,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Comment:
    """Validate one raw event and return the comment it carries.

    Raises `InvalidEvent` with a machine-readable reason for every way an event can be wrong,
    so callers route it to a dead-letter topic instead of crashing or dropping it. Beyond
    shape and types, an event is refused when it nests deeper than `max_depth` (its verdict
    could not be encoded) or repeats the `id` or `text` key (parsers disagree on which copy
    wins, so the text we score could differ from the text another consumer shows).
    """
    if isinstance(raw, bytes):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEvent(NOT_UTF8, f"event is not valid UTF-8: {exc}") from None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "recursion" in str(exc).lower() or "depth limit" in str(exc).lower():
            raise InvalidEvent(TOO_DEEP, f"event nests too deeply to parse: {exc}") from None
        raise InvalidEvent(INVALID_JSON, f"event is not valid JSON: {exc}") from None
    depth, n_id, n_text, huge = _shape(obj, max_depth)
    if depth > max_depth:
        raise InvalidEvent(
            TOO_DEEP, f"event nests deeper than {max_depth} levels of objects and arrays"
        )
    if isinstance(obj, dict) and (huge or _needs_strict_parse(raw, n_id, n_text)):
        obj = _strict_parse(raw)
    return comment_from_object(obj, max_text_chars)


def _shape(obj: Any, limit: int) -> tuple[int, int, int, bool]:
    """(depth, how often "id" and "text" occur as keys or string values, whether a number is
    beyond 64-bit integer range) in one pass. Depth counts nested objects/arrays (a scalar is
    0) without recursion and stops once past `limit`, so a hostile event costs at most its
    own size to check.

    orjson turns an integer beyond 64 bits into a float, so a float that large marks where the
    exact digits must be recovered. Only containers go on the stack; scalars are looked at in
    place (this runs per event).
    """
    if type(obj) is not dict and type(obj) is not list:
        return 0, int(obj == "id"), int(obj == "text"), False
    deepest = n_id = n_text = 0
    huge = False
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
        if type(node) is dict:
            n_id += "id" in node
            n_text += "text" in node
            children: Any = node.values()
        else:
            children = node
        for child in children:
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, depth + 1))
            elif kind is str and (child == "id" or child == "text"):
                if child == "id":
                    n_id += 1
                else:
                    n_text += 1
            elif kind is float and not -_HUGE < child < _HUGE:
                huge = True
    return deepest, n_id, n_text, huge


#: Floats at least this large may be integers orjson could not hold in 64 bits.
_HUGE = float(2**63)


_UINT64_MAX = 2**64 - 1
_INT64_MIN = -(2**63)


def _as_bytes(raw: bytes | str) -> bytes:
    return raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")


def _needs_strict_parse(raw: bytes | str, n_id: int, n_text: int) -> bool:
    """Cheap test for a repeated `id`/`text` key, which orjson's fast parse cannot show.

    orjson keeps one copy of a repeated key, so the raw bytes then hold more `"id"` than the
    parsed event has as keys and values (`n_id`, from `_shape`); a nested `user.id` counts on
    both sides and costs nothing. A key spelled with escapes (`"\\u0069d"`) goes the slow way.
    """
    data = _as_bytes(raw)
    return data.count(b'"id"') > n_id or data.count(b'"text"') > n_text or b"\\u" in data


def _strict_parse(raw: bytes | str) -> dict[str, Any]:
    """Parse again with the standard library to see duplicate keys and exact big integers.

    Integers beyond 64 bits stay exact: they are kept as `orjson.Fragment`s holding their
    digits, so `meta` goes out exactly as it came in instead of as a rounded float.
    """
    top: list[list[tuple[str, Any]]] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        top.append(items)  # the outermost object is the last one decoded
        return dict(items)

    def parse_int(digits: str) -> Any:
        value = int(digits)
        return value if _INT64_MIN <= value <= _UINT64_MAX else orjson.Fragment(digits)

    obj = json.loads(_as_bytes(raw), object_pairs_hook=pairs, parse_int=parse_int)
    keys = [k for k, _ in top[-1]]
    for name in ("id", "text"):
        if keys.count(name) > 1:
            raise InvalidEvent(
                DUPLICATE_KEY,
                f"event repeats the {name!r} key {keys.count(name)} times; "
                "parsers disagree on which copy counts, so it is refused",
            )
    return obj  # type: ignore[no-any-return]


def comment_from_object(obj: Any, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> Comment:
    """Validate an already-decoded event (a JSON object with string `id` and `text`)."""
    if not isinstance(obj, dict):
        raise InvalidEvent(NOT_AN_OBJECT, f"event must be a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise InvalidEvent(MISSING_ID, "event has no 'id' field")
    event_id = obj["id"]
    if not isinstance(event_id, str) or not event_id:
        raise InvalidEvent(BAD_ID, f"'id' must be a non-empty string, got {event_id!r:.80}")
    if len(event_id) > MAX_ID_CHARS:
        raise InvalidEvent(BAD_ID, f"'id' has {len(event_id)} characters, limit is {MAX_ID_CHARS}")
    if "text" not in obj:
        raise InvalidEvent(MISSING_TEXT, f"event {event_id!r:.80} has no 'text' field")
    text = obj["text"]
    if not isinstance(text, str):
        raise InvalidEvent(BAD_TEXT, f"'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidEvent(EMPTY_TEXT, f"event {event_id!r:.80} has empty text")
    if len(text) > max_text_chars:
        raise InvalidEvent(
            TEXT_TOO_LONG,
            f"event {event_id!r:.80} text has {len(text)} characters, limit is {max_text_chars}",
        )
    meta = {k: v for k, v in obj.items() if k not in ("id", "text")}
    return Comment(id=event_id, text=text, meta=meta)

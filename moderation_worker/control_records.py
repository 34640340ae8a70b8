"""The control topic's records: their keys, their values, and the checks a record must pass.

Control records: key a UTF-8 string, value a JSON object, or null (a tombstone: the override is
removed, the configured value is back, and compaction forgets the key).

    threshold/<classifier>               {"threshold": 0.72}   every community
    threshold/<classifier>/<community>   {"threshold": 0.8}    that community only
    mode/<classifier>                    {"mode": "shadow"}    or "enforce"
    route/<community>                    {"classifiers": ["hate", "violence"]}
    route/*                              {"classifiers": ["hate"]}   events without a route
    adapter/<classifier>                 {"lora": "/models/v2.lora.h5", "sha256": "…",
                                          "threshold": 0.61}   new weights (and, optionally, the
                                         threshold calibrated for them), loaded at a batch
                                         boundary, sha256 checked; a promotion or a rollback
    candidate/<classifier>               {"lora": …, "sha256": …, "threshold": …}  a candidate
                                         scored in shadow beside <classifier> on every event
                                         routed to it, reported as "<classifier>@candidate"

A value may also carry "by", "reason" and "at" (ISO 8601), the audit trail in `to_dict()`.
Anything else is rejected (`ControlRecordError`, state unchanged), so a typo never silently does
nothing; a tombstone needs a well-formed key only, so a stale override can always be cleared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from moderation_worker.settings import check_community

if TYPE_CHECKING:
    from moderation_worker.policy import PolicyState

ENFORCE = "enforce"
SHADOW = "shadow"
MODES = (ENFORCE, SHADOW)
DEFAULT_ROUTE_KEY = "*"
MAX_VALUE_BYTES = 64 * 1024
_AUDIT = {"by": 256, "reason": 2048, "at": 64}  # optional fields -> longest value
_FIELD = {
    "threshold": "threshold",
    "mode": "mode",
    "route": "classifiers",
    "adapter": "lora",
    "candidate": "lora",
}
_PARTS = {"threshold": (1, 2), "mode": (1,), "route": (1,), "adapter": (1,), "candidate": (1,)}
# optional fields besides the main one and the audit trail; _REQUIRED of them must be there
_EXTRA = {"adapter": {"sha256", "threshold"}, "candidate": {"sha256", "threshold"}}
_REQUIRED = {"candidate": ("sha256", "threshold")}
#: How a candidate of classifier `c` is named in verdicts, metrics and the classifier set.
CANDIDATE_SUFFIX = "@candidate"
MAX_LORA_SPEC_CHARS = 4096


class ControlRecordError(ValueError):
    """Why a control record was rejected (the message is logged and printed)."""


Record = tuple[bytes, bytes | None]
Note = str | None


def control_key(kind: str, *parts: str | None) -> str:
    return "/".join([kind, *(p for p in parts if p is not None)])


def parse_key(key: str) -> tuple[str, tuple[str, ...]]:
    """`kind/part[/part]` -> (kind, parts): the syntax checked, not that the names exist."""
    kind, _, rest = key.partition("/")
    parts = tuple(rest.split("/")) if rest else ()
    if len(parts) not in _PARTS.get(kind, ()):
        raise ControlRecordError(
            f"unknown control key {key[:200]!r}: want threshold/<classifier>[/<community>], "
            "mode/<classifier>, route/<community>, adapter/<classifier> or "
            "candidate/<classifier>"
        )
    communities = {"threshold": parts[1:], "route": parts}.get(kind, ())
    for community in communities:
        if (kind, community) != ("route", DEFAULT_ROUTE_KEY):
            try:
                check_community(community)
            except ValueError as exc:
                raise ControlRecordError(f"{key[:200]!r}: {exc}") from None
    return kind, parts


def _iso_time(text: str) -> bool:
    try:
        return bool(datetime.fromisoformat(text))
    except ValueError:
        return False


def validate_record(state: PolicyState, key: str, value: Mapping[str, Any] | None) -> None:
    """Raise `ControlRecordError` unless `state` would apply this record (the CLI checks first)."""
    kind, parts = parse_key(key)
    if value is None:
        return
    main, known = _FIELD[kind], list(state.classifiers)
    if not isinstance(value, Mapping) or main not in value:
        raise ControlRecordError(f"{key}: the value must be a JSON object with {main!r}, or null")
    extra = _EXTRA.get(kind, set())
    unknown = sorted(set(value) - {main, *extra, *_AUDIT})
    if unknown:
        allowed = ", ".join([main, *sorted(extra), *_AUDIT])
        raise ControlRecordError(f"{key}: unknown field(s) {unknown}; allowed: {allowed}")
    for name, longest in _AUDIT.items():
        text = value.get(name, "")
        bad_time = name == "at" and isinstance(text, str) and text and not _iso_time(text)
        if not isinstance(text, str) or len(text) > longest or bad_time:
            what = "an ISO 8601 time" if name == "at" else f"a string of <= {longest} chars"
            raise ControlRecordError(f"{key}: {name!r} must be {what}")
    missing = [n for n in _REQUIRED.get(kind, ()) if n not in value]
    if missing:
        raise ControlRecordError(f"{key}: {' and '.join(map(repr, missing))} required")
    if "threshold" in extra and value.get("threshold") is not None:
        _check_threshold(key, value["threshold"])
    if kind != "route" and parts[0] not in state.classifiers:
        raise ControlRecordError(f"{key}: no classifier {parts[0]!r} (configured: {known})")
    given = value[main]
    if kind == "threshold":
        _check_threshold(key, given)
    elif kind in ("adapter", "candidate"):
        if not isinstance(given, str) or not 0 < len(given) <= MAX_LORA_SPEC_CHARS:
            raise ControlRecordError(f"{key}: lora must be a weights path or 'shipped:<name>'")
        digest = value.get("sha256")
        if digest is not None and not (
            isinstance(digest, str) and len(digest) == 64 and set(digest) <= set("0123456789abcdef")
        ):
            raise ControlRecordError(f"{key}: sha256 must be 64 lower-case hex digits")
    elif kind == "mode" and given not in MODES:
        raise ControlRecordError(f"{key}: mode must be one of {list(MODES)}, got {given!r}")
    elif kind == "route":
        names = given if isinstance(given, list) and all(isinstance(n, str) for n in given) else []
        if not names or not set(names) <= set(known) or len(set(names)) != len(names):
            raise ControlRecordError(
                f"{key}: classifiers must be a non-empty list of distinct names from {known}, "
                f"got {given!r}"
            )


def _check_threshold(key: str, given: Any) -> None:
    number = isinstance(given, (int, float)) and not isinstance(given, bool)
    if not (number and math.isfinite(given) and 0.0 <= given <= 1.0):
        raise ControlRecordError(f"{key}: threshold must be a number in [0, 1], got {given!r}")


def decode_record(key: bytes | None, value: bytes | None) -> tuple[str, dict[str, Any] | None]:
    """Raw Kafka key/value -> (key, value or None); `ControlRecordError` if unreadable."""
    if key is None:
        raise ControlRecordError("a control record needs a key")
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        raise ControlRecordError(f"control key {key[:64]!r} is not UTF-8") from None
    if value is None:
        return text, None
    if len(value) > MAX_VALUE_BYTES:
        raise ControlRecordError(f"{text[:200]}: value of {len(value)} bytes is over 64 KiB")
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ControlRecordError(f"{text[:200]}: value is not JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise ControlRecordError(f"{text[:200]}: the value must be a JSON object or null")
    return text, parsed


def _record(key: str, value: dict[str, Any], by: Note, reason: Note) -> Record:
    audit = {k: v for k, v in (("by", by), ("reason", reason)) if v is not None}
    return key.encode(), orjson.dumps({**value, **audit})


def record_for_threshold(
    classifier: str, value: float, community: Note = None, by: Note = None, reason: Note = None
) -> Record:
    return _record(
        control_key("threshold", classifier, community), {"threshold": value}, by, reason
    )


def record_for_mode(classifier: str, mode: str, by: Note = None, reason: Note = None) -> Record:
    return _record(control_key("mode", classifier), {"mode": mode}, by, reason)


def record_for_route(
    community: str, classifiers: Sequence[str], by: Note = None, reason: Note = None
) -> Record:
    """`community` "*" sets the default route."""
    return _record(control_key("route", community), {"classifiers": list(classifiers)}, by, reason)


def record_for_adapter(
    classifier: str,
    lora: str,
    sha256: Note = None,
    by: Note = None,
    reason: Note = None,
    threshold: float | None = None,
) -> Record:
    """New weights for `classifier` (a promotion or a rollback), with their threshold if given."""
    value: dict[str, Any] = {"lora": lora, **({"sha256": sha256} if sha256 else {})}
    if threshold is not None:
        value["threshold"] = float(threshold)
    return _record(control_key("adapter", classifier), value, by, reason)


def record_for_candidate(
    classifier: str, lora: str, sha256: str, threshold: float, by: Note = None, reason: Note = None
) -> Record:
    """A candidate scored in shadow beside `classifier`; a tombstone of its key withdraws it."""
    value = {"lora": lora, "sha256": sha256, "threshold": float(threshold)}
    return _record(control_key("candidate", classifier), value, by, reason)


def tombstone(key: str) -> Record:
    return key.encode(), None

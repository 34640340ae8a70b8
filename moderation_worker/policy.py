"""Which classifiers score an event, with which threshold, enforcing or in shadow: one snapshot.

A `PolicyState` is immutable and a batch is decided under one, so a live change never splits a
batch. It is the settings (`policy_from_settings`) plus the overrides read from the compacted
control topic (`ControlState.apply`): an operator changes the whole fleet without a restart.

Control records: key a UTF-8 string, value a JSON object, or null (a tombstone: the override is
removed, the configured value is back, and compaction forgets the key).

    threshold/<classifier>               {"threshold": 0.72}   every community
    threshold/<classifier>/<community>   {"threshold": 0.8}    that community only
    mode/<classifier>                    {"mode": "shadow"}    or "enforce"
    route/<community>                    {"classifiers": ["hate", "violence"]}
    route/*                              {"classifiers": ["hate"]}   events without a route
    adapter/<classifier>                 {"lora": "/models/v2.lora.h5", "sha256": "…"}  new
                                         weights, loaded at a batch boundary (sha256 checked)

A value may also carry "by", "reason" and "at" (ISO 8601), the audit trail in `to_dict()`.
Anything else is rejected (`ControlRecordError`, state unchanged), so a typo never silently does
nothing; a tombstone needs a well-formed key only, so a stale override can always be cleared.
`version` is the offset of the last record *applied* + 1 (0 before any, None without a control
topic); a rejected record changes nothing, version included.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType
from typing import Any

import orjson

from moderation_worker.settings import DEFAULT_CLASSIFIER, Settings, check_community
from moderation_worker.threshold_source import (
    DEFAULT_THRESHOLD,
    ThresholdInForce,
    read_threshold_file,
)

ENFORCE = "enforce"
SHADOW = "shadow"
MODES = (ENFORCE, SHADOW)
DEFAULT_ROUTE_KEY = "*"
MAX_VALUE_BYTES = 64 * 1024
_AUDIT = {"by": 256, "reason": 2048, "at": 64}  # optional fields -> longest value
_FIELD = {"threshold": "threshold", "mode": "mode", "route": "classifiers", "adapter": "lora"}
_PARTS = {"threshold": (1, 2), "mode": (1,), "route": (1,), "adapter": (1,)}  # names after kind
_EXTRA = {"adapter": {"sha256"}}  # optional fields besides the main one and the audit trail
MAX_LORA_SPEC_CHARS = 4096


class ControlRecordError(ValueError):
    """Why a control record was rejected (the message is logged and printed)."""


def _frozen(mapping: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class ClassifierPolicy:
    """One classifier as configured; `calibrated_threshold` comes from its LoRA metadata."""

    name: str
    mode: str = ENFORCE
    threshold: float | None = None
    community_thresholds: Mapping[str, float] = field(default_factory=dict)
    calibrated_threshold: float | None = None
    threshold_detail: str = ""  # where `threshold` was set, for "why this value?"

    def __post_init__(self) -> None:
        object.__setattr__(self, "community_thresholds", _frozen(self.community_thresholds))


@dataclass(frozen=True)
class PolicyState:
    """Classifiers, routes, and the overrides in force; decide a whole batch under one of these."""

    classifiers: Mapping[str, ClassifierPolicy]
    default_route: tuple[str, ...]
    routes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    routing_field: str = "community"
    control_thresholds: Mapping[tuple[str, str | None], float] = field(default_factory=dict)
    control_modes: Mapping[str, str] = field(default_factory=dict)
    control_adapters: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    version: int | None = None
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # key -> audit

    def __post_init__(self) -> None:
        for name in ("classifiers", "routes", "control_thresholds", "control_modes",
                     "control_adapters", "overrides"):  # fmt: skip
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def community(self, meta: Mapping[str, Any] | None) -> str | None:
        """The event's community: its routing field when that is a non-empty string."""
        value = meta.get(self.routing_field) if isinstance(meta, Mapping) else None
        return value if isinstance(value, str) and value else None

    def route(self, meta: Mapping[str, Any] | None) -> tuple[str, ...]:
        """The classifiers that score an event with these other fields."""
        return self.routes.get(self.community(meta) or "", self.default_route)

    def mode(self, classifier: str) -> str:
        return self.control_modes.get(classifier) or self.classifiers[classifier].mode

    def threshold(self, classifier: str, community: str | None = None) -> ThresholdInForce:
        """First hit wins: control (community, then classifier-wide), config (same order), the
        adapter's calibrated threshold, 0.5."""
        policy = self.classifiers[classifier]
        for key in dict.fromkeys([(classifier, community), (classifier, None)]):
            value = self.control_thresholds.get(key)
            if value is not None:
                return ThresholdInForce(value, "control", _key("threshold", *key))
        configured = policy.community_thresholds.get(community) if community else None
        if configured is not None:
            detail = f"classifiers.{classifier}.community_thresholds.{community}"
            return ThresholdInForce(configured, "setting", detail)
        if policy.threshold is not None:
            detail = policy.threshold_detail or f"classifiers.{classifier}.threshold"
            return ThresholdInForce(policy.threshold, "setting", detail)
        if policy.calibrated_threshold is not None:
            value = float(policy.calibrated_threshold)
            return ThresholdInForce(value, "model", "calibrated into the LoRA metadata")
        return ThresholdInForce(DEFAULT_THRESHOLD, "default", "no threshold configured")

    def to_dict(self) -> dict[str, Any]:
        """For `control show`, /health and the demo summary: every value and where it is from."""
        classifiers = {}
        for name, policy in self.classifiers.items():
            control = (c for n, c in self.control_thresholds if n == name and c)
            communities = sorted({*policy.community_thresholds, *control})
            classifiers[name] = {
                "mode": self.mode(name),
                "mode_source": "control" if name in self.control_modes else "setting",
                "adapter_override": dict(self.control_adapters.get(name) or {}) or None,
                "threshold": self.threshold(name).to_dict(),
                "community_thresholds": {c: self.threshold(name, c).to_dict() for c in communities},
            }
        return {
            "version": self.version,
            "routing_field": self.routing_field,
            "default_route": list(self.default_route),
            "routes": {c: list(r) for c, r in self.routes.items()},
            "classifiers": classifiers,
            "overrides": {k: dict(v) for k, v in self.overrides.items()},
        }


def policy_from_settings(
    settings: Settings, calibrated: Mapping[str, float | None] | None = None
) -> PolicyState:
    """The configured state (no control-topic overrides). With no `classifiers`, one classifier
    `hate` with the `threshold` setting or the `threshold_file` value (both "setting" level).

    Raises `SettingsError` for an unreadable `threshold_file`.
    """
    specs = [
        (c.name, c.mode, c.threshold, c.community_thresholds, "") for c in settings.classifiers
    ]
    if not specs:
        threshold, detail = settings.threshold, "threshold"
        if threshold is None and settings.threshold_file is not None:
            data = read_threshold_file(settings.threshold_file)
            threshold = data["threshold"]
            detail = f"threshold_file {settings.threshold_file} ({data.get('policy', '?')})"
        specs = [(DEFAULT_CLASSIFIER, ENFORCE, threshold, {}, detail)]
    calibrated = calibrated or {}
    policies = {s[0]: ClassifierPolicy(*s[:4], calibrated.get(s[0]), s[4]) for s in specs}
    return PolicyState(
        classifiers=policies,
        default_route=tuple(policies) if settings.default_route is None else settings.default_route,
        routes=settings.routes,
        routing_field=settings.routing_field,
    )


def single_classifier_policy(name: str, threshold: float | None = None) -> PolicyState:
    """One classifier, every event routed to it, at `threshold` ("setting" level) if given."""
    policy = ClassifierPolicy(name, threshold=threshold, threshold_detail="threshold")
    return PolicyState(classifiers={name: policy}, default_route=(name,))


# --------------------------------------------------------------------------- control records
Record = tuple[bytes, bytes | None]
Note = str | None


def _key(kind: str, *parts: str | None) -> str:
    return "/".join([kind, *(p for p in parts if p is not None)])


def parse_key(key: str) -> tuple[str, tuple[str, ...]]:
    """`kind/part[/part]` -> (kind, parts): the syntax checked, not that the names exist."""
    kind, _, rest = key.partition("/")
    parts = tuple(rest.split("/")) if rest else ()
    if len(parts) not in _PARTS.get(kind, ()):
        raise ControlRecordError(
            f"unknown control key {key[:200]!r}: want threshold/<classifier>[/<community>], "
            "mode/<classifier>, route/<community> or adapter/<classifier>"
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
    if kind != "route" and parts[0] not in state.classifiers:
        raise ControlRecordError(f"{key}: no classifier {parts[0]!r} (configured: {known})")
    given = value[main]
    if kind == "threshold":
        number = isinstance(given, (int, float)) and not isinstance(given, bool)
        if not (number and math.isfinite(given) and 0.0 <= given <= 1.0):
            raise ControlRecordError(f"{key}: threshold must be a number in [0, 1], got {given!r}")
    elif kind == "adapter":
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
    return _record(_key("threshold", classifier, community), {"threshold": value}, by, reason)


def record_for_mode(classifier: str, mode: str, by: Note = None, reason: Note = None) -> Record:
    return _record(_key("mode", classifier), {"mode": mode}, by, reason)


def record_for_route(
    community: str, classifiers: Sequence[str], by: Note = None, reason: Note = None
) -> Record:
    """`community` "*" sets the default route."""
    return _record(_key("route", community), {"classifiers": list(classifiers)}, by, reason)


def record_for_adapter(
    classifier: str, lora: str, sha256: Note = None, by: Note = None, reason: Note = None
) -> Record:
    value = {"lora": lora, **({"sha256": sha256} if sha256 else {})}
    return _record(_key("adapter", classifier), value, by, reason)


def tombstone(key: str) -> Record:
    return key.encode(), None


# --------------------------------------------------------------------------- live state
def _derive(
    base: PolicyState, records: Mapping[str, dict[str, Any]], version: int | None
) -> PolicyState:
    """`base` with every override in `records` (key -> value and its offset) applied."""
    thresholds, modes, adapters = {}, {}, {}
    routes, default_route = dict(base.routes), base.default_route
    for key, value in records.items():
        kind, parts = parse_key(key)
        if kind == "threshold":
            thresholds[(parts[0], (*parts, None)[1])] = float(value["threshold"])
        elif kind == "mode":
            modes[parts[0]] = value["mode"]
        elif kind == "adapter":
            adapters[parts[0]] = {k: value[k] for k in ("lora", "sha256") if value.get(k)}
        elif parts[0] == DEFAULT_ROUTE_KEY:
            default_route = tuple(value["classifiers"])
        else:
            routes[parts[0]] = tuple(value["classifiers"])
    return replace(
        base, default_route=default_route, routes=routes, control_thresholds=thresholds,
        control_modes=modes, control_adapters=adapters, version=version, overrides=records,
    )  # fmt: skip


class ControlState:
    """The worker's current `PolicyState`: the config-derived base plus the control records.

    `snapshot()` is a plain attribute read (the model thread calls it once per batch); `apply`
    builds a whole new state and swaps it in, so a reader never sees half a change.

    Args:
        base: the state from the settings (`policy_from_settings`).
        version: 0 when a control topic feeds this state, None when none does.
    """

    def __init__(self, base: PolicyState, version: int | None = 0) -> None:
        self._lock = threading.Lock()
        self._base, self._records = base, {}
        self._state = replace(base, version=version)
        self.applied = self.rejected = 0

    def snapshot(self) -> PolicyState:
        return self._state

    def apply(
        self, key: bytes | None, value: bytes | None, offset: int, partition: int = 0
    ) -> PolicyState:
        """Apply one record; `ControlRecordError` (state, version included, unchanged) if bad."""
        with self._lock:
            try:
                text, parsed = decode_record(key, value)
                validate_record(self._base, text, parsed)
            except ControlRecordError:
                self.rejected += 1
                raise
            records = {k: v for k, v in self._records.items() if k != text}
            if parsed is not None:
                records[text] = {**parsed, "offset": offset, "partition": partition}
            self._state = _derive(self._base, records, offset + 1)
            self._records = records
            self.applied += 1
            return self._state

    def rebase(self, base: PolicyState) -> list[tuple[str, str]]:
        """A new config-derived base (SIGHUP, calibrated thresholds once the model loaded);
        overrides it no longer admits are dropped and returned as (key, reason)."""
        with self._lock:
            dropped, records = [], {}
            for key, value in self._records.items():
                try:
                    audit = {k: v for k, v in value.items() if k not in ("offset", "partition")}
                    validate_record(base, key, audit)
                    records[key] = value
                except ControlRecordError as exc:
                    dropped.append((key, str(exc)))
            self._base, self._records = base, records
            self._state = _derive(base, records, self._state.version)
            return dropped

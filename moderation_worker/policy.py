"""Which classifiers score an event, with which threshold, enforcing or in shadow: one snapshot.

A `PolicyState` is immutable and a batch is decided under one, so a live change never splits a
batch. It is the settings (`policy_from_settings`) plus the overrides read from the compacted
control topic (`ControlState.apply`; the records are described in `control_records`): an
operator, or the learner, changes the whole fleet without a restart.

`version` is the offset of the last record *applied* + 1 (0 before any, None without a control
topic); a rejected record changes nothing, version included.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from moderation_worker.control_records import (
    CANDIDATE_SUFFIX,
    DEFAULT_ROUTE_KEY,
    ENFORCE,
    SHADOW,
    ControlRecordError,
    control_key,
    decode_record,
    parse_key,
    validate_record,
)
from moderation_worker.settings import DEFAULT_CLASSIFIER, Settings
from moderation_worker.threshold_source import (
    DEFAULT_THRESHOLD,
    ThresholdInForce,
    read_threshold_file,
)


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
    control_adapters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    control_candidates: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    version: int | None = None
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # key -> audit

    def __post_init__(self) -> None:
        for name in ("classifiers", "routes", "control_thresholds", "control_modes",
                     "control_adapters", "control_candidates", "overrides"):  # fmt: skip
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def community(self, meta: Mapping[str, Any] | None) -> str | None:
        """The event's community: its routing field when that is a non-empty string."""
        value = meta.get(self.routing_field) if isinstance(meta, Mapping) else None
        return value if isinstance(value, str) and value else None

    def route(self, meta: Mapping[str, Any] | None) -> tuple[str, ...]:
        """The classifiers that score an event with these other fields."""
        return self.routes.get(self.community(meta) or "", self.default_route)

    def scored(self, meta: Mapping[str, Any] | None, loaded: Sequence[str] = ()) -> list[str]:
        """The rows an event becomes: its route, then the candidate of each routed classifier
        that has one and whose adapter the model has `loaded` (never a row it cannot score)."""
        route = self.route(meta)
        extra = [candidate_name(c) for c in route if c in self.control_candidates]
        return [*route, *(n for n in extra if n in loaded)]

    def mode(self, classifier: str) -> str:
        if classifier.endswith(CANDIDATE_SUFFIX):
            return SHADOW  # a candidate never decides; promotion makes it the classifier
        return self.control_modes.get(classifier) or self.classifiers[classifier].mode

    def threshold(self, classifier: str, community: str | None = None) -> ThresholdInForce:
        """First hit wins: control (community, then classifier-wide, then the threshold an
        `adapter/` record brought with its weights), config (same order), the adapter's
        calibrated threshold, 0.5. A candidate's is the one its record carries."""
        if classifier.endswith(CANDIDATE_SUFFIX):
            base = classifier.removesuffix(CANDIDATE_SUFFIX)
            value = float(self.control_candidates[base]["threshold"])
            return ThresholdInForce(value, "control", control_key("candidate", base))
        policy = self.classifiers[classifier]
        for key in dict.fromkeys([(classifier, community), (classifier, None)]):
            value = self.control_thresholds.get(key)
            if value is not None:
                return ThresholdInForce(value, "control", control_key("threshold", *key))
        brought = (self.control_adapters.get(classifier) or {}).get("threshold")
        if brought is not None:
            return ThresholdInForce(float(brought), "control", control_key("adapter", classifier))
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
                "candidate": dict(self.control_candidates.get(name) or {}) or None,
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


def candidate_name(classifier: str) -> str:
    """The name a classifier's candidate is scored and reported under."""
    return classifier + CANDIDATE_SUFFIX


def single_classifier_policy(name: str, threshold: float | None = None) -> PolicyState:
    """One classifier, every event routed to it, at `threshold` ("setting" level) if given."""
    policy = ClassifierPolicy(name, threshold=threshold, threshold_detail="threshold")
    return PolicyState(classifiers={name: policy}, default_route=(name,))


# --------------------------------------------------------------------------- live state
def _derive(
    base: PolicyState, records: Mapping[str, dict[str, Any]], version: int | None
) -> PolicyState:
    """`base` with every override in `records` (key -> value and its offset) applied."""
    thresholds, modes, adapters, candidates = {}, {}, {}, {}
    routes, default_route = dict(base.routes), base.default_route
    for key, value in records.items():
        kind, parts = parse_key(key)
        if kind == "threshold":
            thresholds[(parts[0], (*parts, None)[1])] = float(value["threshold"])
        elif kind == "mode":
            modes[parts[0]] = value["mode"]
        elif kind in ("adapter", "candidate"):
            spec = {k: value[k] for k in ("lora", "sha256", "threshold") if k in value}
            (adapters if kind == "adapter" else candidates)[parts[0]] = spec
        elif parts[0] == DEFAULT_ROUTE_KEY:
            default_route = tuple(value["classifiers"])
        else:
            routes[parts[0]] = tuple(value["classifiers"])
    return replace(
        base, default_route=default_route, routes=routes, control_thresholds=thresholds,
        control_modes=modes, control_adapters=adapters, control_candidates=candidates,
        version=version, overrides=records,
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

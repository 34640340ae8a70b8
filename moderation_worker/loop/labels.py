"""A moderator's decision on one comment for one classifier, as the labels topic carries it.

Kafka key `<classifier>/<id>` (`ModeratorLabel.key`), so a compacted labels topic keeps the
latest decision per comment and classifier, the same rule the label store applies (`latest`).

A label record is a comment event (`id`, `text`, checked by `events.parse_comment`, so a bad
id or text is refused for the same reason as on the comments topic) plus `label` (true/false
or 1/0), `classifier`, and the optional `community`, `moderator` and `decided_at`. Any other
field is ignored, so producers may add their own context without breaking the learner.

`split_of` fixes once and for all which labels train, which pick the threshold and which are
held out to judge a promotion.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from moderation_worker import events
from moderation_worker.events import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_TEXT_CHARS,
    DUPLICATE_KEY,
    InvalidEvent,
    parse_comment,
)
from moderation_worker.settings import check_community

# Reasons a label record is refused beyond those of a comment (`events.REASONS`).
BAD_LABEL = "bad_label"
BAD_CLASSIFIER = "bad_classifier"
UNKNOWN_CLASSIFIER = "unknown_classifier"
BAD_FIELD = "bad_field"

#: Every reason `parse_label` can give (a label is never scored, so no `scoring_failed`).
LABEL_REASONS = tuple(r for r in events.REASONS if r != events.SCORING_FAILED) + (
    BAD_LABEL,
    BAD_CLASSIFIER,
    UNKNOWN_CLASSIFIER,
    BAD_FIELD,
)

#: The `ClassifierConfig.name` pattern of `settings`, so a label can only name a classifier
#: a deployment could configure.
CLASSIFIER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MAX_MODERATOR_CHARS = 256
MAX_DECIDED_AT_CHARS = 64
#: Label fields a repeated key would make ambiguous (`id` and `text` are checked by events).
_LABEL_FIELDS = ("label", "classifier", "community", "moderator", "decided_at")
_MAX_LISTED = 10

Split = Literal["train", "validation", "holdout"]


@dataclass(frozen=True)
class ModeratorLabel:
    """One decision. `label` is 1 for the classifier's positive class (e.g. hateful), else 0."""

    id: str
    text: str
    label: int
    classifier: str
    community: str | None = None
    moderator: str | None = None
    decided_at: str | None = None  # ISO 8601 as given

    @property
    def key(self) -> str:
        return f"{self.classifier}/{self.id}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "text": self.text,
            "label": self.label,
            "classifier": self.classifier,
        }
        for name in ("community", "moderator", "decided_at"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def parse_label(
    raw: bytes | str,
    classifiers: Collection[str] | None = None,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> ModeratorLabel:
    """Validate one raw label record; raise `InvalidEvent` with one of `LABEL_REASONS`.

    A label trains the next candidate, so anything ambiguous is refused rather than guessed:
    `label` must be a JSON boolean or the integer 0 or 1 (not "yes", 1.0 or 2), and no label
    field may be repeated. `classifiers`, when given, are the names the learner trains; a
    label for any other is refused (`UNKNOWN_CLASSIFIER`) instead of silently piling up.
    """
    if isinstance(classifiers, str):
        raise TypeError("classifiers must be a collection of names, not one string")
    comment = parse_comment(raw, max_text_chars=max_text_chars, max_depth=max_depth)
    _check_repeated_fields(raw)
    meta = comment.meta
    return ModeratorLabel(
        id=comment.id,
        text=comment.text,
        label=_label_value(meta),
        classifier=_classifier(meta, classifiers),
        community=_optional(meta, "community", check_community),
        moderator=_optional(meta, "moderator", _check_moderator),
        decided_at=_optional(meta, "decided_at", _check_decided_at),
    )


def _check_repeated_fields(raw: bytes | str) -> None:
    """Refuse a record that repeats a label field: parsers disagree on which copy counts.

    Cheap in the common case: only when a field's quoted name occurs twice in the bytes (or a
    key may hide behind a `\\u` escape) is the record parsed again to see its keys.
    """
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    if b"\\u" not in data and all(data.count(b'"%s"' % n.encode()) < 2 for n in _LABEL_FIELDS):
        return
    top: list[list[tuple[str, Any]]] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        top.append(items)  # the outermost object is decoded last
        return dict(items)

    json.loads(data, object_pairs_hook=pairs)
    keys = [k for k, _ in top[-1]]
    for name in _LABEL_FIELDS:
        if keys.count(name) > 1:
            raise InvalidEvent(
                DUPLICATE_KEY,
                f"label repeats the {name!r} key {keys.count(name)} times; "
                "parsers disagree on which copy counts, so it is refused",
            )


def _label_value(meta: dict[str, Any]) -> int:
    if "label" not in meta:
        raise InvalidEvent(BAD_LABEL, "label record has no 'label' field")
    value = meta["label"]
    if type(value) is bool or (type(value) is int and value in (0, 1)):
        return int(value)
    raise InvalidEvent(
        BAD_LABEL, f"'label' must be true/false or the integer 0 or 1, got {value!r:.80}"
    )


def _classifier(meta: dict[str, Any], known: Collection[str] | None) -> str:
    name = meta.get("classifier")
    if not isinstance(name, str) or not CLASSIFIER_NAME.fullmatch(name):
        raise InvalidEvent(
            BAD_CLASSIFIER,
            f"'classifier' must be a name like 'hate' (lowercase letters, digits, '_' or '-', "
            f"at most 64), got {name!r:.80}",
        )
    if known is not None and name not in known:
        names = sorted(known)
        listed = ", ".join(names[:_MAX_LISTED])
        more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
        raise InvalidEvent(
            UNKNOWN_CLASSIFIER,
            f"classifier {name!r} is not one this learner trains (known: {listed or 'none'}{more})",
        )
    return name


def _optional(meta: dict[str, Any], name: str, check: Callable[[Any], str]) -> str | None:
    """A missing or null optional field is None; anything else must pass `check`."""
    value = meta.get(name)
    if value is None:
        return None
    try:
        return check(value)
    except ValueError as exc:
        raise InvalidEvent(BAD_FIELD, f"{name!r}: {str(exc):.300}") from None


def _check_moderator(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_MODERATOR_CHARS:
        raise ValueError(f"must be a string of 1 to {MAX_MODERATOR_CHARS} characters")
    if not value.isprintable():
        raise ValueError(f"must be printable, got {value!r:.80}")
    return value


def _check_decided_at(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_DECIDED_AT_CHARS:
        raise ValueError(f"must be an ISO 8601 string of at most {MAX_DECIDED_AT_CHARS} chars")
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"is not an ISO 8601 time: {value!r}") from None
    return value


def decided_time(label: ModeratorLabel) -> datetime | None:
    """When the moderator decided, as an aware datetime (a time without offset is UTC).

    None when the record had no `decided_at`. A label that `parse_label` accepted always
    parses; one built by hand with a bad time raises ValueError.
    """
    if label.decided_at is None:
        return None
    moment = datetime.fromisoformat(label.decided_at)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def label_json(label: ModeratorLabel) -> bytes:
    """The record as the labels topic carries it; `parse_label` reads it back unchanged."""
    return orjson.dumps(label.to_dict())


def label_record(label: ModeratorLabel) -> tuple[bytes, bytes]:
    """(key, value) for a producer: keyed by `<classifier>/<id>` so compaction keeps the latest."""
    return label.key.encode("utf-8"), label_json(label)


def split_of(
    classifier: str,
    comment_id: str,
    holdout_fraction: float = 0.2,
    validation_fraction: float = 0.15,
) -> Split:
    """The slice a label belongs to, fixed by a hash of (classifier, id).

    Why a hash and not a (stratified) random draw per training cycle: an id never moves
    between slices as labels accumulate, so no later cycle ever trains on a label that an
    earlier one held out, and the held-out set only grows. The hash ignores the label, so each
    class is split in the same proportions in expectation (stratified in expectation; the
    learner still checks per-class counts). u is the first 8 bytes of
    sha256(classifier + "\\x00" + id) as a big-endian fraction of 2**64: below
    `holdout_fraction` is "holdout", below holdout + validation is "validation", else "train".
    """
    _check_fractions(holdout_fraction, validation_fraction)
    digest = hashlib.sha256(f"{classifier}\x00{comment_id}".encode("utf-8", "surrogatepass"))
    u = int.from_bytes(digest.digest()[:8], "big") / 2**64
    if u < holdout_fraction:
        return "holdout"
    if u < holdout_fraction + validation_fraction:
        return "validation"
    return "train"


def _check_fractions(holdout: float, validation: float) -> None:
    for name, value in (("holdout_fraction", holdout), ("validation_fraction", validation)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if holdout + validation >= 1.0:
        raise ValueError(
            f"holdout_fraction + validation_fraction must be below 1 to leave rows to train on, "
            f"got {holdout} + {validation}"
        )


def latest(labels: Iterable[tuple[int, ModeratorLabel]]) -> dict[str, tuple[int, ModeratorLabel]]:
    """The latest decision per `label.key` from (arrival sequence, label) pairs.

    A moderator may revise a decision, and records can arrive out of order (retries, several
    producers), so when both decisions carry `decided_at` the later time wins (a tie goes to
    the later arrival); otherwise the later arrival wins. Pairs are folded in arrival order,
    so the answer does not depend on the order of the input.
    """
    best: dict[str, tuple[int, ModeratorLabel]] = {}
    for seq, label in sorted(labels, key=lambda pair: pair[0]):
        current = best.get(label.key)
        if current is None or _supersedes(seq, label, *current):
            best[label.key] = (seq, label)
    return best


def _supersedes(seq: int, label: ModeratorLabel, old_seq: int, old: ModeratorLabel) -> bool:
    new_time, old_time = decided_time(label), decided_time(old)
    if new_time is not None and old_time is not None and new_time != old_time:
        return new_time > old_time
    return seq > old_seq

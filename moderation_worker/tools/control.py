"""`moderation-worker control ...`: show and change the fleet's policy on the control topic.

Every change is checked against the configured classifiers (the settings, as a worker would
load them) before anything is published, so a typo exits 2 with one line and the topic never
sees it. Each published record carries who (`--by`, default the login name), why (`--reason`)
and when (`at`), the audit trail `control show` prints back with every record's offset.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from typing import Any

import orjson

from moderation_worker.control_records import (
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
from moderation_worker.events import utc_now
from moderation_worker.policy import ControlState, policy_from_settings
from moderation_worker.settings import DEFAULT_CLASSIFIER, Settings
from moderation_worker.tools.commands import _print_json, _settings


def _topic(settings: Settings) -> str:
    if not settings.control_topic:
        raise ValueError("control_topic is not set (MODERATION_CONTROL_TOPIC or the config file)")
    return settings.control_topic


def _by(args: argparse.Namespace) -> str | None:
    """`--by`, else the login name (None where there is none, as in some containers)."""
    try:
        return args.by or getpass.getuser()
    except Exception:
        return None


def _stamped(record: tuple[bytes, bytes | None]) -> tuple[bytes, bytes | None]:
    """The record with `at` (now) in its value, for the audit trail; tombstones as they are."""
    key, value = record
    if value is None:
        return record
    return key, orjson.dumps({**orjson.loads(value), "at": utc_now()})


def _checked(settings: Settings, record: tuple[bytes, bytes | None]) -> None:
    """Raise `ControlRecordError` unless a worker on these settings would apply `record`."""
    key, value = decode_record(*record)
    validate_record(policy_from_settings(settings), key, value)


def publish(settings: Settings, record: tuple[bytes, bytes | None]) -> dict[str, Any]:
    """Check, then publish one record (acks=all); returns what was published, with the offset."""
    from adapters.control_topic import publish_control

    topic = _topic(settings)
    _checked(settings, record)
    offset = asyncio.run(publish_control(settings, topic, *record))
    key, value = record
    shown = None if value is None else orjson.loads(value)
    return {"topic": topic, "key": key.decode(), "value": shown, "offset": offset}


def publish_calibrated_threshold(
    settings: Settings,
    classifier: str,
    value: float,
    community: str | None = None,
    by: str = "calibrate",
    reason: str | None = None,
) -> int:
    """Publish a threshold `calibrate` chose, so the whole fleet uses it; returns the offset."""
    record = record_for_threshold(classifier, float(value), community, by=by, reason=reason)
    return int(publish(settings, _stamped(record))["offset"])


def _run(args: argparse.Namespace, record: tuple[bytes, bytes | None]) -> int:
    from aiokafka.errors import KafkaError

    try:
        _print_json(publish(_settings(args), _stamped(record)))
    except KafkaError as exc:
        print(f"moderation-worker control: broker error: {exc!r}", file=sys.stderr)
        return 1
    return 0


def cmd_control_set_threshold(args: argparse.Namespace) -> int:
    try:
        value = float(args.value)
    except ValueError:
        raise ControlRecordError(
            f"threshold must be a number in [0, 1], got {args.value!r}"
        ) from None
    record = record_for_threshold(args.classifier, value, args.community, _by(args), args.reason)
    return _run(args, record)


def cmd_control_set_mode(args: argparse.Namespace) -> int:
    return _run(args, record_for_mode(args.classifier, args.mode, _by(args), args.reason))


def cmd_control_set_route(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.classifiers.split(",") if n.strip()]
    return _run(args, record_for_route(args.community, names, _by(args), args.reason))


def cmd_control_set_adapter(args: argparse.Namespace) -> int:
    """The sha256 is computed here when the file is readable here, so every worker checks it
    loads the very file the operator meant."""
    from pathlib import Path

    from moderation_worker.model.lora import file_sha256

    digest = args.sha256
    if digest is None and not args.lora.startswith("shipped:") and Path(args.lora).is_file():
        digest = file_sha256(args.lora)
    record = record_for_adapter(args.classifier, args.lora, digest, _by(args), args.reason)
    return _run(args, record)


def cmd_control_clear(args: argparse.Namespace) -> int:
    parse_key(args.key)  # a tombstone needs a well-formed key only
    return _run(args, tombstone(args.key))


def cmd_control_show(args: argparse.Namespace) -> int:
    """The policy a worker on these settings would decide under now, and every record read.

    Thresholds calibrated into the LoRA metadata are not shown: no model is loaded here.
    """
    from adapters.control_topic import read_control

    settings = _settings(args)
    topic = _topic(settings)
    records = asyncio.run(read_control(settings, topic))
    state = ControlState(policy_from_settings(settings))
    shown = []
    for offset, key, value in records:
        entry: dict[str, Any] = {"offset": offset, "key": _text(key), "value": _json(value)}
        try:
            state.apply(key, value, offset)
            entry["result"] = "applied"
        except ControlRecordError as exc:
            entry.update(result="rejected", reason=str(exc))
        shown.append(entry)
    _print_json({"topic": topic, "state": state.snapshot().to_dict(), "records": shown})
    return 0


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", errors="replace")


def _json(raw: bytes | None) -> Any:
    try:
        return None if raw is None else orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _text(raw)


# --------------------------------------------------------------------------- calibrate --publish
def cmd_calibrate(args: argparse.Namespace) -> int:
    """`calibrate`, then with `--publish` the chosen threshold onto the control topic.

    The record is checked before the (long) calibration, so a wrong `--classifier` or a missing
    control topic fails at once.
    """
    from moderation_worker.threshold_source import read_threshold_file
    from moderation_worker.tools.commands import cmd_calibrate as calibrate

    settings = classifier = None
    if args.publish:
        settings = _settings(args)
        _topic(settings)
        names = [c.name for c in settings.classifiers] or [DEFAULT_CLASSIFIER]
        classifier = args.classifier or (names[0] if len(names) == 1 else None)
        if classifier is None:
            raise ValueError(f"--publish needs --classifier, one of {names}")
        _checked(settings, record_for_threshold(classifier, 0.5))
    code = calibrate(args)
    if code or settings is None or classifier is None:
        return code
    value = read_threshold_file(args.out)["threshold"]
    reason = f"calibrate --policy {args.policy} on {args.data}"
    offset = publish_calibrated_threshold(settings, classifier, value, reason=reason)
    print(
        f"published threshold/{classifier} = {value:.4f} to {settings.control_topic} "
        f"at offset {offset}",
        file=sys.stderr,
    )
    return 0

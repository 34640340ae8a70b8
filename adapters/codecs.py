"""orjson wire format for verdicts and dead letters, and the Faust codec that uses it.

Input events are consumed as raw bytes (the worker must see undecodable bytes to dead-letter
them); outputs are JSON objects encoded with orjson, which is fast and round-trips anything
`orjson.loads` accepted in the input (it rejects NaN, lone surrogates and infinite numbers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from faust.serializers import codecs

from moderation_worker.batching import Outcome
from moderation_worker.events import SCHEMA_VERSION

CODEC_NAME = "orjson"


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


#: Kafka's default max message size is 1 MiB and aiokafka's `max_request_size` 1,000,000 bytes.
DEFAULT_MAX_VALUE_BYTES = 1_000_000 - 4_096
DEFAULT_MAX_REQUEST_BYTES = 1_000_000
_KEEP_CHARS = 1_000
#: Keys longer than this are replaced by their hash on outputs: a key is for partitioning and
#: joining, and an input key near the size limit would leave no room for the verdict.
MAX_KEY_BYTES = 4_096
#: Input headers copied to an output, in total; past it only trace context is kept.
MAX_COPIED_HEADER_BYTES = 64 * 1024
#: Framing of a record (offsets, lengths, attributes, header counts) beyond key/value/headers.
_RECORD_OVERHEAD_BYTES = 512
HEADER_PREFIX = "x-moderation-"
_TRACE_HEADERS = ("traceparent", "tracestate", "baggage")


@dataclass(frozen=True)
class OutputRecord:
    """One record ready for the producer: verdict or dead letter, key, headers."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]

    @property
    def size(self) -> int:
        header_bytes = sum(len(k.encode("utf-8", "replace")) + len(v) for k, v in self.headers)
        return len(self.key or b"") + len(self.value) + header_bytes + _RECORD_OVERHEAD_BYTES


def outcome_value(outcome: Outcome[Any]) -> dict[str, Any]:
    """The JSON object published for an outcome: a verdict, or a dead letter."""
    if outcome.verdict is not None:
        return outcome.verdict.to_dict()
    assert outcome.dead_letter is not None
    return outcome.dead_letter.to_dict()


def build_record(
    outcome: Outcome[Any], max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
) -> OutputRecord:
    """The output record for an outcome, guaranteed to fit `max_request_bytes`.

    Whatever the input's key, headers or fields, its output must be publishable: otherwise
    the producer refuses it, the batch is never acknowledged, and every worker that takes
    over the partition fails on the same record. So an oversized key is replaced by its
    SHA-256 (the original's hash stays in the value and a header), oversized copied headers
    are dropped except trace context, and the value sheds weight (see `encode_outcome`).
    """
    value = outcome_value(outcome)
    key = _bounded_key(outcome.event.key, MAX_KEY_BYTES, value)
    headers = copied_headers(outcome.event.headers) + moderation_headers(outcome, value)
    record = OutputRecord(key, b"", headers)
    budget = max(1_024, max_request_bytes - record.size)
    return OutputRecord(key, encode_value(value, outcome, budget), headers)


def minimal_record(outcome: Outcome[Any]) -> OutputRecord:
    """The smallest record that still says what became of an event (no meta, no copied
    headers, the original bytes left out, a long key hashed), for when a full one is refused."""
    value = outcome_value(outcome)
    value.pop("meta", None)
    value["minimal"] = True
    if "original_b64" in value:
        value["original_size"] = len(outcome.event.raw)
        value["original_b64"] = ""
        value["original_truncated"] = True
    _cut_long_strings(value, ("id", "error"))
    key = _bounded_key(outcome.event.key, 256, value)
    return OutputRecord(key, orjson.dumps(value), moderation_headers(outcome, value))


def _bounded_key(key: bytes | None, limit: int, value: dict[str, Any]) -> bytes | None:
    """`key`, or `sha256:<hex>` of it when longer than `limit` (the hash also goes into
    `value` as `original_key_sha256`, so the record can still be joined to its input)."""
    if key is None or len(key) <= limit:
        return key
    digest = hashlib.sha256(key).hexdigest()
    value["original_key_sha256"] = digest
    return b"sha256:" + digest.encode("ascii")


def _cut_long_strings(value: dict[str, Any], fields: Sequence[str]) -> None:
    """Cut each of `fields` that is a string over `_KEEP_CHARS`, and mark the value `truncated`."""
    for field in fields:
        if isinstance(value.get(field), str) and len(value[field]) > _KEEP_CHARS:
            value[field] = value[field][:_KEEP_CHARS]
            value["truncated"] = True


def copied_headers(headers: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The input's headers to pass on: all of them (ours, `x-moderation-*`, excepted, so an
    input cannot forge them), or only trace context when together they are too large."""
    kept = [(k, v) for k, v in headers if not k.lower().startswith(HEADER_PREFIX)]
    if sum(len(k) + len(v) for k, v in kept) <= MAX_COPIED_HEADER_BYTES:
        return kept
    trace = [(k, v) for k, v in kept if k.lower() in _TRACE_HEADERS and len(v) <= 8_192]
    return trace + [(HEADER_PREFIX + "headers-dropped", str(len(kept) - len(trace)).encode())]


def moderation_headers(outcome: Outcome[Any], value: dict[str, Any]) -> list[tuple[str, bytes]]:
    """`x-moderation-*` headers: what the record is and which model and threshold made it."""
    out = [(HEADER_PREFIX + "schema-version", str(SCHEMA_VERSION).encode())]
    if outcome.verdict is not None:
        verdict = outcome.verdict
        out += [
            (HEADER_PREFIX + "outcome", b"verdict"),
            (HEADER_PREFIX + "model", verdict.model.base_model.encode("utf-8")),
            (HEADER_PREFIX + "lora-sha256", (verdict.model.lora_sha256 or "").encode("ascii")),
            (HEADER_PREFIX + "threshold", repr(verdict.threshold).encode("ascii")),
        ]
    else:
        assert outcome.dead_letter is not None
        out += [
            (HEADER_PREFIX + "outcome", b"dead_letter"),
            (HEADER_PREFIX + "reason", outcome.dead_letter.reason.encode("utf-8")),
        ]
    if "original_key_sha256" in value:
        out.append((HEADER_PREFIX + "original-key-sha256", value["original_key_sha256"].encode()))
    return out


def encode_outcome(outcome: Outcome[Any], max_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> bytes:
    """orjson bytes of the outcome's value, shrunk to fit `max_bytes` (see `encode_value`)."""
    return encode_value(outcome_value(outcome), outcome, max_bytes)


def encode_value(value: dict[str, Any], outcome: Outcome[Any], max_bytes: int) -> bytes:
    """orjson bytes of `value`, shrunk to fit `max_bytes`; never raises for a valid event.

    An input near the broker's size limit would otherwise produce an output over it (a dead
    letter's base64 is 4/3 of the input; a verdict repeats the input's other fields), the
    producer would refuse it, and the worker would crash on the same record after every
    restart. So the output sheds weight instead, and says so: a verdict drops `meta`
    (`meta_dropped`), a dead letter cuts `original_b64` (`original_truncated`, with the
    original size), and as a last resort long strings are cut (`truncated`). A `meta` that
    cannot be encoded at all (too deep, say) is dropped with the reason (`meta_error`).
    """
    try:
        data = orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        value.pop("meta", None)
        value["meta_dropped"] = True
        value["meta_error"] = str(exc)[:200]
        data = orjson.dumps(value)
    if len(data) <= max_bytes:
        return data
    if "meta" in value:
        del value["meta"]
        value["meta_dropped"] = True
    if "original_b64" in value:
        value["original_size"] = len(outcome.event.raw)
        value["original_truncated"] = True
        excess = len(orjson.dumps(value)) - max_bytes
        if excess > 0:
            keep = max(0, len(value["original_b64"]) - excess) // 4 * 4  # whole base64 quanta
            value["original_b64"] = value["original_b64"][:keep]
    data = orjson.dumps(value)
    if len(data) <= max_bytes:
        return data
    _cut_long_strings(value, ("id", "error", "original_b64"))
    return orjson.dumps(value)


class OrjsonCodec(codecs.Codec):
    """Faust codec `orjson`: `value_serializer="orjson"` on a topic encodes dicts with orjson."""

    def _dumps(self, obj: Any) -> bytes:
        return orjson.dumps(obj)

    def _loads(self, s: bytes) -> Any:
        return orjson.loads(s)


def register() -> None:
    """Make `orjson` available as a Faust serializer name (idempotent)."""
    if CODEC_NAME not in codecs.codecs:
        codecs.register(CODEC_NAME, OrjsonCodec())


register()

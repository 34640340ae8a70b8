"""orjson wire format for verdicts and dead letters, and the Faust codec that uses it.

Input events are consumed as raw bytes (the worker must see undecodable bytes to dead-letter
them); outputs are JSON objects encoded with orjson, which is fast and round-trips anything
`orjson.loads` accepted in the input (it rejects NaN, lone surrogates and infinite numbers).
"""

from __future__ import annotations

from typing import Any

import orjson
from faust.serializers import codecs

from moderation_worker.batching import Outcome

CODEC_NAME = "orjson"


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def outcome_value(outcome: Outcome[Any]) -> dict[str, Any]:
    """The JSON object published for an outcome: a verdict, or a dead letter."""
    if outcome.verdict is not None:
        return outcome.verdict.to_dict()
    assert outcome.dead_letter is not None
    return outcome.dead_letter.to_dict()


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

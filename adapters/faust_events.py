"""A Faust event as the core's `InputEvent`: the raw bytes, where they came from, their headers.

The Faust event itself rides along as the handle, so the pipeline can ack exactly that event
once its verdict or dead letter is on the broker.
"""

from __future__ import annotations

import time
from typing import Any

import faust

from moderation_worker.batching import InputEvent, admit
from moderation_worker.events import SourcePosition
from moderation_worker.settings import Settings


def to_input_event(event: faust.EventT, settings: Settings) -> InputEvent[faust.EventT]:
    """Validate one consumed record (never raises for bad input: that becomes a dead letter)."""
    message = event.message
    return admit(
        event.value,
        key=message.key,
        source=SourcePosition(message.topic, message.partition, message.offset),
        handle=event,
        received_at=time.monotonic(),
        produced_at=message.timestamp or None,
        max_text_chars=settings.max_text_chars,
        max_depth=settings.max_event_depth,
        headers=record_headers(message.headers),
    )


def record_headers(headers: Any) -> list[tuple[str, bytes | None]]:
    """A record's headers as (name, value) pairs, whatever shape the client gave them in."""
    if not headers:
        return []
    items = headers.items() if hasattr(headers, "items") else headers
    out: list[tuple[str, bytes | None]] = []
    for name, value in items:
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        out.append((str(name), value if isinstance(value, bytes | None) else str(value).encode()))
    return out

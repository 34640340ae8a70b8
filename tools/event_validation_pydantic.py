"""Would pydantic validate events as fast as the hand-written path, with the same reasons?

    python tools/event_validation_pydantic.py

Measures, in one process: `events.parse_comment` (orjson + checks) against a pydantic v2 model
validated from JSON (`model_validate_json`, pydantic-core's own parser) on typical events, and
prints what pydantic does with the hostile shapes our reasons name (duplicate keys, depth).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moderation_worker.events import InvalidEvent, parse_comment


class CommentEvent(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    id: str = Field(min_length=1, max_length=1024)
    text: str = Field(min_length=1, max_length=20_000)


EVENT = orjson.dumps(
    {
        "id": "c-1",
        "text": "Thanks for the tutorial, it really helped me out a lot! " * 3,
        "user": "u-1",
        "lang": "en",
        "thread": {"id": 1234567, "tags": ["a", "b"]},
    }
)


def per_call_us(fn: Any, n: int = 20_000) -> float:
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(runs)


def main() -> None:
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    ours = per_call_us(lambda: parse_comment(EVENT))
    theirs = per_call_us(lambda: CommentEvent.model_validate_json(EVENT))
    print(f"parse_comment (orjson + checks):      {ours:.2f} us/event")
    print(f"pydantic model_validate_json (strict): {theirs:.2f} us/event")
    for name, raw in [
        ("duplicate text key", b'{"id": "a", "text": "nice", "text": "awful"}'),
        ("nested 300 deep", b'{"id": "a", "text": "x", "m": ' + b"[" * 300 + b"]" * 300 + b"}"),
    ]:
        try:
            parse_comment(raw)
            our_answer = "accepted"
        except InvalidEvent as exc:
            our_answer = exc.reason
        try:
            model = CommentEvent.model_validate_json(raw)
            their_answer = f"accepted (text={model.text!r})"
        except ValidationError as exc:
            their_answer = exc.errors()[0]["type"]
        print(f"{name}: ours -> {our_answer}; pydantic -> {their_answer}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

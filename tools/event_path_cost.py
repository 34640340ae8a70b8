"""CPU cost per event of validation and output encoding (no model, no broker), optionally
beside an older checkout of the project measured in the same process.

    python tools/event_path_cost.py                      # this checkout
    git worktree add /tmp/before <rev>
    python tools/event_path_cost.py --before /tmp/before # side by side, same run

Typical events (a 170-character comment, four extra fields, a nested `id`) and a W3C
`traceparent` header; the median of 5 passes over 5,000 events. A model scores a few to a few
hundred comments per second, so this is the part of the pipeline that is *not* the model.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from typing import Any

import orjson

EVENTS = [
    orjson.dumps(
        {
            "id": f"c-{i}",
            "text": "Thanks for the tutorial, it really helped me out a lot! " * 3,
            "user": f"u-{i % 97}",
            "lang": "en",
            "thread": {"id": 1234567, "tags": ["a", "b"]},
        }
    )
    for i in range(5_000)
]
HEADERS = [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]


def _load(root: str) -> tuple[Any, Any, Any]:
    for name in [m for m in sys.modules if m.startswith(("moderation_worker", "adapters"))]:
        del sys.modules[name]
    sys.path.insert(0, root)
    try:
        modules = [
            importlib.import_module(f"moderation_worker.{m}") for m in ("batching", "events")
        ]
        return modules[0], modules[1], importlib.import_module("adapters.codecs")
    finally:
        sys.path.pop(0)


def measure(root: str) -> float:
    """Median microseconds per event for admit -> verdict -> output bytes."""
    batching, events, codecs = _load(root)
    new = hasattr(codecs, "build_record")
    identity = events.ModelIdentity("m", None)
    passes = []
    for _ in range(5):
        started = time.perf_counter()
        for i, raw in enumerate(EVENTS):
            kwargs = {"headers": HEADERS} if new else {}
            event = batching.admit(
                raw,
                key=b"k",
                source=events.SourcePosition("t", 0, i),
                handle=i,
                received_at=0.0,
                **kwargs,
            )
            verdict = events.Verdict(
                id=event.comment.id,
                p_hateful=0.1,
                hateful=False,
                label="Safe",
                threshold=0.5,
                model=identity,
                scored_at="x",
                source=event.source,
                meta=event.comment.meta,
            )
            outcome = batching.Outcome(event, verdict=verdict)
            codecs.build_record(outcome) if new else codecs.encode_outcome(outcome)
        passes.append((time.perf_counter() - started) / len(EVENTS) * 1e6)
    return statistics.median(passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="an older checkout to measure beside this one")
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    for _ in range(2):  # alternate, so a change in machine load hits both
        if args.before:
            print(f"before ({args.before}): {measure(args.before):.1f} us/event")
        print(f"this checkout: {measure(here):.1f} us/event")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

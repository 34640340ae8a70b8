"""The events the demo produces: comments from a file, ETHOS or the built-in samples, and two
deliberately bad records so the dead-letter path shows up."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from moderation_worker.events import EMPTY_TEXT, INVALID_JSON

SAMPLE_COMMENTS = Path(__file__).resolve().parents[2] / "assets" / "sample_comments.jsonl"


@dataclass(frozen=True)
class DemoEvent:
    """One record the demo produces. `expected_reason` is set for deliberately bad events."""

    key: bytes
    value: bytes
    id: str | None
    label: int | None = None
    expected_reason: str | None = None
    community: str | None = None  # the routing field: which classifiers score it


@dataclass(frozen=True)
class DemoInput:
    """The events to produce and a one-line description of where they came from."""

    events: tuple[DemoEvent, ...]
    description: str

    @property
    def comments(self) -> int:
        return sum(e.expected_reason is None for e in self.events)

    @property
    def labelled(self) -> bool:
        return any(e.label is not None for e in self.events)

    def communities(self, start: int = 0) -> set[str]:
        """The communities of the events from index `start` on."""
        return {e.community for e in self.events[start:] if e.community is not None}


def bad_events() -> tuple[DemoEvent, ...]:
    """Hostile records a real topic will see sooner or later, so the DLQ path shows up."""
    return (
        DemoEvent(
            b"bad-json",
            b'{"id": "bad-json", "text": "this record was cut off in the mid',
            None,
            expected_reason=INVALID_JSON,
        ),
        DemoEvent(
            b"bad-empty",
            orjson.dumps({"id": "bad-empty", "text": "   "}),
            "bad-empty",
            expected_reason=EMPTY_TEXT,
        ),
    )


def _comment_event(
    event_id: str, text: str, label: int | None, community: str | None = None
) -> DemoEvent:
    body: dict[str, Any] = {"id": event_id, "text": text}
    if label is not None:
        body["label"] = label  # passes through into the verdict's `meta`, next to the score
    if community is not None:
        body["community"] = community  # the worker's routing field (`routing_field`)
    return DemoEvent(event_id.encode("utf-8"), orjson.dumps(body), event_id, label, None, community)


def _communities(path: Path, n: int) -> list[str | None]:
    """The `community` of each row of a JSONL file (None where absent); CSV rows have none."""
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        return [None] * n
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    found = [r.get("community") if isinstance(r, dict) else None for r in rows]
    return [c if isinstance(c, str) and c else None for c in found][:n] + [None] * (n - len(rows))


def load_demo_input(
    input_file: str | Path | None = None,
    ethos: str | Path | None = None,
    limit: int | None = None,
    with_bad_events: bool = True,
) -> DemoInput:
    """Comments from a CSV/JSONL file, the ETHOS test split, or the built-in samples.

    A JSONL row's `community` (the built-in samples have some) goes into the event, where it
    picks the worker's route; CSV rows and ETHOS have none (the default route).

    `limit` counts comments; the bad events (when wanted) are spread through the stream, at a
    third and two thirds of the way, so they arrive inside batches rather than alone.
    """
    from moderation_worker.tools.data import DataError, ethos_splits, load_ethos, load_labelled_file

    if input_file is not None and ethos is not None:
        raise ValueError("give --input or --ethos, not both")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    if ethos is not None:
        test = ethos_splits(load_ethos(ethos)).test
        texts, labels = test.texts, [int(x) for x in test.labels]
        ids: tuple[str | None, ...] = tuple(f"ethos-test-{i:03d}" for i in range(len(texts)))
        communities: list[str | None] = [None] * len(texts)
        description = f"ETHOS test split ({ethos})"
    else:
        path = Path(input_file) if input_file is not None else SAMPLE_COMMENTS
        if not path.is_file():
            raise DataError(f"input file {path} does not exist")
        texts, label_array, ids = load_labelled_file(path)
        labels = [int(x) for x in label_array] if label_array is not None else [None] * len(texts)
        communities = _communities(path, len(texts))
        description = "built-in sample comments" if input_file is None else str(path)
    n = len(texts) if limit is None else min(limit, len(texts))
    comments = [
        _comment_event(ids[i] or f"demo-{i:05d}", texts[i], labels[i], communities[i])
        for i in range(n)
    ]
    counted = Counter(c or "none" for c in communities[:n])
    about = ["labelled"] if labels[0] is not None else []
    if set(counted) != {"none"}:
        about.append("communities " + ", ".join(f"{c} {k}" for c, k in sorted(counted.items())))
    description += f", {n} comments" + (f" ({'; '.join(about)})" if about else "")
    if with_bad_events:
        bad = bad_events()
        for position, event in zip((2 * n // 3, n // 3), reversed(bad), strict=True):
            comments.insert(position, event)
        description += f" + {len(bad)} bad events"
    return DemoInput(tuple(comments), description)

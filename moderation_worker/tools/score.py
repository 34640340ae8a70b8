"""`moderation-worker score`: JSON lines in, one verdict or dead letter per line out.

It runs the very pipeline the stream worker runs (`admit` -> `BatchPipeline` ->
`BatchProcessor`, fixed-shape batches, bisection of failing rows, the per-shape canary), with a
sink that writes JSON lines instead of a producer: a file scored here gets the same verdicts
the worker would publish for the same events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import IO, Any

import orjson

from moderation_worker.batching import Outcome, admit
from moderation_worker.events import DEFAULT_MAX_DEPTH, DEFAULT_MAX_TEXT_CHARS, SourcePosition
from moderation_worker.pipeline import BatchPipeline
from moderation_worker.processor import BatchProcessor
from moderation_worker.verdicts import ProbabilityModel


class JsonLinesSink:
    """Verdicts to one stream, dead letters to another, one JSON object per line, in order."""

    def __init__(self, verdicts: IO[bytes], dead_letters: IO[bytes]) -> None:
        self.verdicts = verdicts
        self.dead_letters = dead_letters
        self.counts = {"verdicts": 0, "dead_letters": 0}

    async def publish(self, outcomes: Sequence[Outcome[Any]]) -> None:
        for outcome in outcomes:
            if outcome.verdict is not None:
                self.verdicts.write(orjson.dumps(outcome.verdict.to_dict()) + b"\n")
                self.counts["verdicts"] += 1
            else:
                assert outcome.dead_letter is not None
                self.dead_letters.write(orjson.dumps(outcome.dead_letter.to_dict()) + b"\n")
                self.counts["dead_letters"] += 1
        self.verdicts.flush()
        self.dead_letters.flush()


def score_lines(
    lines: Iterable[bytes],
    model: ProbabilityModel,
    threshold: float,
    sink: JsonLinesSink,
    *,
    source_name: str = "stdin",
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> dict[str, int]:
    """Score every non-blank line; returns the counts. Line N is offset N-1 of `source_name`."""
    return asyncio.run(
        _score(lines, model, threshold, sink, source_name, max_text_chars, max_depth)
    )


async def _score(
    lines: Iterable[bytes],
    model: ProbabilityModel,
    threshold: float,
    sink: JsonLinesSink,
    source_name: str,
    max_text_chars: int,
    max_depth: int,
) -> dict[str, int]:
    processor = BatchProcessor(model, threshold, batch_size=model.batch_size)
    acked: list[int] = []
    pipeline: BatchPipeline[int] = BatchPipeline(
        processor, sink, lambda event: acked.append(event.handle), max_wait_s=3600.0
    )
    runner = asyncio.create_task(pipeline.run())
    submitted = 0
    try:
        for line_no, raw in enumerate(lines, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            event = admit(
                raw,
                key=None,
                source=SourcePosition(source_name, 0, line_no - 1),
                handle=line_no,
                received_at=time.monotonic(),
                max_text_chars=max_text_chars,
                max_depth=max_depth,
            )
            await pipeline.submit(event)
            submitted += 1
        await pipeline.finish()
    finally:
        runner.cancel()
    assert len(acked) == submitted, "every line ends as exactly one verdict or dead letter"
    return dict(sink.counts)

"""Length-aware batching and the prefix cache, measured through the worker's own batching.

Each run pushes the same comments, in the same arrival order, through the core pipeline the
worker runs (`BatchPipeline` + `BatchProcessor`, no broker: that is the pipeline section's
job) as a backlog (every batch fills unless the stream ends), with the real classifier:

* before: batches in arrival order, each cut to its longest prompt's bucket (one long comment
  stretches the batch), full prompt every row;
* + length queues (`[speed] batch_by_length`): one queue per length bucket;
* + prefix cache (`[speed] prefix_cache`): the prompt head computed once per adapter.

Two text sets: ETHOS comments as they are, and the same comments cut to 280 characters (a
tweet's limit). Reported: comments/s, the share of batches per compiled length, and how full
the model calls were.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson

from moderation_worker.batching import Batch, InputEvent, Outcome, admit
from moderation_worker.events import SourcePosition
from moderation_worker.model.classifier import AgileClassifier, LoadedModel
from moderation_worker.pipeline import BatchPipeline
from moderation_worker.processor import BatchProcessor, BatchResult
from moderation_worker.tools.bench.options import BenchOptions, bench_texts, log

CONFIGS: tuple[tuple[str, bool, bool], ...] = (
    ("before: arrival-order batches, cut to their longest prompt", False, False),
    ("+ length queues", True, False),
    ("+ length queues + prefix cache", True, True),
)


@dataclass
class LengthRun:
    """One (text set, batch size, configuration) pass."""

    texts: str
    batch: int
    config: str
    comments_per_s: float
    baseline: float | None
    mix: dict[int, float] = field(default_factory=dict)  # compiled length -> share of calls
    fill: float = 0.0  # real rows / rows computed
    p50_tokens: float = 0.0

    @property
    def change(self) -> str:
        return (
            "baseline" if self.baseline is None else f"{self.comments_per_s / self.baseline:.2f}x"
        )


def stream_texts(options: BenchOptions, n: int, seed: int = 0) -> tuple[list[str], str]:
    """`n` comments as a stream would bring them: all of ETHOS (both classes, every length),
    shuffled with a fixed seed; generated texts when the file is absent."""
    path = options.ethos_csv
    if path and path.is_file():
        import numpy as np

        from moderation_worker.tools.data import load_ethos

        texts = list(load_ethos(path).texts)
        order = np.random.default_rng(seed).permutation(len(texts))
        return [texts[i] for i in order[:n]], f"ETHOS, all comments shuffled (seed {seed})"
    return bench_texts(options, n, seed)


def tweet_length(texts: Sequence[str], limit: int = 280) -> list[str]:
    """Each text cut to `limit` characters at a word boundary (a tweet's length)."""
    out = []
    for text in texts:
        cut = text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0]
        out.append(cut or text[:limit])
    return out


class _Recorder:
    """Observer and sink: keeps each batch's compiled length and the row counts."""

    def __init__(self, clf: AgileClassifier) -> None:
        self.clf = clf
        self.batches: list[list[str]] = []
        self.rows = 0
        self.computed = 0
        self.p: dict[str, float] = {}  # comment id -> p(positive) of the first classifier

    def on_event(self, event: InputEvent[Any]) -> None:
        pass

    def on_batch_done(self, batch: Batch[Any], result: BatchResult[Any], _at: float) -> None:
        self.batches.append([e.comment.text for e in batch.events if e.comment is not None])
        self.rows += result.rows
        self.computed += result.model_calls * result.batch_size

    async def publish(self, outcomes: Sequence[Outcome[Any]]) -> None:
        for outcome in outcomes:
            if outcome.verdict is not None:
                self.p[outcome.verdict.id] = outcome.verdict.results[0].p

    def p_in_order(self, n: int) -> list[float]:
        """p(positive) of comments `c0..c{n-1}`, in the order they were sent."""
        return [self.p[f"c{i}"] for i in range(n)]

    def mix(self) -> dict[int, float]:
        lengths = Counter(max(self.clf.length_bucket(t) for t in b) for b in self.batches if b)
        total = sum(lengths.values()) or 1
        return {k: v / total for k, v in sorted(lengths.items())}


def run_in_process(
    clf: AgileClassifier, texts: Sequence[str], batch_by_length: bool, max_wait_s: float = 0.2
) -> tuple[float, _Recorder]:
    """Comments/s of one backlog pass through the worker's core pipeline, and what it saw."""
    recorder = _Recorder(clf)
    events = [
        admit(
            orjson.dumps({"id": f"c{i}", "text": text}),
            key=None,
            source=SourcePosition("bench", i % 4, i),
            handle=i,
            received_at=0.0,
        )
        for i, text in enumerate(texts)
    ]

    async def run() -> float:
        with ThreadPoolExecutor(max_workers=1) as executor:
            pipeline = BatchPipeline(
                BatchProcessor(clf, threshold=0.5),
                recorder,
                lambda e: None,
                max_wait_s=max_wait_s,
                executor=executor,
                observer=recorder,
                batch_by_length=batch_by_length,
            )
            runner = asyncio.create_task(pipeline.run())
            started = time.perf_counter()
            try:
                for event in events:
                    await pipeline.submit(event)
                await pipeline.finish()
            finally:
                runner.cancel()
            assert pipeline.acked == len(events), "the pass lost events"
            return len(events) / (time.perf_counter() - started)

    return asyncio.run(run()), recorder


def measure_length_batching(
    model: LoadedModel,
    options: BenchOptions,
    texts: Sequence[str],
    buckets: Sequence[int],
    rows: list[LengthRun],
) -> list[LengthRun]:
    """Every configuration at each batch size on both text sets, the first as baseline."""
    sets = {"ETHOS comments": list(texts), "tweet-length (cut to 280 chars)": tweet_length(texts)}
    for batch in options.length_batches:
        for prefix in (False, True):
            clf = AgileClassifier(
                model, batch_size=batch, length_buckets=buckets, prefix_cache=prefix
            )
            BatchProcessor(clf, threshold=0.5).warm_up()  # every shape compiled off the clock
            for set_name, comments in sets.items():
                tokens = [len(clf.encoder.encode_ids(t)[0]) for t in comments]
                base = next(
                    (r.comments_per_s for r in rows if (r.texts, r.batch) == (set_name, batch)),
                    None,
                )
                for config, by_length, cached in CONFIGS:
                    if cached != prefix:
                        continue
                    log(f"length batching: {set_name}, batch {batch}, {config}")
                    # One pass of the whole stream (`length_texts` comments) per row: the
                    # stream is the average; repeats would triple a section of ~20 runs.
                    rate, recorder = run_in_process(clf, comments, by_length)
                    rows.append(
                        LengthRun(
                            set_name,
                            batch,
                            config,
                            rate,
                            base,
                            recorder.mix(),
                            recorder.rows / max(1, recorder.computed),
                            statistics.median(tokens),
                        )
                    )
                    base = base if base is not None else rate
    return rows


def length_batching_section(runs: Sequence[LengthRun], n_texts: int) -> list[str]:
    """The markdown table of `measure_length_batching`."""
    if not runs:
        return []
    lines = [
        "## 2. Length-aware batching and the prefix cache (the worker's own batching)",
        "",
        f"The same {n_texts} comments, in the same arrival order, pushed as a backlog through "
        "the worker's core pipeline (`BatchPipeline` + `BatchProcessor`, no broker) with the "
        "real classifier, XLA on, length buckets "
        f"{sorted({k for r in runs for k in r.mix})}. *Mix* is the share of model calls per "
        "compiled length; *fill* the share of computed rows that were real comments (the rest "
        "is padding of partial batches).",
        "",
        "| Texts (median prompt tokens) | Batch | Configuration | comments/s | vs before | "
        "Mix (length: share of calls) | Fill |",
        "|---|---:|---|---:|---:|---|---:|",
    ]
    sets = list(dict.fromkeys(r.texts for r in runs))
    configs = [c for c, _, _ in CONFIGS]
    order = sorted(runs, key=lambda r: (sets.index(r.texts), r.batch, configs.index(r.config)))
    for r in order:
        mix = ", ".join(f"{k}: {100 * v:.0f} %" for k, v in r.mix.items())
        lines.append(
            f"| {r.texts} ({r.p50_tokens:.0f}) | {r.batch} | {r.config} | "
            f"{r.comments_per_s:.2f} | {r.change} | {mix} | {100 * r.fill:.0f} % |"
        )
    return [*lines, ""]

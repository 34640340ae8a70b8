"""Prometheus metrics of the worker, fed by the pipeline's observer hooks.

Each app gets its own `CollectorRegistry`: tests build several apps in one process, and the
global registry would refuse the second set of metric names. Faust's own Prometheus sensor is
attached to the same registry, so one `/metrics` page shows both.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moderation_worker.batching import Batch, InputEvent
from moderation_worker.processor import BatchResult

FILL_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class PipelineMetrics:
    """The `PipelineObserver` that turns batches into Prometheus series.

    Example:
        metrics = PipelineMetrics()
        pipeline = BatchPipeline(..., observer=metrics)
        generate_latest(metrics.registry)
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, prefix: str = "moderation"
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r, p = self.registry, prefix
        self.events_in = Counter(f"{p}_events_in", "Input events consumed", registry=r)
        self.verdicts = Counter(f"{p}_verdicts", "Verdicts published", ["label"], registry=r)
        self.dead_letters = Counter(
            f"{p}_dead_letters", "Dead letters published", ["reason"], registry=r
        )
        self.batches = Counter(f"{p}_batches", "Batches processed", ["closed_by"], registry=r)
        self.batch_lengths = Counter(
            f"{p}_batches_by_length",
            "Batches per length queue ([speed] batch_by_length; 'mixed' when it is off)",
            ["length"],
            registry=r,
        )
        self.fill_ratio = Histogram(
            f"{p}_batch_fill_ratio",
            "Real rows over the fixed batch size, per batch that needed the model",
            buckets=FILL_BUCKETS,
            registry=r,
        )
        self.model_latency = Histogram(
            f"{p}_model_latency_seconds",
            "Duration of one predict_proba call",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end = Histogram(
            f"{p}_end_to_end_latency_seconds",
            "Input record timestamp to broker acceptance of its verdict or dead letter",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            f"{p}_consumer_lag",
            "Records in the partition after the last acknowledged one (highwater - position)",
            ["topic", "partition"],
            registry=r,
        )
        self.threshold = Gauge(f"{p}_threshold", "Decision threshold in use", registry=r)
        self.threshold_reloads = Counter(
            f"{p}_threshold_reloads", "SIGHUP threshold reloads", ["result"], registry=r
        )
        self.classifier_flags = Counter(
            f"{p}_classifier_flags",
            "Comments a classifier flagged (shadow ones too: they never decide)",
            ["classifier", "mode"],
            registry=r,
        )
        self.control_records = Counter(
            f"{p}_control_records", "Control-topic records read", ["result"], registry=r
        )
        self.control_version = Gauge(
            f"{p}_control_version", "Control state the last batch was decided under", registry=r
        )
        self.model_info = Gauge(
            f"{p}_model_info", "Model in use (value 1)", ["base_model", "lora_sha256"], registry=r
        )

    def control_record(self, result: str, reason: str | None = None) -> None:
        """`ControlTopicReader`'s hook: one count per record, applied or rejected."""
        self.control_records.labels(result).inc()

    def set_model(self, base_model: str, lora_sha256: str | None) -> None:
        self.model_info.labels(base_model, lora_sha256 or "none").set(1)

    # PipelineObserver -------------------------------------------------------------------

    def on_event(self, event: InputEvent[Any]) -> None:
        self.events_in.inc()

    def on_batch_done(
        self, batch: Batch[Any], result: BatchResult[Any], published_at: float
    ) -> None:
        now = time.time()
        self.batches.labels(batch.closed_by or "unknown").inc()
        self.batch_lengths.labels(str(batch.bucket) if batch.bucket else "mixed").inc()
        if result.rows:
            self.fill_ratio.observe(result.fill_ratio)
        for seconds in result.model_seconds:
            self.model_latency.observe(seconds)
        self.threshold.set(result.threshold)
        if result.control_version is not None:
            self.control_version.set(result.control_version)
        for outcome in result.outcomes:
            if outcome.verdict is not None:
                self.verdicts.labels(outcome.verdict.label).inc()
                for r in outcome.verdict.results:
                    if r.flagged:
                        self.classifier_flags.labels(r.name, r.mode).inc()
            elif outcome.dead_letter is not None:
                self.dead_letters.labels(outcome.dead_letter.reason).inc()
            produced_at = outcome.event.produced_at
            if produced_at is not None:
                self.end_to_end.observe(max(0.0, now - produced_at))

"""The stream pipeline (broker, Faust, codecs, batching) with a trivial and the real scorer,
through the adapters' `measure_pipeline` handed in as `BenchEdges`, and what it means."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from moderation_worker.model.classifier import AgileClassifier, LoadedModel
from moderation_worker.tools.bench.flops import timed
from moderation_worker.tools.bench.length_batching import run_in_process
from moderation_worker.tools.bench.options import BenchEdges, BenchOptions, log
from moderation_worker.tools.bench.tuning import warm_buckets

if TYPE_CHECKING:
    from moderation_worker.tools.bench.report import BenchReport


@dataclass
class PipelineRow:
    """One `measure_pipeline` run."""

    run: str
    scorer: str
    result: dict[str, Any]


def measure_pipelines(
    model: LoadedModel, options: BenchOptions, edges: BenchEdges, rows: list[PipelineRow]
) -> list[PipelineRow]:
    """Trivial vs real scorer through the embedded broker; paced below capacity and overload."""
    assert edges.measure_pipeline and edges.broker and edges.trivial_scorer and edges.settings
    batch = options.tuning_batch
    n_trivial, n_real = options.pipeline_events
    with edges.broker() as broker:
        settings = edges.settings(
            broker_url=broker.url,
            batch_size=batch,
            max_wait_ms=50,
            input_partitions=4,
            session_timeout_s=3.0,
            heartbeat_interval_s=0.5,
            rebalance_timeout_s=3.0,
            commit_interval_s=0.5,
            log_level="WARNING",
        )
        trivial = edges.trivial_scorer(batch)
        log(f"pipeline: trivial scorer, {n_trivial} events, backlog drained as fast as possible")
        r = edges.measure_pipeline(settings, trivial, n_trivial, fetch_max_wait_ms=20)
        rows.append(PipelineRow("throughput (backlog)", "trivial", r))
        # The worker's classifier: AgileClassifier's defaults plus the worker's length buckets.
        clf = AgileClassifier(model, batch_size=batch, length_buckets=settings.length_buckets)
        warm_buckets(clf.scorer, clf.encoder, batch, clf.length_buckets)
        texts = edges.pipeline_texts(n_real) if edges.pipeline_texts else []
        if texts:
            seconds = timed(lambda: clf.predict_proba(texts), max(1, options.repeats - 1), 0)
            rate = len(texts) / statistics.median(seconds)
            log(f"pipeline: the same classifier alone on the same texts: {rate:.2f} comments/s")
            rows.append(
                PipelineRow(
                    "model alone: `predict_proba` on the same texts, no broker",
                    f"{model.name} label head",
                    {"events_per_s": rate, "fill_ratio": 1.0, "missing": 0, "duplicates": 0},
                )
            )
            passes = [
                run_in_process(clf, texts, settings.speed.batch_by_length)[0]
                for _ in range(max(1, options.repeats - 1))
            ]
            batching = statistics.median(passes)
            log(f"pipeline: the worker's batching in-process, no broker: {batching:.2f}/s")
            rows.append(
                PipelineRow(
                    "scorer alone: the worker's core batching in-process, no broker",
                    f"{model.name} label head",
                    {"events_per_s": batching, "fill_ratio": 1.0, "missing": 0, "duplicates": 0},
                )
            )
        log(f"pipeline: real scorer, {n_real} events, backlog")
        r = edges.measure_pipeline(settings, clf, n_real, fetch_max_wait_ms=20)
        rows.append(PipelineRow("throughput (backlog)", f"{model.name} label head", r))
        capacity = r["events_per_s"]
        loads = (("paced at 50 % of capacity", 0.5), ("overload at 2x capacity", 2.0))
        for name, factor in loads[: 1 if options.quick else 2]:
            rate = max(0.5, capacity * factor)
            log(f"pipeline: real scorer {name}: {rate:.2f} events/s, {n_real} events")
            r = edges.measure_pipeline(settings, clf, n_real, rate=rate, fetch_max_wait_ms=20)
            rows.append(PipelineRow(f"{name} ({rate:.2f}/s)", f"{model.name} label head", r))
    return rows


def pipeline_summary(report: BenchReport) -> str:
    """The pipeline's share of end-to-end time: seconds per event without vs with the model."""
    by_scorer = {p.scorer: p.result for p in report.pipeline if p.run.startswith("throughput")}
    trivial = by_scorer.get("trivial", {}).get("events_per_s")
    real = next((r["events_per_s"] for s, r in by_scorer.items() if s != "trivial"), None)
    if not trivial or not real:
        return ""
    share = real / trivial
    alone = next(
        (p.result["events_per_s"] for p in report.pipeline if p.run.startswith("scorer alone")),
        next((p.result["events_per_s"] for p in report.pipeline if "alone" in p.run), None),
    )
    text = (
        f"Pipeline share of end-to-end time: {1e3 / trivial:.2f} ms/event of pipeline (trivial "
        f"scorer) against {1e3 / real:.1f} ms/event end to end with the model, a ratio of "
        f"**{share:.4f}** ({100 * share:.2f} %)."
    )
    if alone:
        text += (
            f" The same classifier with the worker's own batching (length queues, prefix cache), "
            f"in one process without a broker, scores {alone:.2f} comments/s at batch "
            f"{report.options.tuning_batch} on the same texts; through the broker and Faust the "
            f"worker moves {real:.2f} events/s: **{100 * real / alone:.1f} %** of it."
        )
        if real < 0.9 * alone:
            text += (
                " On this 2-core machine the broker (Tansu), the load generator and the "
                "worker's event loop share the cores with TensorFlow's two compute threads, "
                "which is where the rest goes; with the broker elsewhere the pipeline's own "
                "cost is the ratio above."
            )
    return text


def scale_note(report: BenchReport) -> str:
    """1 vs 2 workers: what this machine can say, measured where it can be."""
    text = (
        "**1 vs 2 workers in one consumer group**: not measured as a pipeline run; "
        "`measure_pipeline` drives one in-process worker."
    )
    rates = {t.setting: t.comments_per_s for t in report.threads if np.isfinite(t.comments_per_s)}
    one = next((v for k, v in rates.items() if k.startswith("intra_op=1")), None)
    full = next((v for k, v in rates.items() if k.startswith("TF defaults")), None)
    if one and full:
        text += (
            f" From the thread rows: one worker using both cores scores {full:.2f} comments/s; "
            f"a worker pinned to one core {one:.2f}, so two one-core workers would reach at most "
            f"{2 * one:.2f} ({2 * one / full:.2f}x one worker)."
        )
    text += (
        " The model is compute-bound, so throughput scales with cores, not with workers: more "
        "machines (one model per worker process) add throughput linearly until every input "
        "partition has its own worker; partitions bound the parallelism of one consumer group. "
        "Two workers sharing a group, one killed mid-stream, losing nothing, is a test: "
        "`tests/test_worker_broker.py`."
    )
    return text

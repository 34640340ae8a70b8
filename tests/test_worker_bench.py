"""`measure_pipeline`, the measurement the benchmark command reuses, on the test broker."""

from __future__ import annotations

import math

import pytest

from moderation_worker.settings import Settings
from moderation_worker.tools.pipeline_bench import bench_texts, measure_pipeline
from moderation_worker.tools.trivial_scorer import TrivialScorer
from tests.fixtures_broker import BrokerInfo

pytestmark = pytest.mark.broker


def test_measure_pipeline_reports_throughput_fill_and_latency(broker: BrokerInfo) -> None:
    settings = Settings(
        broker_url=broker.url,
        batch_size=8,
        max_wait_ms=50,
        input_partitions=2,
        **broker.group_timing,
    )
    result = measure_pipeline(
        settings,
        TrivialScorer(batch_size=8),
        n_events=200,
        rate=400,
        fetch_max_wait_ms=20 if broker.embedded else None,
    )
    assert result["verdicts"] + result["dead_letters"] >= 200 and result["missing"] == 0
    assert result["events_per_s"] > 0 and 0 < result["fill_ratio"] <= 1
    assert 0 < result["latency_p50_s"] <= result["latency_p99_s"] < 30
    assert result["mode"] == "paced" and result["batches"] >= 25
    assert not math.isnan(result["window_s"])


def test_bench_texts_are_deterministic() -> None:
    assert bench_texts(5) == bench_texts(5) and len(bench_texts(5)) == 5

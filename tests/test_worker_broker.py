"""The worker through a real Kafka-protocol broker (embedded Tansu, or MODERATION_TEST_BROKER).

Workers run as subprocesses, exactly as `moderation-worker worker` runs them, so they can be
killed hard. Every test checks the at-least-once invariant directly: no committed offset of the
input topic may lie past an input that has no verdict or dead letter yet.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_broker import (
    BrokerInfo,
    Outputs,
    TopicSet,
    WorkerProcess,
    comment,
    committed_offsets,
    create_topics,
    produce,
    read_outputs,
    worker_env,
)
from tests.test_worker_memory import HOSTILE, check_original

pytestmark = pytest.mark.broker


async def assert_nothing_committed_without_output(
    broker: BrokerInfo, topics: TopicSet, partitions: int, outputs: Outputs
) -> dict[int, int]:
    committed = await committed_offsets(broker, topics.app_id, topics.input, partitions)
    have = set(outputs.sources())
    for p, offset in committed.items():
        missing = [o for o in range(offset) if (p, o) not in have]
        assert not missing, f"partition {p} committed at {offset} past unpublished {missing}"
    return committed


async def wait_for_commit(
    broker: BrokerInfo, topics: TopicSet, partitions: int, total: int, timeout: float = 15.0
) -> dict[int, int]:
    """Committed offsets once they cover `total` records (commits are periodic)."""
    deadline = time.monotonic() + timeout
    while True:
        committed = await committed_offsets(broker, topics.app_id, topics.input, partitions)
        if sum(committed.values()) >= total or time.monotonic() > deadline:
            return committed
        await asyncio.sleep(0.3)


async def test_hostile_mix_through_the_broker_one_output_each_with_health_metrics_and_logs(
    broker: BrokerInfo, topics: TopicSet, spawn_worker: Any
) -> None:
    await create_topics(broker, [topics.input], partitions=2)
    worker: WorkerProcess = spawn_worker(
        worker_env(broker, topics, partitions=2), scorer={"poison_marker": "POISON"}
    )
    health = worker.wait_ready()
    assert health["model"]["base_model"] == "trivial-keyword-scorer"

    positions = await produce(
        broker, topics.input, [(f"k{i}".encode(), v) for i, (v, _) in enumerate(HOSTILE)]
    )
    out = await read_outputs(broker, topics, until=lambda o: len(o.all) >= len(HOSTILE))
    await asyncio.sleep(0.5)  # anything extra (a duplicate) would show up by now
    out = await read_outputs(broker, topics, idle=0.5)

    assert sorted(out.sources()) == sorted(positions), "exactly one output per input"
    for (partition, offset), (value, reason) in zip(positions, HOSTILE, strict=True):
        matches = [
            o
            for o in out.all
            if o["source"] == dict(topic=topics.input, partition=partition, offset=offset)
        ]
        (o,) = matches
        if reason is None:
            assert "p_hateful" in o and o["threshold"] == 0.5
        else:
            assert o["reason"] == reason
            check_original(o, value)
        topic = topics.verdicts if reason is None else topics.dlq
        index = HOSTILE.index((value, reason))
        assert out.keys[(topic, partition, offset)] == f"k{index}".encode()

    await wait_for_commit(broker, topics, 2, len(HOSTILE))
    committed = await assert_nothing_committed_without_output(broker, topics, 2, out)
    assert sum(committed.values()) == len(HOSTILE)

    metrics = worker.get("/metrics")
    assert 'moderation_dead_letters_total{reason="scoring_failed"} 1.0' in metrics
    assert 'moderation_dead_letters_total{reason="not_utf8"} 2.0' in metrics
    assert f"moderation_events_in_total {float(len(HOSTILE))}" in metrics
    assert "moderation_batch_fill_ratio_count" in metrics
    assert "moderation_end_to_end_latency_seconds_bucket" in metrics
    assert "faust_messages_received" in metrics  # Faust's own sensor on the same page
    status, body = worker.health()
    assert status == 200 and body["status"] == "ready"
    deadline = time.monotonic() + 8  # the lag gauge is refreshed by a 5 s timer
    while "moderation_consumer_lag{" not in worker.get("/metrics"):
        assert time.monotonic() < deadline, "consumer lag never exported"
        await asyncio.sleep(0.5)
    assert 'moderation_consumer_lag{partition="0",topic=' in worker.get("/metrics")

    assert worker.stop() == 0
    records = worker.log_lines()
    assert records and all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    lines = [ln for ln in worker.log_path.read_bytes().splitlines() if ln.strip()]
    assert len(records) == len(lines), "every log line is a JSON object"


async def test_broken_model_stops_the_worker_unacked_and_a_restart_scores_everything(
    broker: BrokerInfo, topics: TopicSet, spawn_worker: Any
) -> None:
    """The ack test: if acks went out before publishing (or in a finally, as `take()` does),
    the committed offsets would pass inputs that have no output, and the assertion fails."""
    n, partitions = 96, 3
    await create_topics(broker, [topics.input], partitions)
    env = worker_env(broker, topics, partitions=partitions)
    broken = spawn_worker(env, scorer={"fail_after_calls": 4, "delay_s": 0.02})
    broken.wait_ready()
    await produce(broker, topics.input, [(f"u{i % 5}".encode(), comment(i)) for i in range(n)])

    rc = await asyncio.to_thread(broken.wait, 60)
    assert rc != 0, "a model that fails on the canary must stop the worker"
    assert any("pipeline failed" in r["msg"] for r in broken.log_lines())
    out = await read_outputs(broker, topics, idle=1.0)
    assert 0 < len(out.ids()) < n
    assert not out.dead_letters, "a broken model must not dead-letter healthy comments"
    await assert_nothing_committed_without_output(broker, topics, partitions, out)

    healthy = spawn_worker(env)
    healthy.wait_ready()
    out = await read_outputs(broker, topics, until=lambda o: len(o.ids()) >= n, timeout=40)
    assert out.ids() == {f"c{i}" for i in range(n)}
    await wait_for_commit(broker, topics, partitions, n)
    committed = await assert_nothing_committed_without_output(broker, topics, partitions, out)
    assert sum(committed.values()) == n


async def test_two_workers_share_the_group_and_one_killed_mid_stream_loses_nothing(
    broker: BrokerInfo, topics: TopicSet, spawn_worker: Any
) -> None:
    n, partitions = 600, 4
    await create_topics(broker, [topics.input], partitions)
    env = worker_env(broker, topics, partitions=partitions)
    slow = {"delay_s": 0.04}  # ~200 events/s per worker, so the kill lands mid-stream
    a: WorkerProcess = spawn_worker(env, scorer=slow)
    b: WorkerProcess = spawn_worker(env, scorer=slow)
    a.wait_ready()
    b.wait_ready()
    deadline = time.monotonic() + 30
    while True:  # both members hold partitions: the group really is split
        ha, hb = a.health(), b.health()
        split = ha and hb and ha[1]["assigned_partitions"] and hb[1]["assigned_partitions"]
        if split and set(ha[1]["assigned_partitions"]) | set(hb[1]["assigned_partitions"]) == set(
            range(partitions)
        ):
            break
        assert time.monotonic() < deadline, f"group never split: {ha} {hb}"
        await asyncio.sleep(0.2)

    await produce(broker, topics.input, [(f"user{i % 13}".encode(), comment(i)) for i in range(n)])
    await read_outputs(broker, topics, until=lambda o: len(o.all) >= n // 4, timeout=30)
    b.signal(signal.SIGKILL)  # no LeaveGroup, no commit: the hardest way to leave
    assert b.wait(10) == -signal.SIGKILL

    out = await read_outputs(broker, topics, until=lambda o: len(o.ids()) >= n, timeout=60)
    assert out.ids() == {f"c{i}" for i in range(n)}, "every input got a verdict"
    assert not out.dead_letters
    assert len(out.verdicts) >= n  # duplicates are allowed; consumers de-duplicate by id
    await wait_for_commit(broker, topics, partitions, n)
    committed = await assert_nothing_committed_without_output(broker, topics, partitions, out)
    assert sum(committed.values()) == n
    assert a.health()[1]["assigned_partitions"] == list(range(partitions))


async def test_sighup_reloads_the_threshold_without_reloading_the_model(
    broker: BrokerInfo, topics: TopicSet, spawn_worker: Any, tmp_path: Path
) -> None:
    threshold_file = tmp_path / "threshold.toml"
    threshold_file.write_text('threshold = 0.99\npolicy = "test"\n')
    await create_topics(broker, [topics.input], partitions=1)
    env = worker_env(broker, topics, partitions=1, threshold_file=threshold_file)
    worker: WorkerProcess = spawn_worker(env)
    assert worker.wait_ready()["threshold"] == 0.99

    await produce(broker, topics.input, [(b"k", comment(i, "you idiot scum")) for i in range(5)])
    out = await read_outputs(broker, topics, until=lambda o: len(o.verdicts) >= 5)
    assert {(v["threshold"], v["hateful"]) for v in out.verdicts} == {(0.99, False)}

    threshold_file.write_text('threshold = 0.01\npolicy = "test"\n')
    worker.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while worker.health()[1]["threshold"] != 0.01:
        assert time.monotonic() < deadline, worker.log_tail()
        await asyncio.sleep(0.1)

    await produce(
        broker, topics.input, [(b"k", comment(i, "you idiot scum")) for i in range(5, 10)]
    )
    out = await read_outputs(broker, topics, until=lambda o: len(o.verdicts) >= 10)
    later = [v for v in out.verdicts if int(v["id"][1:]) >= 5]
    assert {(v["threshold"], v["hateful"], v["label"]) for v in later} == {(0.01, True, "hateful")}

    records = worker.log_lines()
    assert sum(r["msg"] == "model loaded" for r in records) == 1
    assert any(r["msg"] == "threshold reloaded" and r["threshold"] == 0.01 for r in records)
    assert 'moderation_threshold_reloads_total{result="ok"} 1.0' in worker.get("/metrics")


async def test_exactly_once_commits_verdicts_with_offsets(
    broker: BrokerInfo, topics: TopicSet, spawn_worker: Any
) -> None:
    if broker.embedded:
        pytest.skip("Tansu 0.6.0 answers InitProducerId with UnknownError: no transactions")
    n = 40
    await create_topics(broker, [topics.input], partitions=2)
    env = worker_env(broker, topics, partitions=2, processing_guarantee="exactly_once")
    worker: WorkerProcess = spawn_worker(env)
    worker.wait_ready()
    await produce(broker, topics.input, [(f"k{i}".encode(), comment(i)) for i in range(n)])
    out = await read_outputs(broker, topics, until=lambda o: len(o.ids()) >= n, timeout=30)
    assert out.ids() == {f"c{i}" for i in range(n)}
    await wait_for_commit(broker, topics, 2, n)
    await assert_nothing_committed_without_output(broker, topics, 2, out)

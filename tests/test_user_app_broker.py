"""Moderation installed in a team's own Faust app (`tests/user_app.py`), through a real broker.

The app runs as Faust apps run, `python -m tests.user_app worker` (Faust's CLI), with its own
agent beside moderation in one consumer group. Both must work: the app's counts are exact,
every comment gets exactly one verdict or dead letter, no committed offset of the comment topic
passes a comment without one, both `/health` pages answer, and SIGTERM stops it gracefully.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters.tansu import free_port
from moderation_worker.tools import worker_process
from tests.fixtures_broker import (
    REPO_ROOT,
    BrokerInfo,
    TopicSet,
    comment,
    create_topics,
    produce,
    read_outputs,
    worker_env,
)
from tests.test_worker_broker import assert_nothing_committed_without_output, wait_for_commit

pytestmark = pytest.mark.broker

#: Where the user app serves moderation's pages: it has a `/health` of its own.
HEALTH_PREFIX = "/moderation"


class UserAppProcess(worker_process.WorkerProcess):
    """`python -m tests.user_app worker`, with moderation's `/health` under its prefix."""

    def __init__(self, env: dict[str, str], log_path: Path, web_port: int) -> None:
        full = {k: v for k, v in os.environ.items() if k != "MODERATION_CONFIG_FILE"}
        super().__init__(
            {**full, **env},
            log_path,
            web_port,
            command=[sys.executable, "-m", "tests.user_app", "worker", "--loglevel", "info"],
            cwd=REPO_ROOT,
            tail_lines=60,
        )

    def health(self) -> tuple[int, dict[str, Any]] | None:
        got = self.http_get(f"{HEALTH_PREFIX}/health", timeout=1.0)
        if got is None:
            return None
        try:
            return got[0], orjson.loads(got[1] or b"{}")
        except orjson.JSONDecodeError:
            return None


async def read_counts(broker: BrokerInfo, topic: str, expected: int) -> dict[bytes, int]:
    """The last count the user's agent published per key, once `expected` records arrived."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=broker.bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    last: dict[bytes, int] = {}
    seen = 0
    try:
        async with asyncio.timeout(30):
            while seen < expected:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for record in records:
                        last[record.key] = max(last.get(record.key, 0), int(record.value))
                        seen += 1
    finally:
        await consumer.stop()
    return last


async def test_a_users_faust_app_runs_its_own_agent_and_moderation_side_by_side(
    broker: BrokerInfo, topics: TopicSet, tmp_path: Path
) -> None:
    partitions = 2
    clicks, counts = f"{topics.input}.clicks", f"{topics.input}.click-counts"
    await create_topics(broker, [topics.input, clicks, counts], partitions)
    web_port = free_port()
    options = {
        "broker": broker.url,
        "web_port": web_port,
        "web_bind": "127.0.0.1",
        "web_host": "127.0.0.1",
        "datadir": str(tmp_path / "user-app-data"),
        "topic_replication_factor": 1,
        "broker_commit_interval": 0.5,
        "broker_session_timeout": broker.group_timing["session_timeout_s"],
        "broker_heartbeat_interval": broker.group_timing["heartbeat_interval_s"],
        "broker_rebalance_timeout": broker.group_timing["rebalance_timeout_s"],
    }
    env = {
        **worker_env(broker, topics, partitions=partitions),
        "USER_APP_ID": topics.app_id,  # the consumer group the committed offsets are read from
        "USER_APP_OPTIONS": json.dumps(options),
        "USER_APP_CLICKS": clicks,
        "USER_APP_COUNTS": counts,
        "USER_APP_MODERATION_PREFIX": HEALTH_PREFIX,
    }
    app = UserAppProcess(env, tmp_path / "user-app.log", web_port).start()
    try:
        health = app.wait_ready(timeout=60)
        assert health["model"]["base_model"] == "trivial-keyword-scorer"

        per_key = {b"alice": 5, b"bob": 3, b"carol": 7}
        await produce(broker, clicks, [(k, b"click") for k, n in per_key.items() for _ in range(n)])
        inputs = [(f"u{i % 3}".encode(), comment(i)) for i in range(40)]
        inputs += [(b"u0", b"not json"), (b"u1", orjson.dumps({"text": "no id"}))]
        positions = await produce(broker, topics.input, inputs)

        out = await read_outputs(broker, topics, until=lambda o: len(o.all) >= len(inputs))
        await asyncio.sleep(0.5)  # anything extra (a duplicate) would show up by now
        out = await read_outputs(broker, topics, idle=0.5)
        assert sorted(out.sources()) == sorted(positions), "exactly one output per comment"
        assert {d["reason"] for d in out.dead_letters} == {"invalid_json", "missing_id"}
        assert out.ids() >= {f"c{i}" for i in range(40)}

        assert await read_counts(broker, counts, sum(per_key.values())) == per_key

        await wait_for_commit(broker, topics, partitions, len(inputs))
        committed = await assert_nothing_committed_without_output(broker, topics, partitions, out)
        assert sum(committed.values()) == len(inputs)

        assert json.loads(app.get("/health")) == {"app": "user-app", "clicks_counted": 15}
        status, body = app.health() or (0, {})
        assert status == 200 and body["status"] == "ready"
        assert body["assigned_partitions"] == list(range(partitions))
        metrics = app.get(f"{HEALTH_PREFIX}/metrics")
        assert f"moderation_events_in_total {float(len(inputs))}" in metrics
        assert 'moderation_dead_letters_total{reason="invalid_json"} 1.0' in metrics
        assert "faust_messages_received" in metrics  # Faust's sensor, the app had none

        assert app.stop() == 0
        log = "\n".join(app.log_text_lines())
        assert "stopping: finishing the batch in flight" in log, "SIGTERM reached moderation"
    finally:
        app.stop()

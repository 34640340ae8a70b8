"""Several classifiers, routes, shadow mode and live fleet control, through the real broker.

Workers are real worker processes (Faust, aiokafka, the embedded Tansu broker) with keyword
classifiers standing in for the adapters (`TrivialClassifierSet`), so routing and control are
tested in seconds; the per-row LoRA itself is tested on real models in test_multi_lora.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from adapters.control_topic import publish_control
from moderation_worker.control_records import record_for_threshold
from moderation_worker.settings import Settings
from tests.fixtures_broker import (
    BrokerInfo,
    TopicSet,
    WorkerProcess,
    comment,
    create_topics,
    produce,
    read_outputs,
    worker_env,
)

pytestmark = pytest.mark.broker

PARTITIONS = 4
SCORER = {
    "classifiers": {
        "hate": ["scum", "vermin"],
        "violence": ["kill", "break your"],
        "spam": ["buy now"],
    }
}
POLICY = {
    "classifiers": '[{"name": "hate"}, {"name": "violence", "threshold": 0.6},'
    ' {"name": "spam", "mode": "shadow"}]',
    "routes": '{"gaming": ["hate", "violence", "spam"]}',
    "default_route": '["hate", "spam"]',
}
TEXTS = ["you are scum", "I will kill you", "buy now cheap", "nice match", "vermin, kill them"]


def batch(tag: str, n: int = 20) -> list[tuple[bytes, bytes]]:
    """`n` comments, every other one from the `gaming` community."""
    out = []
    for i in range(n):
        extra = {"community": "gaming"} if i % 2 == 0 else {}
        value = comment(i, TEXTS[i % len(TEXTS)], **extra)
        record = orjson.loads(value) | {"id": f"{tag}-{i}"}
        out.append((f"{tag}-{i}".encode(), orjson.dumps(record)))
    return out


async def verdicts_of(broker: BrokerInfo, topics: TopicSet, tag: str, n: int) -> list[dict]:
    def mine(out: Any) -> list[dict]:
        return [v for v in out.verdicts if v["id"].startswith(f"{tag}-")]

    out = await read_outputs(broker, topics, until=lambda o: len(mine(o)) >= n, timeout=60)
    found = mine(out)
    assert len(found) == n, f"{len(found)} of {n} verdicts for {tag}"
    return found


async def wait_for_version(workers: list[WorkerProcess], version: int, within_s: float) -> float:
    """Seconds until every worker's /health shows control state `version`."""
    started = time.monotonic()
    while True:
        versions = [w.health()[1]["policy"]["version"] for w in workers]
        if all(v == version for v in versions):
            return time.monotonic() - started
        assert time.monotonic() - started < within_s, f"versions {versions}, want {version}"
        await asyncio.sleep(0.05)


async def test_routes_shadow_and_a_live_threshold_change_across_the_fleet(
    broker: BrokerInfo, topics: TopicSet, spawn_worker: Any
) -> None:
    await create_topics(broker, [topics.input], partitions=PARTITIONS)
    env = worker_env(broker, topics, partitions=PARTITIONS, **POLICY)
    workers = [spawn_worker(env, scorer=SCORER) for _ in range(2)]
    for w in workers:
        w.wait_ready()
    assert {w.health()[1]["policy"]["version"] for w in workers} == {0}

    # Routes and shadow mode: gaming gets three classifiers, the rest the default two.
    await produce(broker, topics.input, batch("a"))
    for v in await verdicts_of(broker, topics, "a", 20):
        gaming = int(v["id"].split("-")[1]) % 2 == 0
        assert set(v["classifiers"]) == (
            {"hate", "violence", "spam"} if gaming else {"hate", "spam"}
        )
        assert v["community"] == ("gaming" if gaming else None)
        spam = v["classifiers"]["spam"]
        assert spam["mode"] == "shadow" and "spam" not in v["flagged_by"]
        enforced = [n for n, r in v["classifiers"].items() if r["mode"] == "enforce"]
        assert v["flagged"] == any(v["classifiers"][n]["flagged"] for n in enforced)
        if "buy now" in TEXTS[int(v["id"].split("-")[1]) % len(TEXTS)]:
            assert spam["flagged"] and not v["flagged"], "a shadow flag never decides"
        assert v["control_version"] == 0 and v["schema_version"] == 2
        if gaming:
            assert v["classifiers"]["violence"]["threshold"] == 0.6
            assert v["classifiers"]["violence"]["threshold_source"] == "setting"

    # A live change: hate's threshold for gaming, published once, reaches both workers.
    settings = Settings(broker_url=broker.url, topic_replication_factor=1)
    key, value = record_for_threshold("hate", 0.99, community="gaming", by="test")
    offset = await publish_control(settings, topics.control, key, value)
    seconds = await wait_for_version(workers, offset + 1, within_s=2.0)
    owned = [set(w.health()[1]["assigned_partitions"]) for w in workers]
    assert all(owned) and not owned[0] & owned[1]  # each worker decides some of batch b
    await produce(broker, topics.input, batch("b"))
    b = await verdicts_of(broker, topics, "b", 20)
    assert {v["source"]["partition"] for v in b} >= owned[0] | owned[1]
    for v in b:
        assert v["control_version"] == offset + 1
        hate = v["classifiers"]["hate"]
        if v["community"] == "gaming":
            assert (hate["threshold"], hate["threshold_source"]) == (0.99, "control")
            assert not hate["flagged"] or hate["p"] >= 0.99
        else:
            assert hate["threshold_source"] != "control"  # other communities unchanged
    print(f"control change visible in both workers after {seconds:.2f} s")

    # Malformed records change nothing and stop nothing.
    for bad_key, bad_value in (
        (b"threshold/hate", b'{"threshold": 7}'),
        (b"threshold/nobody", b'{"threshold": 0.5}'),
        (b"mode/hate", b"not json"),
        (b"\xff\xfe", b"{}"),
    ):
        await publish_control(settings, topics.control, bad_key, bad_value)
    await asyncio.sleep(1.0)
    await produce(broker, topics.input, batch("c"))
    for v in await verdicts_of(broker, topics, "c", 20):
        assert v["control_version"] == offset + 1
    for w in workers:
        assert w.health()[1]["status"] == "ready"
        assert 'moderation_control_records_total{result="rejected"} 4.0' in w.get("/metrics")

    # A worker started afterwards (here: replacing the fleet) starts with the latest state and
    # decides its very first batch under it.
    for w in workers:
        assert w.stop() == 0
    late = spawn_worker(env, scorer=SCORER)
    health = late.wait_ready(timeout=90)
    assert health["policy"]["version"] == offset + 1
    gaming = health["policy"]["classifiers"]["hate"]["community_thresholds"]["gaming"]
    assert gaming["value"] == 0.99 and gaming["source"] == "control"
    await produce(broker, topics.input, batch("d"))
    d = await verdicts_of(broker, topics, "d", 20)
    assert {v["control_version"] for v in d} == {offset + 1}
    assert late.stop() == 0

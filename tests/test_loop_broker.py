"""The agile loop end to end through the real broker, on the tiny Gemma: moderator labels in,
a candidate trained by the learner, scored in shadow by a real worker process, promoted when it
wins on the held-out labels, never when it loses, and rolled back with one record.

The labels are a made-up task the tiny random model cannot do zero-shot (a comment is
"hateful" when it holds one of five words), so a candidate trained on them wins clearly; noise
labels make a candidate that cannot beat production beyond the interval.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from adapters.control_topic import publish_control, read_control
from adapters.tansu import free_port
from moderation_worker.loop.labels import ModeratorLabel, label_record
from moderation_worker.loop_settings import LoopSettings
from moderation_worker.settings import ClassifierConfig, Settings
from moderation_worker.tools.learning.coordinator import rollback_record
from moderation_worker.tools.learning.learner import Learner
from moderation_worker.tools.worker_process import WorkerProcess
from tests.fixtures_broker import (
    REPO_ROOT,
    BrokerInfo,
    TopicSet,
    create_topics,
    produce,
    read_outputs,
    worker_env,
)

pytestmark = pytest.mark.broker

BAD = ["awful", "vermin", "scum", "hate", "trash"]
GOOD = ["lovely", "great", "kind", "nice", "friendly"]
FILL = ["you", "are", "the", "people", "here", "today", "really", "so"]


def labels(n: int, seed: int, prefix: str, noise: bool = False) -> list[ModeratorLabel]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y = int(rng.random() < 0.5)
        words = [*rng.choice(FILL, 4), rng.choice(BAD if y else GOOD)]
        rng.shuffle(words)
        label = int(rng.random() < 0.5) if noise else y
        out.append(ModeratorLabel(f"{prefix}-{i}", " ".join(words), label, "hate", moderator="t"))
    return out


def learner_settings(broker: BrokerInfo, topics: TopicSet, store: Path, **loop: Any) -> Settings:
    return Settings(
        broker_url=broker.url,
        topic_replication_factor=1,
        control_topic=topics.control,
        model="tiny",
        classifiers=[ClassifierConfig(name="hate", lora="none")],
        loop=LoopSettings(
            labels_topic=f"{topics.input}.labels",
            labels_dlq_topic=f"{topics.input}.labels.dlq",
            group_id=f"{topics.app_id}-learner",
            store_dir=store,
            min_new_labels=50,
            epochs=3,
            learning_rate=2e-2,
            min_holdout_labels=30,
            min_holdout_per_class=8,
            shadow_s=3600,
            **loop,
        ),
    )


async def send_labels(broker: BrokerInfo, settings: Settings, rows: list[ModeratorLabel]) -> None:
    await produce(broker, settings.loop.labels_topic, [label_record(r) for r in rows])


async def verdicts(broker: BrokerInfo, topics: TopicSet, tag: str, n: int = 6) -> list[dict]:
    texts = ["you are vermin", "so lovely today", "the people are scum", "really kind"]
    records = [
        (f"{tag}-{i}".encode(), orjson.dumps({"id": f"{tag}-{i}", "text": texts[i % len(texts)]}))
        for i in range(n)
    ]
    await produce(broker, topics.input, records)
    out = await read_outputs(
        broker,
        topics,
        until=lambda o: sum(v["id"].startswith(f"{tag}-") for v in o.verdicts) >= n,
        timeout=60,
    )
    found = [v for v in out.verdicts if v["id"].startswith(f"{tag}-")]
    assert len(found) == n
    return found


async def wait_version(worker: WorkerProcess, version: int) -> None:
    for _ in range(200):
        if worker.health()[1]["policy"]["version"] >= version:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"worker never reached control version {version}")


async def test_labels_to_shadow_to_promotion_and_rollback_and_a_loser_is_not_promoted(
    broker: BrokerInfo, topics: TopicSet, tmp_path: Path
) -> None:
    await create_topics(broker, [topics.input], partitions=2)
    settings = learner_settings(broker, topics, tmp_path / "store")
    env = os.environ | worker_env(
        broker,
        topics,
        partitions=2,
        model="tiny",
        classifiers='[{"name": "hate", "lora": "none"}]',
    )
    command = [sys.executable, "-m", "moderation_worker.cli", "worker"]
    env.pop("MODERATION_CONFIG_FILE", None)
    log = tmp_path / "worker.log"
    worker = WorkerProcess(env, log, free_port(), command=command, cwd=REPO_ROOT)
    worker.start()
    try:
        worker.wait_ready(timeout=120)  # a busy CI machine starts slowly
        learner = Learner(settings)
        await learner.start()
        try:
            clock = [1_000_000.0]
            learner.coordinator.clock = lambda: clock[0]
            # A bad label goes to the labels dead-letter topic, the good ones to the store.
            await produce(broker, settings.loop.labels_topic, [(b"x", b'{"id": "x"}')])
            await send_labels(broker, settings, labels(400, 1, "good"))
            results = await learner.run_once()
            assert learner.dead_letters == 1 and learner.labels_stored == 400
            (result,) = results
            assert result.decision.promote, result.decision.reason
            assert result.holdout.candidate > result.holdout.production
            sha = result.candidate.sha256

            # The candidate is scored in shadow by the worker, beside production.
            records = await read_control(settings, topics.control)
            await wait_version(worker, records[-1][0] + 1)
            for v in await verdicts(broker, topics, "shadow"):
                cand = v["classifiers"]["hate@candidate"]
                assert cand["mode"] == "shadow" and "hate@candidate" not in v["flagged_by"]
                assert cand["lora_sha256"] == sha
                assert v["classifiers"]["hate"]["lora_sha256"] is None

            # After the shadow time the learner promotes it: one adapter record.
            clock[0] += 3601
            assert await learner.run_due() == []
            records = await read_control(settings, topics.control)
            await wait_version(worker, records[-1][0] + 1)
            for v in await verdicts(broker, topics, "promoted"):
                hate = v["classifiers"]["hate"]
                assert hate["lora_sha256"] == sha and hate["mode"] == "enforce"
                assert hate["threshold_source"] == "control"
                assert "hate@candidate" not in v["classifiers"]
            history = learner.store.history("hate")
            promotion = [e for e in history if e["event"] == "promotion"][-1]
            assert promotion["by"] == "learner" and promotion["sha256"] == sha
            assert promotion["holdout"]["delta_low"] > 0

            # Noise labels: the new candidate cannot beat production; it is withdrawn.
            await send_labels(broker, settings, labels(400, 2, "noise", noise=True))
            (loser,) = await learner.run_once()
            assert not loser.decision.promote, loser.decision.reason
            clock[0] += 3601
            await learner.run_due()
            events = [e["event"] for e in learner.store.history("hate")]
            assert events[-1] == "withdrawn" and events.count("promotion") == 1
            records = await read_control(settings, topics.control)
            await wait_version(worker, records[-1][0] + 1)
            for v in await verdicts(broker, topics, "after-loss"):
                assert v["classifiers"]["hate"]["lora_sha256"] == sha
                assert "hate@candidate" not in v["classifiers"]

            # The store can be rebuilt from the topic: the same latest labels.
            before = learner.store.latest("hate")
            assert await learner.rebuild() == 800
            after = learner.store.latest("hate")
            # (arrival order differs across partitions; per key, one partition keeps it)
            assert {lb.key: lb for _, lb in after} == {lb.key: lb for _, lb in before}

            # A rollback is one record, and the worker is back on the configured zero-shot.
            key, value = rollback_record(learner.store.history("hate"), "hate", by="test")
            offset = await publish_control(settings, topics.control, key, value)
            await wait_version(worker, offset + 1)
            for v in await verdicts(broker, topics, "rolled-back"):
                assert v["classifiers"]["hate"]["lora_sha256"] is None
        finally:
            await learner.stop()
    finally:
        worker.stop()
    dead = await read_control(settings, settings.loop.labels_dlq_topic)
    (letter,) = [orjson.loads(v) for _, _, v in dead]
    assert letter["reason"] == "missing_text" and letter["source"]["offset"] == 0

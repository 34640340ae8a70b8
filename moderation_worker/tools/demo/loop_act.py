"""The demo's `--loop` act: one turn of the agile loop on the tiny Gemma, in under a minute.

Moderators label comments (here: 300 made-up ones, "hateful" when they hold one of five
words, which the tiny random model cannot tell zero-shot), the learner trains a candidate
from them, the candidate is published to the control topic in shadow, it is compared with
production on the labels training never saw, and promoted because it wins: every step is a
record on a real (embedded) Kafka broker, the same ones `moderation-worker learn` writes.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BAD = ["awful", "vermin", "scum", "hate", "trash"]
GOOD = ["lovely", "great", "kind", "nice", "friendly"]
FILL = ["you", "are", "the", "people", "here", "today", "really", "so"]


def made_up_labels(n: int, seed: int = 1) -> list[Any]:
    from moderation_worker.loop.labels import ModeratorLabel

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y = int(rng.random() < 0.5)
        words = [*rng.choice(FILL, 4), rng.choice(BAD if y else GOOD)]
        rng.shuffle(words)
        out.append(ModeratorLabel(f"demo-{i}", " ".join(words), y, "hate", moderator="demo"))
    return out


async def _act(broker_url: str, store: Path, say: Any) -> dict[str, Any]:
    from adapters.control_topic import read_control
    from adapters.kafka_admin import create_topics, kafka_producer
    from moderation_worker.loop.labels import label_record
    from moderation_worker.loop_settings import LoopSettings
    from moderation_worker.settings import ClassifierConfig, Settings
    from moderation_worker.tools.learning.learner import Learner

    settings = Settings(
        broker_url=broker_url,
        topic_replication_factor=1,
        model="tiny",
        classifiers=[ClassifierConfig(name="hate", lora="none")],
        loop=LoopSettings(
            store_dir=store,
            min_new_labels=100,
            epochs=3,
            learning_rate=2e-2,
            shadow_s=0,
            min_holdout_labels=30,
            min_holdout_per_class=8,
        ),
    )
    labels = made_up_labels(300)
    await create_topics(settings, [settings.loop.labels_topic], partitions=1)
    producer = kafka_producer(settings, acks="all")
    await producer.start()
    try:
        for key, value in map(label_record, labels):
            await producer.send(settings.loop.labels_topic, key=key, value=value)
        await producer.flush()
    finally:
        await producer.stop()
    say(f"1. {len(labels)} moderator labels published to {settings.loop.labels_topic!r}")
    learner = Learner(settings)
    await learner.start()
    try:
        (result,) = await learner.run_once()
    finally:
        await learner.stop()
    counts = result.counts
    say(
        f"2. the learner stored them and trained a candidate on {counts['train']['labels']} "
        f"(threshold {result.threshold:.2f} from {counts['validation']['labels']} validation "
        f"labels) in {result.training_seconds:.1f} s"
    )
    say(f"3. held out ({counts['holdout']['labels']} labels): {result.decision.reason}")
    records = await read_control(settings, settings.control_topic or "")
    say("4. control records, in order (every worker follows these):")
    for offset, key, value in records:
        shown = (value or b"null").decode()
        say(f"     {offset}  {key.decode() if key else None}  {shown[:110]}")
    return {"promoted": bool(result.decision.promote), "records": len(records)}


def run_loop_act(say: Any = print) -> dict[str, Any]:
    """The act on its own embedded broker; returns what happened (tests read it)."""
    from adapters.tansu import TansuBroker

    started = time.perf_counter()
    say("\nThe agile loop (tiny model): labels in, a candidate trained, judged, promoted")
    with tempfile.TemporaryDirectory() as store, TansuBroker() as broker:
        outcome = asyncio.run(_act(broker.url, Path(store), say))
    say(
        f"   one cycle in {time.perf_counter() - started:.0f} s. On your cluster: "
        "`moderation-worker learn` (README, 'The agile loop')"
    )
    return outcome

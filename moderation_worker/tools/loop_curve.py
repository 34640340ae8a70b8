"""The agile loop's own learning curve: replay a labelled dataset's training rows as moderator
labels in steps, let the learner (the real one, through an embedded Kafka broker) train, judge
and promote, and score whatever is in production after each step on the untouched test split.

    moderation-worker loop-curve --data ethos:../shared/data/ethos/Ethos_Dataset_Binary.csv

Writes `curve.json`, `curve.png` and `curve.md` to `--out`. Every step is one `learn --once`
pass: the labels so far, a candidate from production's adapter (the first from the zero-shot
base), its threshold from the loop's validation labels, the held-out comparison, the promotion
(shadow time 0 here: nobody is watching live traffic during a replay).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def _production_scores(learner: Any, texts: list[str]) -> tuple[np.ndarray, float, str | None]:
    from moderation_worker.model.classifier import AgileClassifier

    production = learner.coordinator.production("hate")
    clf = AgileClassifier(
        learner.coordinator.base,
        prompt=None if production.adapter else production.prompt,
        adapter=production.adapter,
    )
    sha = production.adapter.sha256 if production.adapter else None
    return np.asarray(clf.p_positive(texts, progress=True)), production.threshold, sha


async def _replay(args: argparse.Namespace, broker_url: str) -> list[dict[str, Any]]:
    from adapters.kafka_admin import create_topics, kafka_producer
    from moderation_worker.loop.labels import ModeratorLabel, label_record
    from moderation_worker.loop_settings import LoopSettings
    from moderation_worker.settings import ClassifierConfig, Settings
    from moderation_worker.tools.data import load_splits
    from moderation_worker.tools.evaluation import bootstrap_ci
    from moderation_worker.tools.learning.learner import Learner

    splits = load_splits(args.data, validation_rows=args.validation_rows)
    train = list(zip(splits.train.texts, splits.train.labels, strict=True))
    test_texts, test_y = list(splits.test.texts), np.asarray(splits.test.labels)
    settings = Settings(
        broker_url=broker_url,
        topic_replication_factor=1,
        model=args.model,
        classifiers=[ClassifierConfig(name="hate", lora="none")],
        loop=LoopSettings(
            store_dir=Path(args.out) / "store",
            min_new_labels=1,
            shadow_s=0,
            epochs=args.epochs,
            min_holdout_labels=args.min_holdout,
            min_holdout_per_class=args.min_holdout_per_class,
            time_budget_s=args.time_budget,
        ),
    )
    await create_topics(settings, [settings.loop.labels_topic], partitions=1)
    learner = Learner(settings)
    await learner.start()
    producer = kafka_producer(settings, acks="all")
    await producer.start()
    points, sent = [], 0
    try:
        p, t, sha = _production_scores(learner, test_texts)
        ci = bootstrap_ci(test_y, p, t)
        points.append({"labels": 0, "production": sha, "threshold": t, "test": ci, "cycle": None})
        for step in args.steps:
            rows = [
                ModeratorLabel(f"train-{i}", text, int(y), "hate", moderator="replay")
                for i, (text, y) in enumerate(train[sent:step], start=sent)
            ]
            for key, value in map(label_record, rows):
                await producer.send_and_wait(settings.loop.labels_topic, key=key, value=value)
            sent = step
            started = time.perf_counter()
            (result,) = await learner.run_once(timeout_s=300) or [None]
            cycle_s = time.perf_counter() - started
            if result is not None and result.decision and result.decision.promote:
                for _ in range(100):  # the learner's control reader applies the promotion
                    if learner.coordinator.production("hate").adapter is not None and (
                        learner.coordinator.production("hate").adapter.sha256
                        == result.candidate.sha256
                    ):
                        break
                    await asyncio.sleep(0.1)
            p, t, sha = _production_scores(learner, test_texts)
            point = {
                "labels": step,
                "cycle_s": round(cycle_s, 1),
                "cycle": result.to_dict() if result is not None else None,
                "promoted": bool(result and result.decision and result.decision.promote),
                "production": sha,
                "threshold": t,
                "test": bootstrap_ci(test_y, p, t),
            }
            points.append(point)
            print(json.dumps({k: point[k] for k in ("labels", "cycle_s", "promoted")}), flush=True)
            Path(args.out, "curve.json").write_text(json.dumps(points, indent=1))
    finally:
        await producer.stop()
        await learner.stop()
    return points


def render(points: list[dict[str, Any]], command: str) -> str:
    lines = [
        "| labels replayed | train / val / held-out labels | cycle wall time | promoted "
        "| held-out ROC-AUC candidate vs production [Δ 95% CI] | test F1 [95% CI] "
        "| test ROC-AUC [95% CI] |",
        "|---:|---|---:|---|---|---|---|",
    ]
    for pt in points:
        f1, auc = pt["test"]["f1"], pt["test"]["roc_auc"]
        cycle = pt.get("cycle") or {}
        counts = cycle.get("counts", {})
        split = " / ".join(str(counts.get(k, {}).get("labels", "–")) for k in counts) or "–"
        h = cycle.get("holdout")
        held = (
            f"{h['candidate']:.3f} vs {h['production']:.3f} "
            f"[{h['delta_low']:+.3f}, {h['delta_high']:+.3f}]"
            if h
            else "–"
        )
        promoted = "yes" if pt.get("promoted") else ("–" if not cycle else "no")
        lines.append(
            f"| {pt['labels']} | {split} | {pt.get('cycle_s', '–')} s | {promoted} | {held} "
            f"| {f1['estimate']:.3f} [{f1['low']:.2f}, {f1['high']:.2f}] "
            f"| {auc['estimate']:.3f} [{auc['low']:.2f}, {auc['high']:.2f}] |"
        )
    return "\n".join(lines) + f"\n\nMade by `{command}`.\n"


def cmd_loop_curve(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from adapters.tansu import TansuBroker
    from moderation_worker.tools.plots import plot_learning_curve

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with TansuBroker() as broker:
        points = asyncio.run(_replay(args, broker.url))
    command = "moderation-worker " + shlex.join(sys.argv[1:])
    (out / "curve.md").write_text(render(points, command))
    plot_learning_curve(
        [
            (
                max(pt["labels"], 1),
                pt["test"]["f1"]["estimate"],
                pt["test"]["roc_auc"]["estimate"],
                (pt["test"]["f1"]["low"], pt["test"]["f1"]["high"]),
                (pt["test"]["roc_auc"]["low"], pt["test"]["roc_auc"]["high"]),
            )
            for pt in points
            if pt["labels"]
        ],
        out / "curve.png",
        title="The agile loop on Gemma 3 270M: production after each replayed step (test split)",
    )
    print((out / "curve.md").read_text())
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loop-curve", help="replay labels through the learner: a learning curve")
    p.add_argument("--data", required=True, help="as `train --data`, e.g. ethos:PATH")
    p.add_argument("--validation-rows", type=int, default=100)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument(
        "--steps", type=lambda s: [int(x) for x in s.split(",")], default="100,200,400,700"
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--min-holdout", type=int, default=20)
    p.add_argument("--min-holdout-per-class", type=int, default=5)
    p.add_argument("--time-budget", type=float, default=1800.0, help="per cycle's training, s")
    p.add_argument("--out", default="reports/loop-curve")
    p.set_defaults(func=cmd_loop_curve)

"""Commands of the agile loop: `learn` (the learner process), `labels send` (publish labelled
rows as moderator labels, e.g. to replay a dataset), and `control promote | rollback |
history` (a person's decisions, each one control record, recorded in the learner's history).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from moderation_worker.tools.commands import _print_json, _settings


def cmd_learn(args: argparse.Namespace) -> int:
    """Run the learner: until stopped, or one pass with `--once`."""
    import logging.config

    from adapters.jsonlog import logging_config
    from moderation_worker.tools.learning.learner import Learner

    settings = _settings(args)
    logging.config.dictConfig(logging_config(settings.log_level))
    learner = Learner(settings)

    async def main() -> list[Any]:
        await learner.start()
        try:
            if args.rebuild:
                _stderr(f"rebuilt the label store: {await learner.rebuild()} labels")
            if args.once:
                return await learner.run_once(force=args.force, timeout_s=args.timeout)
            await learner.run()
            return []
        finally:
            await learner.stop()

    try:
        results = asyncio.run(main())
    except KeyboardInterrupt:
        return 130
    if args.once:
        _print_json(
            {
                "labels_stored": learner.labels_stored,
                "dead_letters": learner.dead_letters,
                "cycles": [r.to_dict() for r in results],
            }
        )
    return 0


def cmd_labels_send(args: argparse.Namespace) -> int:
    """Publish rows of a labelled dataset to the labels topic as moderator decisions."""
    from adapters.kafka_admin import create_topics, kafka_producer
    from moderation_worker.loop.labels import ModeratorLabel, label_record
    from moderation_worker.tools.data import load_splits

    settings = _settings(args)
    splits = load_splits(args.data, validation_rows=args.validation_rows)
    parts = ("train", "validation", "test") if args.split == "all" else (args.split,)
    rows = [
        (f"{args.id_prefix}{part}-{i}", text, int(label))
        for part in parts
        for i, (text, label) in enumerate(
            zip(getattr(splits, part).texts, getattr(splits, part).labels, strict=True)
        )
    ]
    start, _, end = args.rows.partition(":")
    rows = rows[int(start or 0) : int(end) if end else None]
    labels = [
        ModeratorLabel(id=i, text=t, label=y, classifier=args.classifier, moderator=args.moderator)
        for i, t, y in rows
    ]

    async def send() -> None:
        await create_topics(settings, [settings.loop.labels_topic])
        producer = kafka_producer(settings, acks="all")
        await producer.start()
        try:
            futures = [
                await producer.send(settings.loop.labels_topic, key=k, value=v)
                for k, v in map(label_record, labels)
            ]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(send())
    positives = sum(lb.label for lb in labels)
    _print_json({"topic": settings.loop.labels_topic, "sent": len(labels), "positive": positives})
    return 0


def _control_state(settings: Any) -> Any:
    from adapters.control_topic import read_control
    from moderation_worker.policy import ControlState, policy_from_settings

    state = ControlState(policy_from_settings(settings))
    for offset, key, value in asyncio.run(read_control(settings, settings.control_topic)):
        try:
            state.apply(key, value, offset)
        except ValueError:
            pass  # `control show` lists rejected records; here only the state counts
    return state.snapshot()


def cmd_control_promote(args: argparse.Namespace) -> int:
    """A person promotes the candidate waiting in shadow (whatever the comparison said)."""
    from moderation_worker.loop.store import LabelStore
    from moderation_worker.tools.control import _by, _run
    from moderation_worker.tools.learning.coordinator import promote

    settings = _settings(args)
    store = LabelStore(settings.loop.store_dir)
    previous = _control_state(settings).control_adapters.get(args.classifier)
    by = _by(args) or "unknown"
    records = promote(store, args.classifier, by, previous, args.reason, log=_stderr)
    for record in records:
        if _run(args, record):
            return 1
    return 0


def cmd_control_rollback(args: argparse.Namespace) -> int:
    """Put back what the last promotion replaced: one control record."""
    from moderation_worker.loop.store import LabelStore
    from moderation_worker.tools.control import _by, _run
    from moderation_worker.tools.learning.coordinator import rollback_record

    settings = _settings(args)
    store = LabelStore(settings.loop.store_dir)
    by = _by(args) or "unknown"
    record = rollback_record(store.history(args.classifier), args.classifier, by)
    code = _run(args, record)
    if code == 0:
        value = record[1].decode() if record[1] else None
        event = {"event": "rollback", "by": by, "reason": args.reason, "record": value}
        store.record_event(args.classifier, event)
    return code


def cmd_control_history(args: argparse.Namespace) -> int:
    """The learner's history of a classifier: cycles, promotions, withdrawals, rollbacks."""
    from moderation_worker.loop.store import LabelStore

    settings = _settings(args)
    store = LabelStore(settings.loop.store_dir)
    _print_json({"classifier": args.classifier, "history": store.history(args.classifier)})
    return 0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def add_loop_parsers(sub: argparse._SubParsersAction, control: argparse._SubParsersAction) -> None:
    """`learn`, `labels send`, and the loop's `control` subcommands."""
    p = sub.add_parser("learn", help="the learner: moderator labels in, better adapters out")
    p.add_argument("--config", default=None, help="TOML settings file")
    p.add_argument("--once", action="store_true", help="read the labels, run due cycles, exit")
    p.add_argument("--force", action="store_true", help="with --once: train even if not due")
    p.add_argument("--timeout", type=float, default=120.0, help="--once: reading the labels")
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="first rebuild the label store from the labels topic (old labels moved aside)",
    )
    p.set_defaults(func=cmd_learn)

    group = sub.add_parser("labels", help="publish moderator labels")
    labels = group.add_subparsers(dest="labels_command", required=True)
    p = labels.add_parser("send", help="rows of a labelled dataset as moderator labels")
    p.add_argument("--config", default=None, help="TOML settings file")
    p.add_argument("--data", required=True, help="as `train --data`: ethos:PATH, a CSV/JSONL")
    p.add_argument("--validation-rows", type=int, default=100)
    p.add_argument("--split", default="train", choices=["train", "validation", "test", "all"])
    p.add_argument("--rows", default=":", help="a slice START:END of those rows, e.g. 0:100")
    p.add_argument("--classifier", default="hate")
    p.add_argument("--moderator", default="replay")
    p.add_argument("--id-prefix", default="", help="prefix of the generated comment ids")
    p.set_defaults(func=cmd_labels_send)

    for name, func, help in (
        ("promote", cmd_control_promote, "promote the candidate waiting in shadow"),
        ("rollback", cmd_control_rollback, "undo the last promotion (one record)"),
        ("history", cmd_control_history, "the learner's cycles and promotions"),
    ):
        p = control.add_parser(name, help=help)
        p.add_argument("classifier")
        p.add_argument("--config", default=None, help="TOML settings file")
        p.add_argument("--by", default=None, help="who (default: the login name)")
        p.add_argument("--reason", default=None, help="why, for the audit trail")
        p.set_defaults(func=func)

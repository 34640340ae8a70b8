"""The `train` command for the small-encoder rival (`--model encoder:minilm`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from moderation_worker.tools.commands import _print_json


def train_encoder_command(args: argparse.Namespace, splits: Any) -> int:
    """`train --model encoder:minilm` (or `encoder:tiny`): the small-encoder rival, fully
    fine-tuned on the same splits, its threshold calibrated on the same validation rows."""
    from moderation_worker.model.encoder import build_tiny_encoder, load_minilm_base, train_encoder

    which = args.model.removeprefix("encoder:")
    base = (
        build_tiny_encoder()
        if which == "tiny"
        else load_minilm_base(which if which != "minilm" else None)
    )
    train = (
        splits.train if args.train_rows is None else splits.train.take(slice(0, args.train_rows))
    )
    clf = train_encoder(
        base, train.texts, train.labels, splits.validation.texts, splits.validation.labels,
        epochs=args.epochs, learning_rate=args.learning_rate or 5e-5, seed=args.seed,
        balance_classes=args.balance, policy=args.policy, verbose=2,
        notes={"data": str(args.data), "train_rows": len(train), "data_sha256": train.sha256},
    )  # fmt: skip
    if args.out is not None:
        clf.save(args.out)
    print(
        f"wrote {clf.path} ({clf.metadata.training.get('seconds')} s of training)", file=sys.stderr
    )
    _print_json({"encoder": str(clf.path), "threshold": clf.threshold,
                 "validation": clf.metadata.metrics.get("validation")})  # fmt: skip
    return 0

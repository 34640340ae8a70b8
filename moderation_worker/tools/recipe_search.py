"""A small search over the LoRA recipe (rank, learning rate, epochs, target layers, label words),
judged on the validation rows only, within a CPU budget; resumable.

    moderation-worker recipe-search --data ethos:PATH --budget-min 60 --out runs/recipe-search

Each configuration trains on the training rows and is scored on the validation rows (ROC-AUC,
threshold-free, chooses; F1 at the max-F1 threshold is reported). Results append to
`search.jsonl` as they finish, and a restarted search skips the configurations already there.
No configuration starts once the budget is spent. The test rows are not touched here: the
best configuration is compared with the shipped adapter on test afterwards (`quality`), and
new weights ship only if they win on validation and hold on test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

#: name -> changes to the shipped recipe (rank 4, lr 5e-4, 4 epochs, q/v, Safe/Toxic).
GRID: dict[str, dict[str, Any]] = {
    "lr-1e-3": {"learning_rate": 1e-3},
    "rank-8": {"rank": 8},
    "labels-no-yes": {"labels": ("No", "Yes")},
    "qkvo": {"target_layers": ("query", "key", "value", "attention_output")},
    "balanced-3ep": {"balance_classes": True, "epochs": 3},
    "lr-2.5e-4-6ep": {"learning_rate": 2.5e-4, "epochs": 6},
}


def run_one(name: str, changes: dict[str, Any], args: argparse.Namespace, splits: Any) -> dict:
    from sklearn.metrics import roc_auc_score

    from moderation_worker.model.prompts import PromptSettings
    from moderation_worker.model.sources import load_model_source
    from moderation_worker.model.training import TrainingConfig, train_classifier

    labels = tuple(changes.get("labels", ("Safe", "Toxic")))
    prompt = PromptSettings(labels=labels, positive_label=labels[1])
    keys = ("rank", "learning_rate", "epochs", "target_layers", "balance_classes")
    config = TrainingConfig(**{k: v for k, v in changes.items() if k in keys})
    base = load_model_source(args.model)  # a fresh base: rank and targets may differ
    started = time.perf_counter()
    trained = train_classifier(
        base,
        list(splits.train.texts),
        splits.train.labels,
        list(splits.validation.texts),
        splits.validation.labels,
        prompt=prompt,
        config=config,
        out=Path(args.out) / name,
        notes={"search": name, "data": args.data},
        verbose=2,
    )
    validation = trained.metadata.metrics.get("validation") or {}
    from moderation_worker.model.classifier import AgileClassifier

    p_val = AgileClassifier(base, adapter=trained.adapter).p_positive(splits.validation.texts)
    return {
        "name": name,
        "changes": {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()},
        "val_roc_auc": float(roc_auc_score(splits.validation.labels, np.asarray(p_val))),
        "val_f1": validation.get("f1"),
        "threshold": trained.metadata.threshold,
        "seconds": round(time.perf_counter() - started, 1),
        "weights": str(trained.adapter.path),
    }


def cmd_recipe_search(args: argparse.Namespace) -> int:
    from moderation_worker.tools.data import load_splits

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "search.jsonl"
    done = (
        {json.loads(line)["name"] for line in log.read_text().splitlines()}
        if log.exists()
        else set()
    )
    splits = load_splits(args.data, validation_rows=args.validation_rows)
    deadline = time.monotonic() + args.budget_min * 60
    todo = [n for n in (args.only or GRID) if n not in done]
    print(f"[search] {len(done)} done, {len(todo)} to go, budget {args.budget_min} min", flush=True)
    for i, name in enumerate(todo, 1):
        if time.monotonic() > deadline:
            print(f"[search] budget spent: {len(todo) - i + 1} configurations not run", flush=True)
            break
        print(f"[search] {i}/{len(todo)} {name}: {GRID[name]}", flush=True)
        result = run_one(name, GRID[name], args, splits)
        with log.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"[search] {name}: validation ROC-AUC {result['val_roc_auc']:.4f}, "
              f"F1 {result['val_f1']}, {result['seconds']:.0f} s", flush=True)  # fmt: skip
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for r in sorted(rows, key=lambda r: -r["val_roc_auc"]):
        print(
            f"{r['name']:>16}  val ROC-AUC {r['val_roc_auc']:.4f}  F1 {r['val_f1']}",
            file=sys.stderr,
        )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipe-search", help="search the LoRA recipe on validation, resumable")
    p.add_argument("--data", required=True)
    p.add_argument("--validation-rows", type=int, default=100)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--budget-min", type=float, default=60.0, help="no new run after this")
    p.add_argument("--only", nargs="*", choices=list(GRID), help="a subset of the grid")
    p.add_argument("--out", default="runs/recipe-search")
    p.set_defaults(func=cmd_recipe_search)

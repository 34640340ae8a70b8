"""Per-label metrics on the ETHOS multi-label categories, as the "fine-tune smaller transformer
models" article reports them: precision, recall, F1 and support per label on the test split,
each model's threshold chosen on the validation rows (max-F1), never on test.

    moderation-worker per-label --multi ../shared/data/ethos/Ethos_Dataset_Multi_Label.csv \\
        --entry 'encoder={category}=encoder:runs/encoder/ethos-{category}' \\
        --entry 'gemma-lora=violence=gemma3-270m@shipped:violence' ...

An entry is `FAMILY=CATEGORY=MODEL[@LORA]`; `{category}` in it stands for every category.
Scores are cached per (family, category) like `quality`'s.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from moderation_worker.thresholds import choose_threshold


def metrics_at(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    pred = p >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": int(np.sum(y == 1)),
            "threshold": float(threshold)}  # fmt: skip


def expand(entries: list[str], categories: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(family, category, NAME=MODEL spec) per entry and category."""
    out = []
    for text in entries:
        family, category, spec = text.split("=", 2)
        cats = categories if category == "{category}" else (category,)
        for cat in cats:
            out.append((family, cat, spec.replace("{category}", cat)))
    return out


def cmd_per_label(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from moderation_worker.tools.data import ETHOS_CATEGORIES, load_splits
    from moderation_worker.tools.quality import Entry, load_or_score

    out = Path(args.out)
    results: dict[str, dict[str, Any]] = {}
    for family, category, spec in expand(args.entry, ETHOS_CATEGORIES):
        splits = load_splits(f"ethos-multi:{category}:{args.multi}", args.validation_rows)
        entry = Entry.parse(f"{family}-{category}={spec}")
        scores = load_or_score(entry, splits, out / "scores")
        y_val, y_test = splits.validation.labels, splits.test.labels
        if len(set(y_val.tolist())) < 2:
            print(f"[per-label] {category}: one class in validation; skipped", file=sys.stderr)
            continue
        choice = choose_threshold(y_val, scores.p_validation, "max-f1")
        row = metrics_at(np.asarray(y_test), np.asarray(scores.p_test), choice.threshold)
        results.setdefault(category, {})[family] = row
    families = list(dict.fromkeys(f for f, _, _ in expand(args.entry, ETHOS_CATEGORIES)))
    head = "| label | support (test) | " + " | ".join(
        f"{f} precision | {f} recall | {f} F1" for f in families
    )
    lines = [head + " |", "|---|---:|" + "---:|" * 3 * len(families)]
    for category, by_family in results.items():
        support = next(iter(by_family.values()))["support"]
        cells = []
        for f in families:
            r = by_family.get(f)
            cells += [f"{r[k]:.2f}" for k in ("precision", "recall", "f1")] if r else ["–"] * 3
        lines.append(f"| {category} | {support} | " + " | ".join(cells) + " |")
    command = "moderation-worker " + shlex.join(sys.argv[1:])
    text = "\n".join(lines) + f"\n\nMade by `{command}`.\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "PER_LABEL.md").write_text(text)
    (out / "per_label.json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("per-label", help="precision/recall/F1/support per ETHOS category")
    p.add_argument("--multi", required=True, help="Ethos_Dataset_Multi_Label.csv")
    p.add_argument("--validation-rows", type=int, default=150)
    p.add_argument("--entry", action="append", required=True, help="FAMILY=CATEGORY=MODEL[@LORA]")
    p.add_argument("--out", default="reports/per-label")
    p.set_defaults(func=cmd_per_label)

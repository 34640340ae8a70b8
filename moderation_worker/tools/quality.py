"""The quality report: several models on one split, one table, bootstrap intervals and plots.

`moderation-worker quality` scores every entry (TF-IDF baseline, zero-shot Gemma, LoRA
weights, ...) on the validation and test splits, calibrates each threshold on *validation*
only, and writes `REPORT.md`, `quality.json` and PNG figures. Scores are cached per entry so
re-rendering the report does not re-run a model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moderation_worker.thresholds import choose_threshold
from moderation_worker.tools.data import Splits
from moderation_worker.tools.evaluation import bootstrap_ci, evaluate, write_report
from moderation_worker.tools.plots import plot_confusion, plot_learning_curve, plot_roc

POLICIES = ("max-f1", "youden", "fpr<=0.1")


@dataclass(frozen=True)
class Entry:
    """One model in the report: `NAME=MODEL[@LORA]`, e.g. `lora-800=gemma3-270m@path.lora.h5`."""

    name: str
    model: str
    lora: str | None = None

    @classmethod
    def parse(cls, text: str) -> Entry:
        if "=" not in text:
            raise ValueError(f"entry {text!r} must look like NAME=MODEL[@LORA]")
        name, spec = text.split("=", 1)
        model, _, lora = spec.partition("@")
        return cls(name.strip(), model.strip(), lora.strip() or None)


@dataclass
class EntryScores:
    name: str
    identity: dict[str, Any]
    train_rows: int | None
    p_validation: np.ndarray
    p_test: np.ndarray


Scorer = Callable[[Entry, Splits], tuple[dict[str, Any], int | None, np.ndarray, np.ndarray]]


def score_entry(entry: Entry, splits: Splits, batch_size: int = 8):
    """Scores of one entry on validation and test; the TF-IDF baseline fits on train here."""
    if entry.model == "baseline:tfidf":
        from moderation_worker.tools.baseline import TfidfBaseline

        model = TfidfBaseline().fit(list(splits.train.texts), splits.train.labels)
        p_val = model.predict_proba(list(splits.validation.texts))[:, 1]
        p_test = model.predict_proba(list(splits.test.texts))[:, 1]
        return {"base_model": "tfidf-logreg", "lora_sha256": None}, len(splits.train), p_val, p_test
    from moderation_worker.model.sources import build_classifier

    clf = build_classifier(entry.model, entry.lora or "none", batch_size=batch_size)
    meta = getattr(clf, "lora", None) or getattr(clf, "metadata", None)  # LoRA or encoder
    train_rows = meta.training.get("train_rows", 0) if meta is not None else 0
    print(f"[quality] scoring {entry.name} ({clf.identity.base_model})", file=sys.stderr)
    p_val = clf.p_positive(splits.validation.texts, progress=True)
    p_test = clf.p_positive(splits.test.texts, progress=True)
    return clf.identity.to_dict(), train_rows, p_val, p_test


def load_or_score(entry: Entry, splits: Splits, cache: Path, scorer: Scorer = score_entry):
    """Cached scores keyed by entry name and test labels; delete the file to re-score."""
    path = cache / f"{entry.name}.npz"
    if path.is_file():
        data = np.load(path, allow_pickle=False)
        if np.array_equal(data["y_test"], splits.test.labels):
            import orjson

            identity = orjson.loads(bytes(data["identity"]))
            rows = int(data["train_rows"])
            return EntryScores(
                entry.name, identity, rows if rows >= 0 else None, data["p_val"], data["p_test"]
            )
    identity, rows, p_val, p_test = scorer(entry, splits)
    import orjson

    cache.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        p_val=p_val,
        p_test=p_test,
        y_test=splits.test.labels,
        identity=np.frombuffer(orjson.dumps(identity), dtype=np.uint8),
        train_rows=-1 if rows is None else rows,
    )
    return EntryScores(entry.name, identity, rows, np.asarray(p_val), np.asarray(p_test))


def build_report(
    scores: Sequence[EntryScores], splits: Splits, out: Path, bootstrap: int = 1000
) -> dict[str, Any]:
    """Metrics per entry (max-F1 threshold from validation), policy table, CIs and figures."""
    y_val, y_test = splits.validation.labels, splits.test.labels
    rows, curves, learning = [], {}, []
    for s in scores:
        choices = {pol: choose_threshold(y_val, s.p_validation, pol) for pol in POLICIES}
        main = choices["max-f1"]
        report = evaluate(y_test, s.p_test, main.threshold, labels=("safe", "hateful"))
        ci = bootstrap_ci(y_test, s.p_test, main.threshold, n_resamples=bootstrap)
        policies = {}
        for pol, choice in choices.items():
            test_point = evaluate(y_test, s.p_test, choice.threshold)
            policies[pol] = {
                "threshold": choice.threshold,
                "validation_fpr": choice.fpr,
                "test_f1": test_point["f1"],
                "test_precision": test_point["precision"],
                "test_recall": test_point["recall"],
                "test_fpr": _fpr(y_test, s.p_test, choice.threshold),
                "note": choice.note,
            }
        report.pop("roc_curve", None)
        # the codelab's decision: argmax over the two labels, i.e. p >= 0.5
        report["f1_at_0.5"] = evaluate(y_test, s.p_test, 0.5)["f1"]
        rows.append(
            {
                "name": s.name,
                "model": s.identity,
                "train_rows": s.train_rows,
                "threshold_policy": "max-f1 (validation)",
                "test": report,
                "bootstrap": ci,
                "policies": policies,
            }
        )
        curves[s.name] = (y_test, s.p_test, main.threshold)
        plot_confusion(
            y_test,
            (s.p_test >= main.threshold).astype(int),
            ("safe", "hateful"),
            out / f"confusion-{s.name}.png",
            title=f"{s.name}: ETHOS test, threshold {main.threshold:.3f}",
        )
        if s.identity.get("base_model", "").startswith("gemma3") and s.train_rows is not None:
            learning.append(
                (
                    s.train_rows,
                    report["f1"],
                    report["roc_auc"],
                    (ci["f1"]["low"], ci["f1"]["high"]),
                    (ci["roc_auc"]["low"], ci["roc_auc"]["high"]),
                )
            )
    plot_roc(curves, out / "roc-all.png")
    if len(learning) >= 2:
        plot_learning_curve(
            sorted(learning),
            out / "learning-curve.png",
            title="Gemma 3 270M + LoRA: training examples vs test F1 / ROC-AUC",
        )
    result = {
        "validation_rows": len(y_val),
        "test_rows": len(y_test),
        "test_positive_rate": float(y_test.mean()),
        "entries": rows,
    }
    write_report(out / "quality.json", result)
    return result


def _fpr(y: np.ndarray, p: np.ndarray, threshold: float) -> float:
    negatives = y == 0
    return float(((p >= threshold) & negatives).sum() / max(1, negatives.sum()))


def render_markdown(result: dict[str, Any], command: str) -> str:
    """The REPORT.md table: one row per model, then the threshold-policy table."""
    lines = [
        "| model | train rows | threshold (max-F1 on val) | F1 [95% CI] | ROC-AUC [95% CI] "
        "| precision | recall | acc. safe | acc. hateful | F1 at 0.5 (argmax) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["entries"]:
        t, ci = row["test"], row["bootstrap"]
        acc = t["per_label_accuracy"]
        lines.append(
            f"| {row['name']} | {row['train_rows'] if row['train_rows'] is not None else '-'} "
            f"| {t['threshold']:.3f} "
            f"| {t['f1']:.3f} [{ci['f1']['low']:.2f}, {ci['f1']['high']:.2f}] "
            f"| {t['roc_auc']:.3f} [{ci['roc_auc']['low']:.2f}, {ci['roc_auc']['high']:.2f}] "
            f"| {t['precision']:.3f} | {t['recall']:.3f} "
            f"| {acc.get('safe', float('nan')):.3f} | {acc.get('hateful', float('nan')):.3f} "
            f"| {t['f1_at_0.5']:.3f} |"
        )
    lines += [
        "",
        "Threshold policies, each chosen on the validation split, applied to test:",
        "",
        "| model | policy | threshold | val FPR | test F1 | test precision | test recall "
        "| test FPR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["entries"]:
        for pol, v in row["policies"].items():
            lines.append(
                f"| {row['name']} | `{pol}` | {v['threshold']:.3f} | {v['validation_fpr']:.3f} "
                f"| {v['test_f1']:.3f} | {v['test_precision']:.3f} | {v['test_recall']:.3f} "
                f"| {v['test_fpr']:.3f} |"
            )
    lines += [
        "",
        f"Made by: `{command}`",
        f"Validation rows: {result['validation_rows']}; test rows: {result['test_rows']} "
        f"(positive rate {result['test_positive_rate']:.3f}).",
    ]
    return "\n".join(lines) + "\n"

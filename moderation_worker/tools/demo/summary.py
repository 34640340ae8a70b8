"""The demo's summary: every figure from what was produced, read back and scraped from the
worker, the table printed last, and the files it leaves (`verdicts.jsonl`, `summary.json`)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from moderation_worker.settings import DEFAULT_LORA
from moderation_worker.tools.demo.config import FAUST_FETCH_MAX_WAIT_S, DemoConfig
from moderation_worker.tools.demo.inputs import DemoInput
from moderation_worker.tools.demo.stream import StreamResult


@dataclass
class DemoReport:
    """The demo's figures; `render_table` prints them, `summary.json` stores them."""

    input: str
    broker: str
    model: str
    base_model: str | None
    lora_sha256: str | None
    threshold: float | None
    events: int
    verdicts: int
    dead_letters: dict[str, int]
    expected_dead_letters: dict[str, int]
    duplicates: int
    missing: int
    missing_ids: list[str]
    timed_out: bool
    events_per_s: float | None
    window_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    batch_fill_ratio: float | None
    batch_fill_source: str
    model_batches: int | None
    hateful: int
    hateful_rate: float | None
    labelled: int
    f1: float | None
    roc_auc: float | None
    verdicts_file: str
    worker_log: str
    notes: list[str] = field(default_factory=list)

    @property
    def accounted(self) -> int:
        return self.verdicts + sum(self.dead_letters.values())

    @property
    def complete(self) -> bool:
        return self.missing == 0 and self.accounted == self.events

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accounted": self.accounted, "complete": self.complete}


def model_description(
    health_model: dict[str, Any] | None, model: str, lora: str | None
) -> tuple[str, str | None, str | None]:
    """(text, base model, LoRA sha) for the summary, saying plainly when it is zero-shot.

    The worker's `/health` reports what it actually loaded. With `--lora default` and no
    sha, `shipped_lora(model)` found nothing (the worker also printed a ZERO-SHOT notice).
    """
    base = (health_model or {}).get("base_model") or model
    sha = (health_model or {}).get("lora_sha256")
    if sha:
        source = "shipped" if lora == DEFAULT_LORA else str(lora)
        return f"{base} + LoRA sha256 {sha[:12]} ({source})", base, sha
    if lora is None or str(lora).lower() in ("none", ""):
        return f"{base}, zero-shot (--lora none)", base, None
    if lora == DEFAULT_LORA:
        return f"{base}, zero-shot (no shipped LoRA weights)", base, None
    return f"{base}, zero-shot", base, None


def batch_fill_from_metrics(text: str | None) -> tuple[float | None, int | None]:
    """Mean batch fill ratio and number of model batches from the worker's `/metrics` page.

    `moderation_batch_fill_ratio` is observed once per batch that called the model (real rows
    over the fixed batch size), so sum/count is the mean fill over those batches.
    """
    if not text:
        return None, None
    from prometheus_client.parser import text_string_to_metric_families

    total = count = None
    for family in text_string_to_metric_families(text):
        if family.name != "moderation_batch_fill_ratio":
            continue
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
    if not count:
        return None, 0
    return float(total or 0.0) / float(count), int(count)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def build_report(
    demo_input: DemoInput,
    result: StreamResult,
    *,
    health: dict[str, Any] | None,
    metrics_text: str | None,
    config: DemoConfig,
    broker: str,
    embedded: bool,
    worker_log: Path,
) -> DemoReport:
    """Every figure of the summary from what was produced, read back and scraped."""
    events = demo_input.events
    n = len(events)
    outcomes = [(i, result.outcome(i)) for i in range(n)]
    found = [(i, o) for i, o in outcomes if o is not None]
    verdicts = [(i, o) for i, o in found if o.kind == "verdict"]
    dead = Counter(o.value.get("reason", "unknown") for _, o in found if o.kind == "dead_letter")
    expected = Counter(e.expected_reason for e in events if e.expected_reason is not None)
    missing = [i for i, o in outcomes if o is None]
    missing_ids = [events[i].id or events[i].key.decode("utf-8", "replace") for i in missing]

    latencies = [o.received_at - result.sent_at[i] for i, o in found if i in result.sent_at]
    window = None
    if found and result.sent_at:
        window = max(o.received_at for _, o in found) - min(result.sent_at.values())
    hateful = sum(bool(o.value.get("hateful")) for _, o in verdicts)

    labelled = [(events[i].label, o.value) for i, o in verdicts if events[i].label is not None]
    f1 = auc = None
    if labelled:
        from sklearn.metrics import f1_score, roc_auc_score

        y = [int(label) for label, _ in labelled]
        f1 = float(f1_score(y, [int(bool(v.get("hateful"))) for _, v in labelled], zero_division=0))
        if len(set(y)) == 2:
            auc = float(roc_auc_score(y, [float(v["p_hateful"]) for _, v in labelled]))

    fill, batches = batch_fill_from_metrics(metrics_text)
    fill_source = (
        f"worker /metrics: mean of moderation_batch_fill_ratio over {batches} model batches"
        if fill is not None
        else "not available (worker /metrics could not be read)"
    )
    description, base, sha = model_description(
        (health or {}).get("model"), config.model, config.lora
    )
    notes = []
    if embedded:
        notes.append(
            "embedded Tansu answers a waiting fetch only when the wait expires, so the idle "
            f"worker picks up new records up to {FAUST_FETCH_MAX_WAIT_S:g} s late (Faust's "
            "fixed fetch wait); Apache Kafka answers at once"
        )
    if not config.rate:
        notes.append(
            "unthrottled: all events were produced at once, so latency includes time queued "
            "behind earlier comments; use --rate N for latency at a steady load"
        )
    return DemoReport(
        input=demo_input.description,
        broker=broker,
        model=description,
        base_model=base,
        lora_sha256=sha,
        threshold=(health or {}).get("threshold"),
        events=n,
        verdicts=len(verdicts),
        dead_letters=dict(sorted(dead.items())),
        expected_dead_letters=dict(sorted(expected.items())),
        duplicates=result.duplicates,
        missing=len(missing),
        missing_ids=missing_ids[:20],
        timed_out=result.timed_out,
        events_per_s=(len(found) / window) if window else None,
        window_s=window,
        latency_p50_s=_percentile(latencies, 50),
        latency_p99_s=_percentile(latencies, 99),
        batch_fill_ratio=fill,
        batch_fill_source=fill_source,
        model_batches=batches,
        hateful=hateful,
        hateful_rate=(hateful / len(verdicts)) if verdicts else None,
        labelled=len(labelled),
        f1=f1,
        roc_auc=auc,
        verdicts_file=str(config.out),
        worker_log=str(worker_log),
        notes=notes,
    )


def _num(value: float | None, fmt: str = "{:.3f}", none: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return fmt.format(value)


def render_table(report: DemoReport) -> str:
    """The summary as an aligned two-column text table (what the newcomer reads last)."""
    dead = ", ".join(f"{reason} {n}" for reason, n in report.dead_letters.items()) or "none"
    rows: list[tuple[str, str]] = [
        ("input", report.input),
        ("broker", report.broker),
        ("model", report.model),
        ("threshold", _num(report.threshold)),
        ("events produced", str(report.events)),
        ("verdicts", str(report.verdicts)),
        ("dead letters", f"{sum(report.dead_letters.values())} ({dead})"),
        (
            "accounted for",
            f"{report.accounted}/{report.events}"
            + (f", {report.duplicates} duplicate(s) ignored" if report.duplicates else "")
            + (f", {report.missing} MISSING" if report.missing else ""),
        ),
        (
            "events/s",
            _num(report.events_per_s, "{:.1f}")
            + (f" ({report.accounted} in {report.window_s:.1f} s)" if report.window_s else ""),
        ),
        (
            "latency p50 / p99",
            f"{_num(report.latency_p50_s, '{:.2f} s')} / {_num(report.latency_p99_s, '{:.2f} s')}"
            " (produce -> outcome read)",
        ),
        (
            "batch fill",
            _num(report.batch_fill_ratio, "{:.2f}")
            + (
                f" (mean over {report.model_batches} model batches, worker /metrics)"
                if report.batch_fill_ratio is not None
                else f" ({report.batch_fill_source})"
            ),
        ),
        (
            "hateful rate",
            _num(report.hateful_rate, "{:.1%}") + f" ({report.hateful} of {report.verdicts})",
        ),
    ]
    if report.labelled:
        rows.append(
            (
                "F1 / ROC-AUC",
                f"{_num(report.f1)} / {_num(report.roc_auc)} "
                f"({report.labelled} labelled comments, at the threshold above)",
            )
        )
    else:
        rows.append(("F1 / ROC-AUC", "n/a (input has no labels)"))
    rows += [("verdicts file", report.verdicts_file), ("worker log", report.worker_log)]
    width = max(len(k) for k, _ in rows)
    title = "moderation-worker demo: summary"
    lines = [title, "=" * len(title)]
    lines += [f"{key.ljust(width)}  {value}" for key, value in rows]
    if report.missing:
        lines.append(
            f"MISSING: {report.missing} event(s) had no verdict or dead letter"
            + (" when the demo timed out" if report.timed_out else "")
            + f": {', '.join(report.missing_ids)}"
        )
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def write_verdicts(path: Path, demo_input: DemoInput, result: StreamResult) -> int:
    """One line per event that got a verdict (duplicates dropped), in the order produced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "wb") as out:
        for i in range(len(demo_input.events)):
            outcome = result.outcome(i)
            if outcome is not None and outcome.kind == "verdict":
                out.write(orjson.dumps(outcome.value) + b"\n")
                n += 1
    return n

"""The demo's summary: every figure from what was produced, read back and scraped from the
worker, the table printed last, and the files it leaves (`verdicts.jsonl`, `summary.json`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from moderation_worker.settings import DEFAULT_LORA
from moderation_worker.tools.demo.config import (
    FAUST_FETCH_MAX_WAIT_S,
    DemoConfig,
    demo_classifiers,
)
from moderation_worker.tools.demo.figures import (
    classifier_rows,
    community_counts,
    control_figures,
    flagged,
    shadow_figures,
)
from moderation_worker.tools.demo.inputs import DemoInput
from moderation_worker.tools.demo.live_change import AppliedChange
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
    flagged: int
    flagged_rate: float | None
    flagged_by: dict[str, int]
    labelled: int
    f1: float | None
    roc_auc: float | None
    primary: str | None  # whose p_hateful the ROC-AUC ranks
    classifiers: list[dict[str, Any]]
    routes: dict[str, list[str]]  # community -> classifiers; "*": every other event
    communities: dict[str, int]  # verdicts per community
    shadow: dict[str, Any]
    control: dict[str, Any]  # verdicts per control version; the live change and its effect
    paused_s: float
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
    """(text, base model, LoRA sha) of the primary classifier, saying plainly when it is
    zero-shot.

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
    ready_health: dict[str, Any] | None = None,
    live_change: AppliedChange | None = None,
) -> DemoReport:
    """Every figure of the summary from what was produced, read back and scraped.

    `ready_health` is `/health` when the worker got ready, `health` the latest one; their
    policies are the thresholds before and after (the live change's own, when there was one).
    """
    events = demo_input.events
    n = len(events)
    outcomes = [(i, result.outcome(i)) for i in range(n)]
    found = [(i, o) for i, o in outcomes if o is not None]
    verdicts = [(i, o) for i, o in found if o.kind == "verdict"]
    values = [o.value for _, o in verdicts]
    dead = Counter(o.value.get("reason", "unknown") for _, o in found if o.kind == "dead_letter")
    expected = Counter(e.expected_reason for e in events if e.expected_reason is not None)
    missing = [i for i, o in outcomes if o is None]
    missing_ids = [events[i].id or events[i].key.decode("utf-8", "replace") for i in missing]

    latencies = [o.received_at - result.sent_at[i] for i, o in found if i in result.sent_at]
    window = None
    if found and result.sent_at:
        window = max(o.received_at for _, o in found) - min(result.sent_at.values())
    busy = window - result.paused_s if window else None  # the midway pause is no throughput
    n_flagged = sum(flagged(v) for v in values)
    flagged_by = Counter(name for v in values for name in v.get("flagged_by") or ())

    labelled = [(events[i].label, o.value) for i, o in verdicts if events[i].label is not None]
    f1 = auc = None
    if labelled:
        from sklearn.metrics import f1_score, roc_auc_score

        y = [int(label) for label, _ in labelled]
        f1 = float(f1_score(y, [int(flagged(v)) for _, v in labelled], zero_division=0))
        if len(set(y)) == 2:  # the primary classifier's score, as in a version-1 verdict
            auc = float(roc_auc_score(y, [float(v["p_hateful"]) for _, v in labelled]))
    primaries = Counter(v.get("primary") for v in values if v.get("primary"))

    fill, batches = batch_fill_from_metrics(metrics_text)
    fill_source = (
        f"worker /metrics: mean of moderation_batch_fill_ratio over {batches} model batches"
        if fill is not None
        else "not available (worker /metrics could not be read)"
    )
    _, base, sha = model_description((health or {}).get("model"), config.model, config.lora)
    policy_after = (health or {}).get("policy") or {}
    policy_before = (ready_health or {}).get("policy") or policy_after
    if live_change is not None:  # the worker's policy just before and just after the record
        policy_before = live_change.policy_before or policy_before
        policy_after = live_change.policy_after or policy_after
    loras = {c.name: c.lora for c in demo_classifiers(config, None)}
    rows = classifier_rows(values, policy_before, policy_after, loras)
    routes = {c: list(r) for c, r in (policy_after.get("routes") or {}).items()}
    routes["*"] = list(policy_after.get("default_route") or [])
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
    if live_change is not None:
        notes.append(
            f"producing paused {result.paused_s:.1f} s for the live change (publish, and wait "
            "until the worker applied it); events/s leaves the pause out"
        )
    return DemoReport(
        input=demo_input.description,
        broker=broker,
        model=f"{base}, {len(rows)} classifier(s) on one backbone (per-row LoRA)",
        base_model=base,
        lora_sha256=sha,
        threshold=(ready_health or health or {}).get("threshold"),
        events=n,
        verdicts=len(verdicts),
        dead_letters=dict(sorted(dead.items())),
        expected_dead_letters=dict(sorted(expected.items())),
        duplicates=result.duplicates,
        missing=len(missing),
        missing_ids=missing_ids[:20],
        timed_out=result.timed_out,
        events_per_s=(len(found) / busy) if busy else None,
        window_s=window,
        latency_p50_s=_percentile(latencies, 50),
        latency_p99_s=_percentile(latencies, 99),
        batch_fill_ratio=fill,
        batch_fill_source=fill_source,
        model_batches=batches,
        flagged=n_flagged,
        flagged_rate=(n_flagged / len(verdicts)) if verdicts else None,
        flagged_by=dict(sorted(flagged_by.items())),
        labelled=len(labelled),
        f1=f1,
        roc_auc=auc,
        primary=primaries.most_common(1)[0][0] if primaries else None,
        classifiers=rows,
        routes=routes,
        communities=community_counts(values),
        shadow=shadow_figures(values),
        control=control_figures(values, live_change),
        paused_s=result.paused_s,
        verdicts_file=str(config.out),
        worker_log=str(worker_log),
        notes=notes,
    )


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

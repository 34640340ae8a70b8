"""The demo's summary as text: a two-column table of every figure, then one row per classifier
(what the person running the demo reads last, on stdout)."""

from __future__ import annotations

import math

from moderation_worker.tools.demo.figures import NO_COMMUNITY, describe_lora, describe_thresholds
from moderation_worker.tools.demo.summary import DemoReport


def _num(value: float | None, fmt: str = "{:.3f}", none: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return fmt.format(value)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {n}" for key, n in counts.items())


def _control_rows(report: DemoReport) -> list[tuple[str, str]]:
    """The live change, the verdicts decided under each control version, what it changed."""
    control = report.control
    counts = control["verdicts_by_version"]
    versions = "; ".join(
        f"{n} verdicts under version {v} ({control['flagged_by_version'].get(v, 0)} flagged)"
        for v, n in counts.items()
    )
    change = control.get("change")
    if change is None:
        return [("live change", "none (--no-live-change)"), ("control versions", versions)]
    before = change.get("threshold_before") or {}
    scope = f"{change['classifier']} results" + (
        f" in {change['community']}" if change["community"] else ""
    )
    moved = [
        f"{change['no_longer_flagged']} no longer flagged" if change["no_longer_flagged"] else "",
        f"{change['newly_flagged']} newly flagged" if change["newly_flagged"] else "",
    ]
    return [
        (
            "live change",
            f"{change['key']}: {_num(before.get('value'))} ({before.get('source', '?')}) -> "
            f"{change['threshold']:.3f} (control), published to {change['topic']} after "
            f"{change['after_events']} of {report.events} events, in force "
            f"{change['seconds_to_apply']:.2f} s later",
        ),
        (
            "control versions",
            f"{change['version_before']} -> {change['version_after']}: {versions}; "
            f"{sum(counts.values())} of {report.verdicts} verdicts",
        ),
        (
            "changed decisions",
            f"of {change['results_in_scope']} {scope} under version "
            f"{change['version_after']}, "
            + (", ".join(m for m in moved if m) or "none changed")
            + f" (old threshold vs new); `flagged` changed for {change['changed_verdicts']}"
            " comment(s)",
        ),
    ]


def _classifier_table(report: DemoReport) -> list[str]:
    header = ("classifier", "mode", "LoRA", "scored", "flagged", "threshold (before -> after)")
    table = [header] + [
        (
            row["name"],
            row["mode"],
            describe_lora(row["lora"], row["lora_sha256"]),
            str(row["scored"]),
            str(row["flagged"]),
            describe_thresholds(row),
        )
        for row in report.classifiers
    ]
    widths = [max(len(r[c]) for r in table) for c in range(len(header) - 1)]
    lines = []
    for r in table:
        cells = [cell.ljust(width) for cell, width in zip(r, widths, strict=False)]
        lines.append("  ".join([*cells, r[-1]]))
    shadow = [r["name"] for r in report.classifiers if r["mode"] == "shadow"]
    if shadow:
        s = report.shadow
        broken = s["in_flagged_by"] + s["decided_alone"]
        lines.append(
            f"shadow ({', '.join(shadow)}): {s['flagged']} of {s['results']} results flagged "
            f"({s['only_shadow_flagged']} where no enforced classifier did); published, never "
            "decisive: "
            + (
                f"none in `flagged` or `flagged_by` (all {report.verdicts} verdicts checked)"
                if not broken
                else f"IN `flagged` OR `flagged_by` OF {broken} VERDICT(S), a bug"
            )
        )
    return [line.rstrip() for line in lines]


def render_table(report: DemoReport) -> str:
    """The summary as an aligned two-column text table, then one row per classifier."""
    dead = ", ".join(f"{reason} {n}" for reason, n in report.dead_letters.items()) or "none"
    routes = "; ".join(
        f"{'other' if c == '*' else c}: {', '.join(r)}" for c, r in report.routes.items()
    )
    communities = dict(report.communities)
    if set(communities) != {NO_COMMUNITY}:
        communities["no community"] = communities.pop(NO_COMMUNITY, 0)
    rows: list[tuple[str, str]] = [
        ("input", report.input),
        ("broker", report.broker),
        ("model", report.model),
        ("routes", f"{routes} (by the event's community)"),
        ("events produced", str(report.events)),
        (
            "verdicts",
            str(report.verdicts)
            + (f" ({_counts(communities)})" if set(communities) != {NO_COMMUNITY} else ""),
        ),
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
            + (
                f" ({report.accounted} in {report.window_s - report.paused_s:.1f} s"
                + (f", {report.paused_s:.1f} s pause left out)" if report.paused_s else ")")
                if report.window_s
                else ""
            ),
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
            "flagged",
            f"{report.flagged} of {report.verdicts} ({_num(report.flagged_rate, '{:.1%}')})"
            + (f"; flagged_by {_counts(report.flagged_by)}" if report.flagged_by else "")
            + " (enforced classifiers only)",
        ),
    ]
    if report.labelled:
        rows.append(
            (
                "F1 / ROC-AUC",
                f"{_num(report.f1)} / {_num(report.roc_auc)} ({report.labelled} labelled "
                f"comments; F1 of `flagged`, ROC-AUC of {report.primary or 'the primary'}'s p)",
            )
        )
    else:
        rows.append(("F1 / ROC-AUC", "n/a (input has no labels)"))
    rows += _control_rows(report)
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
    lines += ["", *_classifier_table(report), ""]
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)

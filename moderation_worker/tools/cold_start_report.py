"""What one cold-start measurement found (`StartRun`, `ColdStartReport`) and its markdown.

The figures come from two places: the worker's own JSON log (`worker starting`, `model
loading`, `model weights loaded`, `shape compiled`, `model loaded`, `model warmed up`, each with
its timestamp) and what the measuring process saw from outside (when it spawned the process,
when `/health` first answered and said ready, the broker timestamp of the first verdict). Both
use this machine's wall clock, so phases are differences of timestamps.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

#: (key, row label) of the phases, in the order a start goes through them.
PHASES = (
    ("imports", "Python start, imports, settings (spawn → `worker starting`)"),
    ("preflight", "Kafka preflight (→ `model loading`)"),
    ("load", "Model load (→ `model loaded`)"),
    ("weights", "  of which base weights"),
    ("classifiers", "  of which classifiers: LoRA, adapter stack, prompts"),
    ("warm_up", "Warm-up: every shape compiled (→ `model warmed up`)"),
    ("join", "Faust start, group join (→ `/health` ready, partitions assigned)"),
    ("ready", "**Process start → `/health` ready**"),
    ("verdict", "Ready → first verdict (an event waiting in the topic)"),
    ("first_verdict", "**Process start → first verdict**"),
)


#: (key, row label) of the CPU-second rows: what a phase costs even on a shared machine.
CPU_ROWS = (
    ("weights", "CPU s, all threads: base weights"),
    ("load", "CPU s, all threads: model load"),
    ("warm_up", "CPU s, all threads: warm-up"),
    ("ready", "**CPU s, all threads: process start → ready**"),
)


@dataclass
class StartRun:
    """One worker start: each phase in seconds (None: not seen), and per-shape compiles."""

    label: str
    phases: dict[str, float | None] = field(default_factory=dict)
    shapes: list[tuple[int | None, float]] = field(default_factory=list)
    weights_format: str | None = None
    one_pass: bool | None = None
    cpu: dict[str, float | None] = field(default_factory=dict)  # CPU seconds, all threads
    compile_cache: str = "off"
    cache_files_after: int = 0
    health_up_s: float | None = None
    error: str | None = None
    rss_mib: dict[str, float | None] = field(default_factory=dict)  # "verdict", "peak"

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "phases": self.phases,
            "shapes": [{"length": n, "seconds": s} for n, s in self.shapes],
            "weights_format": self.weights_format,
            "one_pass": self.one_pass,
            "cpu": self.cpu,
            "compile_cache": self.compile_cache,
            "cache_files_after": self.cache_files_after,
            "health_up_s": self.health_up_s,
            "error": self.error,
            "rss_mib": self.rss_mib,
        }


@dataclass
class ColdStartReport:
    """Every start of one measurement, with what was measured and where."""

    model: str
    command: str
    machine: str
    backend: str
    starts: list[StartRun] = field(default_factory=list)
    note: str = ""
    cores: int = 0
    load: float | None = None  # 1-minute load average when the measurement began

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "command": self.command,
            "machine": self.machine,
            "backend": self.backend,
            "starts": [s.to_dict() for s in self.starts],
            "note": self.note,
            "cores": self.cores,
            "load": self.load,
        }


def _epoch(ts: str) -> float:
    return _dt.datetime.fromisoformat(ts).timestamp()


def _first(records: list[dict[str, Any]], msg: str) -> dict[str, Any] | None:
    return next((r for r in records if r.get("msg") == msg and "ts" in r), None)


def phases_from_log(
    run: StartRun,
    records: list[dict[str, Any]],
    spawned: float,
    ready: float | None,
    verdict: float | None,
) -> None:
    """Fill `run` from the worker's log records and the outside timestamps (epoch seconds)."""
    at = {
        msg: _epoch(r["ts"])
        for msg in ("worker starting", "model loading", "model loaded", "model warmed up")
        if (r := _first(records, msg)) is not None
    }

    def span(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 3)

    p = run.phases
    p["imports"] = span(spawned, at.get("worker starting"))
    p["preflight"] = span(at.get("worker starting"), at.get("model loading"))
    p["load"] = span(at.get("model loading"), at.get("model loaded"))
    weights = _first(records, "model weights loaded")
    if weights is not None:
        p["weights"] = weights.get("seconds")
        run.weights_format = weights.get("format")
        run.one_pass = weights.get("one_pass")
    else:
        p["weights"] = None
    p["classifiers"] = span(p["weights"], p["load"]) if p["weights"] is not None else None
    p["warm_up"] = span(at.get("model loaded"), at.get("model warmed up"))
    run.shapes = [
        (r.get("length"), float(r.get("seconds", 0.0)))
        for r in records
        if r.get("msg") == "shape compiled"
    ]
    for key, msg in (("weights", "model weights loaded"), ("load", "model loaded")):
        run.cpu[key] = (_first(records, msg) or {}).get("cpu_s")
    run.cpu["warm_up"] = (_first(records, "model warmed up") or {}).get("cpu_s")
    p["join"] = span(at.get("model warmed up"), ready)
    p["ready"] = span(spawned, ready)
    p["verdict"] = span(ready, verdict)
    p["first_verdict"] = span(spawned, verdict)


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _shape_rows(starts: list[StartRun]) -> list[str]:
    """One row per compiled shape: its first call (trace, lower, compile or cache load)."""
    rows = []
    for i in range(max((len(s.shapes) for s in starts), default=0)):
        length = next((s.shapes[i][0] for s in starts if i < len(s.shapes)), None)
        name = f"{length} tokens" if length else f"#{i + 1}"
        cells = [_cell(s.shapes[i][1]) if i < len(s.shapes) else "–" for s in starts]
        rows.append(f"|   shape {name}: first call | " + " | ".join(cells) + " |")
    return rows


def render(report: ColdStartReport, heading: str = "## Cold start") -> list[str]:
    """The cold-start table as markdown lines: one column per start, one row per phase."""
    starts = report.starts
    lines = [heading, ""]
    lines += [
        f"`{report.command}`: the real worker process (`moderation-worker worker`) started "
        f"{len(starts)} times on this machine ({report.machine}; Keras backend "
        f"{report.backend}), model `{report.model}`, against the embedded Tansu broker, one "
        "comment waiting in the input topic. Phases are read from the worker's JSON log and "
        "from outside (spawn, `/health`, the verdict's broker timestamp); seconds, one run each.",
        "",
    ]
    if report.load is not None and report.cores and report.load > report.cores / 2:
        lines += [
            f"> **Measured under load**: a 1-minute load average of {report.load:.1f} on "
            f"{report.cores} cores when it began (other jobs on this machine); every phase "
            "takes longer than on the machine alone, the compile phases the most.",
            "",
        ]
    lines.append("| Phase | " + " | ".join(s.label for s in starts) + " |")
    lines.append("|---|" + "---:|" * len(starts))
    for key, label in PHASES:
        cells = []
        for s in starts:
            cell = _cell(s.phases.get(key))
            if key == "weights" and s.weights_format:
                one_pass = ", one pass" if s.one_pass else ""
                cell += f" ({s.weights_format}{one_pass})"
            cells.append(f"**{cell}**" if label.startswith("**") else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if key == "warm_up":
            lines += _shape_rows(starts)
    for key, label in CPU_ROWS:
        cells = [_cell(s.cpu.get(key)) for s in starts]
        cells = [f"**{c}**" for c in cells] if label.startswith("**") else cells
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key, label in (
        ("verdict", "Worker resident memory after its first verdict, MiB"),
        ("peak", "Worker peak resident memory (VmHWM), MiB"),
    ):
        lines.append(f"| {label} | " + " | ".join(_cell(s.rss_mib.get(key)) for s in starts) + " |")
    lines.append("| Compile cache | " + " | ".join(f"{s.compile_cache}" for s in starts) + " |")
    lines.append(
        "| Files in the compile cache after the start | "
        + " | ".join(str(s.cache_files_after) for s in starts)
        + " |"
    )
    lines.append("")
    for s in starts:
        if s.error:
            lines += [f"- {s.label}: **failed**: `{s.error[:300]}`"]
    if report.note:
        lines += [report.note, ""]
    return lines

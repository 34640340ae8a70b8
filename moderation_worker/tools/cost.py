"""What a comment costs: measured throughput on this machine (and a GPU's, derived from FLOPs
and its published peak unless measured), turned into cost per million comments from hourly
prices you give, beside a hosted moderation API's per-call price, with the breakpoint in
comments per day where running your own becomes cheaper.

    moderation-worker cost --prices prices.toml --data ethos:PATH \\
        --entry gemma-lora=gemma3-270m@default --entry encoder=encoder:runs/enc/hate

No price here is a fact: every one comes from `--prices`, a TOML file that must say when the
prices were taken and where from, and the output repeats both.

    taken_on = "2026-12-02"
    source = "your provider's price list"
    currency = "USD"
    [machines.this-cpu]   # the machine `cost` runs on: its rates are measured here
    per_hour = 0.10
    [machines.gpu]        # a GPU: rates derived from FLOPs x peak x utilisation (labelled)
    per_hour = 3.00
    peak_tflops = 989.0   # the card's published dense bf16 peak
    [api.hosted]
    per_1k_calls = 1.50
"""

from __future__ import annotations

import argparse
import math
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class Prices:
    taken_on: str
    source: str
    currency: str
    machines: dict[str, dict[str, float]]
    apis: dict[str, float]  # name -> price per call

    @classmethod
    def load(cls, path: str | Path) -> Prices:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        missing = [k for k in ("taken_on", "source", "machines") if k not in data]
        if missing:
            raise ValueError(f"{path}: prices need {missing} (when, where from, what)")
        machines = {}
        for name, m in data["machines"].items():
            if not isinstance(m.get("per_hour"), (int, float)) or m["per_hour"] <= 0:
                raise ValueError(f"{path}: machines.{name}.per_hour must be a positive number")
            machines[name] = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
        apis = {n: float(a["per_1k_calls"]) / 1000.0 for n, a in data.get("api", {}).items()}
        return cls(str(data["taken_on"]), str(data["source"]), data.get("currency", "USD"),
                   machines, apis)  # fmt: skip


@dataclass
class Measured:
    """One model on this machine: its speed, what it holds in memory, what ships."""

    name: str
    comments_per_s: float
    param_bytes: int
    shipped_bytes: int | None
    flops_per_comment: float | None
    train_seconds: float | None


def _bytes_of(weights: Any) -> int:
    return int(sum(np.prod(w.shape) * np.dtype(w.dtype).itemsize for w in weights))


def _measure_tfidf(name: str, texts: list[str], train: Any, repeats: int) -> Measured:
    import pickle

    from moderation_worker.tools.baseline import TfidfBaseline

    started = time.perf_counter()
    model = TfidfBaseline().fit(list(train.texts), train.labels)
    fitted = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(repeats):
        model.predict_proba(texts)
    rate = repeats * len(texts) / (time.perf_counter() - started)
    size = len(pickle.dumps(model))
    return Measured(name, rate, size, size, None, fitted)


def measure(
    entry: Any, texts: list[str], batch_size: int, repeats: int = 2, train: Any = None
) -> Measured:
    """Comments/s scoring `texts` (after one warm-up batch), and the model's sizes."""
    from moderation_worker.model.sources import build_classifier

    if entry.model == "baseline:tfidf":
        return _measure_tfidf(entry.name, texts, train, repeats)
    clf = build_classifier(entry.model, entry.lora or "none", batch_size=batch_size)
    clf.p_positive(texts[:batch_size])  # compile
    started = time.perf_counter()
    for _ in range(repeats):
        clf.p_positive(texts)
    rate = repeats * len(texts) / (time.perf_counter() - started)
    backbone = getattr(getattr(clf, "base", None), "backbone", None)
    weights = backbone.weights if backbone is not None else clf.model.weights
    adapter = getattr(clf, "adapter", None)
    path = getattr(adapter, "path", None) or getattr(clf, "path", None)  # LoRA, or encoder
    shipped = Path(path).stat().st_size if path else None
    meta = getattr(clf, "lora", None) or getattr(clf, "metadata", None)
    training = getattr(meta, "training", None) or (meta or {}).get("training") if meta else None
    seconds = (training or {}).get("seconds") if isinstance(training, dict) else None
    return Measured(entry.name, rate, _bytes_of(weights), shipped, _flops(clf), seconds)


def _flops(clf: Any) -> float | None:
    """Backbone FLOPs per comment at the full sequence length (an upper bound per comment)."""
    backbone = getattr(getattr(clf, "base", None), "backbone", None)
    if backbone is None:
        return None
    config = backbone.get_config()
    length = int(getattr(getattr(clf, "prompt", None), "sequence_length", 128))
    if "num_query_heads" in config:
        from moderation_worker.tools.bench.flops import count_flops

        return float(count_flops(config, length, 2).backbone)
    params = sum(int(np.prod(w.shape)) for w in backbone.weights)
    return 2.0 * params * length  # encoder: ~2 FLOPs per parameter per token


def per_million(per_hour: float, comments_per_s: float) -> float:
    return per_hour / (comments_per_s * 3600.0) * 1e6


def breakpoint_per_day(per_hour: float, comments_per_s: float, per_call: float,
                       headroom: float) -> float:  # fmt: skip
    """Comments/day above which your own machines cost less than the API. Machines run all
    day and are sized for the traffic at `headroom` of their measured rate (peaks)."""
    capacity = comments_per_s * headroom * SECONDS_PER_DAY
    daily = per_hour * 24.0
    if per_call * capacity <= daily:  # even a full machine costs more than the API: never
        return math.inf
    return daily / per_call  # one machine already pays off below its capacity


def self_cost_per_day(n: float, per_hour: float, comments_per_s: float, headroom: float) -> float:
    capacity = comments_per_s * headroom * SECONDS_PER_DAY
    return max(1, math.ceil(n / capacity)) * per_hour * 24.0


def build_rows(measured: list[Measured], prices: Prices, utilisation: float,
               headroom: float, local: str) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for m in measured:
        for machine, spec in prices.machines.items():
            if machine == local:
                rate, how = m.comments_per_s, "measured"
            elif "peak_tflops" in spec and m.flops_per_comment:
                rate = spec["peak_tflops"] * 1e12 * utilisation / m.flops_per_comment
                how = f"derived ({utilisation:.0%} of {spec['peak_tflops']:g} TFLOP/s peak)"
            else:
                continue
            row = {"model": m.name, "machine": machine, "comments_per_s": rate, "how": how,
                   "per_hour": spec["per_hour"],
                   "per_million": per_million(spec["per_hour"], rate)}  # fmt: skip
            row["breakpoints"] = {
                api: breakpoint_per_day(spec["per_hour"], rate, per_call, headroom)
                for api, per_call in prices.apis.items()
            }
            rows.append(row)
    return rows


def render(
    rows: list[dict[str, Any]],
    measured: list[Measured],
    prices: Prices,
    headroom: float,
    command: str,
    quality: dict[str, Any] | None = None,
) -> str:
    cur, quality = prices.currency, quality or {}
    lines = [
        f"Prices: {prices.source}, taken {prices.taken_on} ({cur}); inputs, not facts. "
        f"Machines sized at {headroom:.0%} of their rate (room for peaks).",
        "",
        f"| model | machine | comments/s | how | {cur}/hour | {cur} per million comments | "
        + " | ".join(f"cheaper than `{a}` above (comments/day)" for a in prices.apis)
        + " |",
        "|---|---|---:|---|---:|---:|" + "---:|" * len(prices.apis),
    ]
    for r in rows:
        bps = ["never" if math.isinf(b) else f"{b:,.0f}" for b in r["breakpoints"].values()]
        lines.append(
            f"| {r['model']} | {r['machine']} | {r['comments_per_s']:.1f} | {r['how']} | "
            f"{r['per_hour']:.2f} | {r['per_million']:.2f} | " + " | ".join(bps) + " |"
        )
    for api, per_call in prices.apis.items():
        lines.append(f"| `{api}` (hosted) | – | – | price per call | – | "
                     f"{per_call * 1e6:.2f} |" + " – |" * len(prices.apis))  # fmt: skip
    lines += ["", "| model | test F1 [95% CI] | test ROC-AUC [95% CI] | comments/s here | "
              "weights in memory | shipped per classifier | training time (its metadata) |",
              "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for m in measured:
        shipped = f"{m.shipped_bytes / 2**20:.2f} MiB" if m.shipped_bytes else "– (none)"
        train = "–" if m.train_seconds is None else f"{m.train_seconds:.1f} s"
        f1, auc = _quality_cells(quality.get(m.name))
        lines.append(f"| {m.name} | {f1} | {auc} | {m.comments_per_s:.1f} | "
                     f"{m.param_bytes / 2**20:.1f} MiB | {shipped} | {train} |")  # fmt: skip
    return "\n".join(lines) + f"\n\nMade by `{command}`.\n"


def _quality_cells(entry: dict[str, Any] | None) -> tuple[str, str]:
    if not entry:
        return "–", "–"
    cells = []
    for metric in ("f1", "roc_auc"):
        ci = entry["bootstrap"][metric]
        cells.append(f"{ci['estimate']:.3f} [{ci['low']:.2f}, {ci['high']:.2f}]")
    return cells[0], cells[1]


def read_quality(path: str | Path | None) -> dict[str, Any]:
    """`quality.json` entries by name (the F1/ROC-AUC intervals for the table), or {}."""
    if path is None:
        return {}
    import json

    return {e["name"]: e for e in json.loads(Path(path).read_text())["entries"]}


def plot(rows: list[dict[str, Any]], prices: Prices, headroom: float, path: Path) -> Path:
    from moderation_worker.tools.plots import _new_figure, _save

    fig = _new_figure((8.0, 5.0))
    ax = fig.add_subplot()
    n = np.logspace(3, 9, 200)
    for r in rows:
        cost = [self_cost_per_day(x, r["per_hour"], r["comments_per_s"], headroom) for x in n]
        ax.plot(n, cost, label=f"{r['model']} on {r['machine']}")
    for api, per_call in prices.apis.items():
        ax.plot(n, n * per_call, linestyle="--", color="black", label=f"{api} (per call)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("comments per day")
    ax.set_ylabel(f"{prices.currency} per day")
    ax.set_title(f"Cost per day (prices taken {prices.taken_on}; inputs, not facts)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return _save(fig, path)


def cmd_cost(args: argparse.Namespace) -> int:
    import json
    import shlex
    import sys

    from moderation_worker.tools.data import load_splits
    from moderation_worker.tools.quality import Entry

    prices = Prices.load(args.prices)
    if args.local not in prices.machines:
        raise ValueError(f"--local {args.local!r} is not a machine in {args.prices}")
    splits = load_splits(args.data, validation_rows=args.validation_rows)
    texts = list(splits.test.texts)[: args.limit]
    measured = []
    for text in args.entry:
        entry = Entry.parse(text)
        print(f"[cost] measuring {entry.name} on {len(texts)} comments", file=sys.stderr)
        measured.append(measure(entry, texts, args.batch_size, train=splits.train))
    rows = build_rows(measured, prices, args.gpu_utilisation, args.headroom, args.local)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "moderation-worker " + shlex.join(sys.argv[1:])
    quality = read_quality(args.quality)
    (out / "COST.md").write_text(render(rows, measured, prices, args.headroom, command, quality))
    (out / "cost.json").write_text(json.dumps(
        {"prices": prices.__dict__, "rows": rows, "measured": [m.__dict__ for m in measured]},
        indent=1, default=str))  # fmt: skip
    plot(rows, prices, args.headroom, out / "cost.png")
    print((out / "COST.md").read_text())
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cost", help="cost per million comments and the breakpoint vs an API")
    p.add_argument("--prices", required=True, help="TOML: taken_on, source, machines, api")
    p.add_argument("--local", default="this-cpu", help="the machine in --prices this runs on")
    p.add_argument("--data", required=True, help="texts to measure on (their test split)")
    p.add_argument("--validation-rows", type=int, default=100)
    p.add_argument("--entry", action="append", required=True, help="NAME=MODEL[@LORA]")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=128, help="comments measured per entry")
    p.add_argument("--gpu-utilisation", type=float, default=0.3,
                   help="share of a GPU's peak assumed for derived rates")  # fmt: skip
    p.add_argument("--headroom", type=float, default=0.5, help="machines run at this share")
    p.add_argument("--quality", default=None, help="a quality.json: F1/ROC-AUC by entry name")
    p.add_argument("--out", default="reports/cost")
    p.set_defaults(func=cmd_cost)

"""Several classifiers on one base model: per-row LoRA (`ClassifierSet`) against swap-and-rerun.

For k in (1, 2, 4) classifiers, the same N comments are each scored by all k (k·N rows) at
the same batch size, two ways over the same backbone:

- per-row: one `ClassifierSet` holding the k adapters; the k rows of each comment are
  interleaved, so every batch mixes classifiers, and each row gets its own LoRA delta.
- swap-and-rerun: k `AgileClassifier`s on the backbone, a whole pass over the N comments
  each, the classifier's adapter written into the backbone's one LoRA slot before its pass.
  With k = 1 that is the single-adapter reference the per-row path is compared with.

Then mixed traffic: comments arriving in windows of one batch, half routed to one classifier
and half to three others; per-row packs a window's rows into full batches, swap-and-rerun runs
a partial batch per classifier. And memory: the backbone is held once; an extra classifier
costs its factors in the stack (`AdapterStack.nbytes_per_slot`), measured also as RSS growth.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from moderation_worker.model.classifier import AgileClassifier, LoadedModel
from moderation_worker.model.classifier_set import ClassifierSet
from moderation_worker.model.lora import DEFAULT_TARGET_LAYERS, LoraAdapter, LoraMetadata
from moderation_worker.model.lora_slot import _weighted_layers, adapter_slot
from moderation_worker.model.prompts import PromptSettings
from moderation_worker.model.sources import shipped_lora
from moderation_worker.tools.bench.flops import FlopCount
from moderation_worker.tools.bench.options import BenchOptions, log

COUNTS = (1, 2, 4)
SHIPPED = ("hate", "violence", "directed")
NAMES = (*SHIPPED, "hate-copy")  # the 4th reuses hate's factors: cost does not depend on them


@dataclass
class PolicyRow:
    """One traffic shape: k classifiers, both ways timed alternately over the same rows."""

    traffic: str
    k: int
    comments: int
    rows: int
    batch: int
    per_row_s: list[float]
    swap_s: list[float]
    per_row_batches: int = 0
    swap_batches: int = 0
    writes_per_pass: float = 0.0  # adapter writes into the backbone's slot per swap pass
    max_dp: float = float("nan")  # max |p per-row - p of the classifier alone| on these rows

    @property
    def per_row_cps(self) -> float:
        return self.comments / statistics.median(self.per_row_s)

    @property
    def swap_cps(self) -> float:
        return self.comments / statistics.median(self.swap_s)

    @property
    def per_row_rps(self) -> float:
        return self.rows / statistics.median(self.per_row_s)

    @property
    def swap_rps(self) -> float:
        return self.rows / statistics.median(self.swap_s)

    @property
    def per_row_fill(self) -> float:
        return self.rows / (self.per_row_batches * self.batch)

    @property
    def swap_fill(self) -> float:
        return self.rows / (self.swap_batches * self.batch)


@dataclass
class PolicyReport:
    """What the policies section measured (rows appended as they are measured)."""

    batch: int = 0
    length: int = 0  # tokens per row: every batch is `[batch, length]`
    comments: int = 0
    repeats: int = 0
    adapters_source: str = ""
    rows: list[PolicyRow] = field(default_factory=list)
    bytes_per_slot: int = 0  # `stack.nbytes_per_slot()`: one more classifier's factors
    backbone_bytes: int = 0
    capacity: dict[int, int] = field(default_factory=dict)  # k -> stack slots of its set
    rss_build: dict[int, int] = field(default_factory=dict)  # k -> RSS growth building the set
    rss_compile: dict[int, int] = field(default_factory=dict)  # k -> then its first call
    rss_source: str = ""
    adapters: dict[str, LoraAdapter] = field(default_factory=dict, repr=False)
    note: str = ""

    @property
    def single(self) -> PolicyRow | None:
        """k = 1, all comments: its swap-and-rerun side is one `AgileClassifier` alone."""
        return next((r for r in self.rows if r.k == 1 and r.traffic == "all"), None)


def rss_bytes() -> tuple[int | None, str]:
    """Resident set size of this process now, and how it was read."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss), "psutil RSS"
    except ImportError:
        pass
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024, "VmRSS (/proc/self/status)"
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return int(peak), "peak RSS (getrusage maxrss; growth shows only at a new peak)"
    except (ImportError, OSError):
        return None, "not available"


def backbone_bytes(backbone) -> int:
    """The backbone's parameters in bytes, its own LoRA slot variables left out."""
    sizes = {"bfloat16": 2, "float16": 2}
    total = 0
    for w in backbone.weights:
        if "lora" in w.path:
            continue
        itemsize = sizes.get(str(w.dtype)) or np.dtype(str(w.dtype)).itemsize
        total += math.prod(int(s) for s in w.shape) * itemsize
    return total


def random_adapters(model: LoadedModel, names: Sequence[str], rank: int = 4, seed: int = 0):
    """Random rank-`rank` adapters on the default LoRA targets (the cost ignores the values)."""
    meta = LoraMetadata(base_model=model.name, prompt=PromptSettings(), rank=rank)
    rngs = {name: np.random.default_rng(seed + j) for j, name in enumerate(names)}
    shapes = {  # layer index -> (A's shape, B's shape)
        i: ((*lyr._kernel.shape[:-1], rank), (rank, lyr._kernel.shape[-1]))
        for i, lyr in enumerate(_weighted_layers(model.backbone))
        if lyr.name in DEFAULT_TARGET_LAYERS and hasattr(lyr, "enable_lora")
    }
    return {
        name: LoraAdapter(
            {i: (rng.normal(0, 0.3, a), rng.normal(0, 0.3, b)) for i, (a, b) in shapes.items()},
            meta,
        )
        for name, rng in rngs.items()
    }


def bench_adapters(model: LoadedModel, spec: str) -> tuple[dict[str, LoraAdapter], str]:
    """The shipped hate/violence/directed adapters (+ a copy of hate, a distinct object so it
    is swapped like any other), else random ones. Returns them and where they came from."""
    paths = [shipped_lora(spec, name) for name in SHIPPED]
    if all(paths):
        out = {
            n: LoraAdapter.load(p, base_model=model.name)
            for n, p in zip(SHIPPED, paths, strict=True)
        }
        out[NAMES[3]] = LoraAdapter(out["hate"].factors, out["hate"].metadata)
        return out, (
            "the shipped hate, violence and directed LoRA adapters, and hate's factors again "
            "as a 4th classifier"
        )
    return random_adapters(model, NAMES), "random rank-4 adapters (no shipped ones for this model)"


def _alternate(fns: Sequence[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Seconds of each fn, timed in turn `repeats` times: drift hits every fn alike."""
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            out[i].append(time.perf_counter() - start)
    return out


def measure_policies(
    model: LoadedModel, options: BenchOptions, texts: Sequence[str], out: PolicyReport
) -> PolicyReport:
    """Per-row LoRA against swap-and-rerun for 1, 2 and 4 classifiers and mixed traffic,
    and the memory an extra classifier costs. Fills `out` as it goes."""
    b, n = options.tuning_batch, options.bucket_texts
    texts = [texts[i % len(texts)] for i in range(n)]
    out.batch, out.comments, out.repeats = b, n, options.repeats
    adapters, out.adapters_source = bench_adapters(model, options.model)
    out.adapters = adapters
    out.backbone_bytes = backbone_bytes(model.backbone)
    slot = adapter_slot(model.backbone)

    # Alone: each classifier on its own (also compiles their graphs: the swap side's warm-up).
    log(f"policies: {len(NAMES)} classifiers alone, {n} comments, batch {b}")
    clfs = {name: AgileClassifier(model, adapter=a, batch_size=b) for name, a in adapters.items()}
    alone = {name: clf.p_positive(texts) for name, clf in clfs.items()}

    sets: dict[int, ClassifierSet] = {}
    for k in COUNTS:
        gc.collect()
        before, out.rss_source = rss_bytes()
        sets[k] = ClassifierSet(model, {m: adapters[m] for m in NAMES[:k]}, batch_size=b)
        built, _ = rss_bytes()
        sets[k].p_positive(texts[:1] * b, [NAMES[0]] * b)  # compiles its one graph
        compiled, _ = rss_bytes()
        out.capacity[k] = sets[k].stack.capacity
        if before is not None and built is not None and compiled is not None:
            out.rss_build[k], out.rss_compile[k] = built - before, compiled - built
    out.bytes_per_slot, out.length = sets[k].stack.nbytes_per_slot(), sets[k].sequence_length

    def timed_pair(traffic, k, rows, per_row, swap, batches, last):
        slot.apply(clfs[NAMES[k - 1]].adapter)  # as if the previous swap pass just ended
        writes = slot.writes
        per_row_s, swap_s = _alternate([per_row, swap], options.repeats)
        expected = np.array([alone[name][i] for i, name in rows])
        row = PolicyRow(traffic, k, n, len(rows), b, per_row_s, swap_s, *batches)
        row.writes_per_pass = (slot.writes - writes) / options.repeats
        row.max_dp = float(np.abs(np.asarray(last["p"]) - expected).max())
        out.rows.append(row)
        log(
            f"policies: {traffic} k={k}: per-row {row.per_row_cps:.2f} comments/s, "
            f"swap {row.swap_cps:.2f}, max dp {row.max_dp:.1e}"
        )

    # Every comment to all k classifiers: rows interleaved so every batch mixes classifiers.
    for k in COUNTS:
        names = NAMES[:k]
        rows = [(i, name) for i in range(n) for name in names]
        row_texts, row_names = [texts[i] for i, _ in rows], [name for _, name in rows]
        last: dict[str, np.ndarray] = {}

        def per_row(s=sets[k], t=row_texts, m=row_names, last=last):
            last["p"] = s.p_positive(t, m)

        def swap(names=names):
            for name in names:
                clfs[name].p_positive(texts)

        log(f"policies: all comments to {k} classifier(s), {len(rows)} rows")
        batches = (math.ceil(len(rows) / b), k * math.ceil(n / b))
        timed_pair("all", k, rows, per_row, swap, batches, last)

    # Mixed traffic, in windows of one batch of comments (what the worker receives at once):
    # even comments to the 1st classifier, odd ones to the other three.
    k = COUNTS[-1]
    routes = [NAMES[:1] if i % 2 == 0 else NAMES[1:k] for i in range(n)]
    windows = [range(s, min(s + b, n)) for s in range(0, n, b)]
    win_rows = [[(i, name) for i in w for name in routes[i]] for w in windows]
    per_clf = [{m: [i for i in w if m in routes[i]] for m in NAMES[:k]} for w in windows]
    per_clf = [{name: idx for name, idx in d.items() if idx} for d in per_clf]
    last_mixed: dict[str, np.ndarray] = {}

    def per_row_mixed():
        last_mixed["p"] = np.concatenate(
            [
                sets[k].p_positive([texts[i] for i, _ in r], [name for _, name in r])
                for r in win_rows
            ]
        )

    def swap_mixed():
        for d in per_clf:
            for name, idx in d.items():
                clfs[name].p_positive([texts[i] for i in idx])

    log(f"policies: mixed traffic, {k} classifiers, 1 or 3 per comment")
    batches = (
        sum(math.ceil(len(r) / b) for r in win_rows),
        sum(math.ceil(len(idx) / b) for d in per_clf for idx in d.values()),
    )
    rows = [row for r in win_rows for row in r]
    timed_pair("mixed", k, rows, per_row_mixed, swap_mixed, batches, last_mixed)
    return out


def _num(x: float | None, digits: int = 2) -> str:
    if x is None or not np.isfinite(x):
        return "–"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.{digits}f}"


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n:,} B ({n / 2**20:.2f} MiB)"


def policies_section(
    p: PolicyReport, flops: FlopCount | None = None, peak: float | None = None
) -> list[str]:
    """The markdown of the policies section."""
    lines = ["## 6. Several classifiers: per-row LoRA vs swap-and-rerun", ""]
    lines += [
        f"{p.comments} comments (the texts above), batch {p.batch}, every call a fixed "
        f"`[{p.batch}, {p.length}]` shape (no length buckets: both ways do the same backbone "
        "work per row), `jit_compile=True` (the worker's default); every graph compiled before the "
        f"clock starts, then per-row and swap-and-rerun timed in turn, median of {p.repeats}. "
        "**per-row**: one `ClassifierSet` with the k adapters, the k rows of each comment "
        "interleaved so every batch mixes classifiers. **swap**: k `AgileClassifier`s on the "
        "same backbone, a whole pass each, its adapter written into the backbone's LoRA slot "
        "first; at k = 1 that is one classifier alone, the single-adapter reference. **mixed**: "
        "comments arrive one batch at a time, even ones to the 1st classifier and odd ones to "
        "the 3 others; per-row packs a window's rows into full batches, swap runs a partial "
        f"batch per classifier. Adapters: {p.adapters_source}. Δp: per-row against each "
        "classifier alone on the same rows.",
        "",
    ]
    if p.rows:
        lines += [
            "| Traffic | k | comments | rows | per-row comments/s | per-row rows/s "
            "| swap comments/s | swap rows/s | per-row / swap | per-row rows/s vs 1 adapter "
            "| batch fill per-row | batch fill swap | adapter writes / swap pass "
            "| max abs Δp vs alone |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        single = p.single
        for r in p.rows:
            traffic = "all k per comment" if r.traffic == "all" else "mixed: 1 or 3 per comment"
            vs = (
                f"{100 * (r.per_row_rps / single.swap_rps - 1):+.1f} %"
                if single is not None
                else "–"
            )
            lines.append(
                f"| {traffic} | {r.k} | {r.comments} | {r.rows} | {_num(r.per_row_cps)} | "
                f"{_num(r.per_row_rps)} | {_num(r.swap_cps)} | {_num(r.swap_rps)} | "
                f"{r.per_row_cps / r.swap_cps:.2f}x | {vs} | {r.per_row_fill:.2f} | "
                f"{r.swap_fill:.2f} | {_num(r.writes_per_pass, 1)} | {r.max_dp:.1e} |"
            )
        lines.append("")
        if single is not None:
            extra = statistics.median(single.per_row_s) / statistics.median(single.swap_s) - 1
            lines += [
                f"**Per-row LoRA against a single adapter** (k = 1, same rows): per-row "
                f"{_num(single.per_row_cps)} comments/s, one `AgileClassifier` "
                f"{_num(single.swap_cps)}: per-row takes {100 * extra:+.1f} % time. The "
                "single adapter's LoRA is merged into the kernel; per-row adds a gathered "
                "`(x A_i) B_i` per row and layer.",
                "",
            ]
    bound = ""
    if flops is not None and peak:
        bound = (
            f" At the measured peak of {peak:.1f} GFLOP/s the backbone bounds either way to "
            f"{_num(peak * 1e9 / flops.label_path)} rows/s at {flops.sequence_length} tokens."
        )
    lines += [
        "**The bound**: a row costs the same backbone FLOPs whichever adapter it uses (a "
        "rank-4 LoRA on q/v adds < 0.1 %), so per-row and swap-and-rerun do the same work per "
        "row and, compute-bound on a CPU, reach about the same rows/s; k classifiers cost k "
        f"times a comment's work either way.{bound} Per-row's gains are elsewhere: one compiled "
        "graph for any mix of classifiers, no adapter writes between passes, and full batches "
        "when a window of comments is routed to different classifiers (the mixed row's fill).",
        "",
    ]
    if p.bytes_per_slot:
        k_lo, k_hi = COUNTS[0], COUNTS[-1]
        lines += [
            "| Memory | bytes |",
            "|---|---:|",
            f"| backbone parameters (held once, shared by every classifier) "
            f"| {_mib(p.backbone_bytes)} |",
            f"| LoRA factors per extra classifier (`stack.nbytes_per_slot()`) "
            f"| {_mib(p.bytes_per_slot)} |",
        ]
        for k in (k_lo, k_hi):
            if k in p.rss_build:
                lines.append(
                    f"| RSS growth building the set of {k} ({p.capacity[k]} stack slots incl. "
                    f"identity and spares); then compiling its graph | {_mib(p.rss_build[k])}; "
                    f"{_mib(p.rss_compile[k])} |"
                )
        if k_lo in p.rss_build and k_hi in p.rss_build:
            slots = p.capacity[k_hi] - p.capacity[k_lo]
            per = (p.rss_build[k_hi] - p.rss_build[k_lo]) / slots
            lines.append(
                f"| RSS growth per extra classifier ((set of {k_hi} − set of {k_lo}) / {slots} "
                f"slots) | {_mib(int(per))} |"
            )
        lines += [
            "",
            f"RSS read as {p.rss_source}. The backbone is in memory once; an extra classifier "
            "costs its LoRA factors in the stack (the stack keeps a host copy of them next to "
            "the variables, and each loaded adapter its own arrays), not another model or "
            "graph; RSS moves in allocator-sized steps, so its per-classifier figure is rough.",
            "",
        ]
    if p.note:
        lines += [p.note, ""]
    return lines

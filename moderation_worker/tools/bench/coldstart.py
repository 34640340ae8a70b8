"""`coldstart` section: process start → `/health` ready → first verdict, before and after.

The measurement itself is `moderation_worker.tools.cold_start` (it starts real worker
processes against a broker), handed in by the CLI as `BenchEdges.cold_start`; this module
only decides whether to run it and words the table.
"""

from __future__ import annotations

from typing import Any

from moderation_worker.tools.bench.options import DEFAULT_SECTIONS, BenchEdges, BenchOptions, log

EXPLAINED = [
    "What the columns change: *before* loads the cached conversion through Keras' "
    "`.weights.h5` (zero-filled variables, then an h5py read and an assign per variable) and "
    "compiles every length bucket from scratch. Since then the conversion is also kept as one "
    "flat file (`model/weights_cache.py`), memory-mapped, each variable created straight from "
    "its bytes in one pass (identical weights, tested); and compiled shapes persist in "
    "`[speed] compile_cache_dir` (XLA's persistent cache on TensorFlow, JAX's compilation "
    "cache on JAX). The *first start* fills an empty cache; the *second start* reads it. "
    "The CPU-second rows (the worker process's user + system time, every thread) are what "
    "each phase costs on a machine shared with other jobs, where wall seconds vary.",
    "",
    "What the cache cannot remove on TensorFlow: each shape's first call still traces the "
    "Keras predict function and lowers the graph to XLA (TensorFlow computes the cache key "
    "from the lowered module), so a cached shape costs that part, not the XLA compile. "
    "Importing TensorFlow and Keras is most of the *imports* row. Every shape is compiled "
    "before the worker starts its web server and joins the group, so `/health` never says "
    "ready before the warm-up is done.",
    "",
]


def bench_coldstart(options: BenchOptions, edges: BenchEdges) -> Any:
    """The `ColdStartReport`, or a string saying why it was not measured."""
    if options.quick and tuple(options.sections) == DEFAULT_SECTIONS:
        return "Not measured in a `--quick` run of every section (it starts worker processes)."
    cold_start = getattr(edges, "cold_start", None)
    if cold_start is None or edges.settings is None:
        return "Not measured: the worker process measurement is not available."
    log("cold start: starting the real worker three times (before, first, second start)")
    try:
        return cold_start(edges.settings(), model=options.model, command=options.command)
    except Exception as exc:  # keep the other sections' numbers
        log(f"cold start failed: {exc!r}")
        return f"Cold-start run failed: `{exc!r}`"[:400]


def coldstart_section(result: Any) -> list[str]:
    """Markdown lines of the section (`result` from `bench_coldstart`)."""
    if isinstance(result, str):
        return ["## 7. Cold start", "", result, ""]
    from moderation_worker.tools.cold_start_report import render

    return render(result, heading="## 7. Cold start") + EXPLAINED

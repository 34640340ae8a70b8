"""What one bench run measures (`BenchOptions`), what it needs from the edges (`BenchEdges`),
its progress lines, and the comments it scores."""

from __future__ import annotations

import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from moderation_worker.model.classifier import LoadedModel
from moderation_worker.tools.data import FILLER_WORDS

ETHOS_CSV = Path("/work/shared/data/ethos/Ethos_Dataset_Binary.csv")
SECTIONS = ("scoring", "tuning", "length", "threads", "pipeline", "policies", "peer", "gpu")
SECTIONS += ("coldstart",)  # real worker processes started before/after (tools/cold_start)
#: What a run measures unless `--sections` says otherwise: `gpu` only when asked for, since
#: on a CPU its Gemma 2B-sized sweep takes hours (`scripts/gpu-bench.sh` runs it on a GPU).
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "gpu")
LENGTH_BUCKETS = (64, 96)  # the worker's default `length_buckets`

ModelLoader = Callable[..., LoadedModel]


@dataclass(frozen=True)
class BenchOptions:
    """What one bench run measures and how hard.

    Args:
        model: model source spec (`gemma3-270m`, `tiny`, `preset:NAME`).
        batch_sizes: batch sizes of the scoring table.
        repeats: timed repeats per measurement; the median is reported.
        codelab_calls: timed single-prompt calls of path (a).
        tuning_batch: batch size the tuning knobs are compared at.
        bucket_batches: batch sizes of the length-bucket comparison.
        bucket_texts: how many real comments the bucket comparison scores per pass.
        length_batches: batch sizes of the length-aware batching comparison.
        length_texts: comments per pass of that comparison (a stream of ETHOS comments).
        matmul_sizes: square float32 matmul sizes tried for the machine's peak.
        sections: which parts to run (see `SECTIONS`).
        quick: tiny counts; what the test suite runs.
        out: where the markdown goes (`quick_defaults`: a fresh temporary file).
        command: the command line, written into the file.
        ethos_csv: ETHOS file for realistic comment lengths (generated texts when absent).
        pipeline_events: events per pipeline throughput run (trivial, real scorer).
        peer_texts: comments the llama.cpp peer row and our worker path both score.
        gpu_batches: batch sizes of the `gpu` section.
        gpu_dtypes: dtypes of the `gpu` section.
        gpu_call_budget_s: a `gpu` call slower than this skips that sweep's larger batches.
    """

    model: str = "gemma3-270m"
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64)
    repeats: int = 3
    codelab_calls: int = 3
    tuning_batch: int = 8
    bucket_batches: tuple[int, ...] = (1, 8, 32)
    bucket_texts: int = 96
    length_batches: tuple[int, ...] = (8, 32, 64)
    length_texts: int = 256
    matmul_sizes: tuple[int, ...] = (1024, 2048, 4096)
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    quick: bool = False
    out: Path = Path("BENCHMARKS.md")
    command: str = ""
    ethos_csv: Path = ETHOS_CSV
    pipeline_events: tuple[int, int] = (4000, 96)
    peer_texts: int = 198
    gpu_batches: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    gpu_dtypes: tuple[str, ...] = ("bfloat16", "float32")
    gpu_call_budget_s: float = 60.0

    @classmethod
    def quick_defaults(cls, **overrides: Any) -> BenchOptions:
        """Tiny model and counts: exercises every code path in well under a minute.

        Its numbers mean nothing, so unless `out` is given the table goes to a temporary file:
        a quick run never overwrites the repository's BENCHMARKS.md.
        """
        if overrides.get("out") is None:
            overrides["out"] = quick_out_path()
        base = cls(
            model="tiny",
            batch_sizes=(1, 8),
            repeats=2,
            codelab_calls=2,
            tuning_batch=8,
            bucket_batches=(8,),
            bucket_texts=16,
            length_batches=(4,),
            length_texts=24,
            matmul_sizes=(256, 512),
            quick=True,
            pipeline_events=(300, 48),
            peer_texts=4,
            gpu_batches=(2, 4),
        )
        return replace(base, **overrides)


@dataclass
class BenchEdges:
    """What the bench needs from `adapters/`, handed in by the composition root (the CLI).

    Args:
        load_model: `load_model_source(spec, dtype=None) -> LoadedModel`.
        measure_pipeline: `tools.pipeline_bench.measure_pipeline`, or None when absent.
        broker: a context-manager factory for an embedded broker with a `.url` (Tansu).
        trivial_scorer: factory `(batch_size) -> ProbabilityModel` with no network.
        settings: factory `(**overrides) -> Settings` for pipeline runs.
        child_command: argv prefix that runs `moderation-worker bench` in a fresh process.
        cold_start: `tools.cold_start.measure_cold_start`, for the `coldstart` section.
        pipeline_texts: `(n) -> texts` the pipeline run sends, to time the model alone on them.
    """

    load_model: ModelLoader
    measure_pipeline: Callable[..., dict[str, Any]] | None = None
    broker: Callable[[], Any] | None = None
    trivial_scorer: Callable[[int], Any] | None = None
    settings: Callable[..., Any] | None = None
    child_command: Sequence[str] = (sys.executable, "-m", "moderation_worker.cli", "bench")
    pipeline_texts: Callable[[int], list[str]] | None = None
    cold_start: Callable[..., Any] | None = None


def quick_out_path() -> Path:
    """A fresh temporary file for a `--quick` table (its folder is left for the reader)."""
    return Path(tempfile.mkdtemp(prefix="moderation-worker-bench-")) / "BENCHMARKS.md"


def log(message: str) -> None:
    """Progress on stderr, one line per step, so a long run shows where it is."""
    print(f"bench {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def bench_texts(options: BenchOptions, n: int, seed: int = 0) -> tuple[list[str], str]:
    """Realistic comments: the ETHOS test split when the file is there, else generated ones.

    Length matters only for the length-bucket comparison; the fixed-shape paths cost the same
    for any text. Returns the texts and a description of where they came from.
    """
    if options.ethos_csv and Path(options.ethos_csv).is_file():
        from moderation_worker.tools.data import ethos_splits, load_ethos

        test = list(ethos_splits(load_ethos(options.ethos_csv)).test.texts)
        texts = [test[i % len(test)] for i in range(n)]
        return texts, f"ETHOS test split ({len(test)} comments, {options.ethos_csv})"
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(3.0, 0.7, size=n).astype(int), 3, 150)
    texts = [" ".join(rng.choice(FILLER_WORDS, size=k)) for k in lengths]
    return texts, "generated (ETHOS file not found): 3-150 words, log-normal lengths"


def shell_command(argv: Sequence[str]) -> str:
    """The command line as typed, for the report."""
    return "moderation-worker " + " ".join(shlex.quote(a) for a in argv)

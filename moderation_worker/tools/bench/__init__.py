"""`moderation-worker bench`: the scorer's speed measured, next to the naive way and the bound.

One run, one model, one table (BENCHMARKS.md; a `--quick` run writes a temporary file):

1. Scoring, comments/s at several batch sizes for three paths over the same backbone:
   (a) the codelab's way, one prompt per call with full-vocabulary logits at every position;
   (b) the same logits, batched; (c) the batched last-position label-token head
   (`LabelTokenScorer`, what the worker runs). FLOPs per comment are counted from the backbone
   config (`count_flops`) and set against this machine's own measured matmul peak, so the table
   says how far each path is from the physical bound, not just from the others.
2. Tuning knobs measured before/after on the same machine: XLA, dtype, length buckets on real
   comment lengths, TF thread pools (in child processes: they are fixed at TF start), and the
   share of work a cached shared prompt prefix would save.
3. The stream pipeline (broker, Faust, codecs, batching) with a trivial and the real scorer,
   through the adapters' `measure_pipeline`, when the caller provides it.
4. Several classifiers on one backbone: per-row LoRA (`ClassifierSet`) against swap-and-rerun
   (`AgileClassifier`s sharing the LoRA slot) with 1, 2 and 4 classifiers and mixed traffic,
   and the memory an extra classifier costs.

The report names the accelerator and Keras backend the run actually used (`detect_accelerator`).
The core knows nothing of the edges: the caller (`cli.cmd_bench`) passes the model loader and
the pipeline measurement in as `BenchEdges`. Everything here is `keras.ops`/numpy, so the same
code times a JAX or torch backend.

The parts, by role:
    options       `BenchOptions`, `BenchEdges`, progress lines, the comments scored
    flops         FLOP accounting, the matmul peak, the timer
    scoring       paths (a), (b), (c)
    prefix_cache  the shared-prefix KV cache prototype
    tuning        XLA, dtype, prefix cache, length buckets, thread pools (`run_child`)
    pipeline      broker + Faust + codecs + batching, trivial vs real scorer
    policies      1, 2, 4 classifiers: per-row LoRA vs swap-and-rerun, memory per classifier
    machine       CPU, accelerator, backend, versions, competing load
    report        `BenchReport` and its markdown
    runner        `run_bench`
"""

from moderation_worker.tools.bench.flops import (
    FlopCount,
    count_flops,
    matmul_peak,
    memory_available_bytes,
    shaped_matmul,
    timed,
)
from moderation_worker.tools.bench.machine import (
    Accelerator,
    OtherCpu,
    detect_accelerator,
    machine_info,
    versions,
)
from moderation_worker.tools.bench.options import (
    ETHOS_CSV,
    LENGTH_BUCKETS,
    SECTIONS,
    BenchEdges,
    BenchOptions,
    ModelLoader,
    bench_texts,
    log,
    quick_out_path,
    shell_command,
)
from moderation_worker.tools.bench.pipeline import (
    PipelineRow,
    measure_pipelines,
    pipeline_summary,
    scale_note,
)
from moderation_worker.tools.bench.policies import (
    PolicyReport,
    PolicyRow,
    measure_policies,
    policies_section,
)
from moderation_worker.tools.bench.prefix_cache import PrefixCachedLabelModel, PrefixCachedScorer
from moderation_worker.tools.bench.report import BenchReport, flop_section, render, worker_defaults
from moderation_worker.tools.bench.runner import run_bench
from moderation_worker.tools.bench.scoring import (
    FullVocabPath,
    Measurement,
    causal_lm_for,
    measure_scoring,
    time_label_head,
)
from moderation_worker.tools.bench.tuning import (
    THREAD_VARIANTS,
    TuningRow,
    bucket_use,
    measure_threads,
    measure_tuning,
    run_child,
    score_pass,
    warm_buckets,
)

__all__ = [
    "ETHOS_CSV",
    "LENGTH_BUCKETS",
    "SECTIONS",
    "THREAD_VARIANTS",
    "Accelerator",
    "BenchEdges",
    "BenchOptions",
    "BenchReport",
    "FlopCount",
    "FullVocabPath",
    "Measurement",
    "ModelLoader",
    "OtherCpu",
    "PipelineRow",
    "PolicyReport",
    "PolicyRow",
    "PrefixCachedLabelModel",
    "PrefixCachedScorer",
    "TuningRow",
    "bench_texts",
    "bucket_use",
    "causal_lm_for",
    "count_flops",
    "detect_accelerator",
    "flop_section",
    "log",
    "machine_info",
    "matmul_peak",
    "measure_pipelines",
    "measure_policies",
    "measure_scoring",
    "measure_threads",
    "measure_tuning",
    "memory_available_bytes",
    "pipeline_summary",
    "policies_section",
    "quick_out_path",
    "render",
    "run_bench",
    "run_child",
    "scale_note",
    "score_pass",
    "shaped_matmul",
    "shell_command",
    "time_label_head",
    "timed",
    "versions",
    "warm_buckets",
    "worker_defaults",
]

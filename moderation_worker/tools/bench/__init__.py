"""`moderation-worker bench`: the scorer's speed measured, next to the naive way and the bound.

One run, one model, one table (BENCHMARKS.md; a `--quick` run writes a temporary file):

1. Scoring, comments/s at several batch sizes for three paths over the same backbone:
   (a) the codelab's way, one prompt per call with full-vocabulary logits at every position;
   (b) the same logits, batched; (c) the batched last-position label-token head
   (`LabelTokenScorer`, what the worker runs). FLOPs per comment are counted from the backbone
   config (`count_flops`) and set against this machine's own measured matmul peak, so the table
   says how far each path is from the physical bound, not just from the others.
2. Tuning knobs measured before/after on the same machine: XLA, dtype, the shared-prefix KV
   cache, TF thread pools (in child processes: they are fixed at TF start); and `length`:
   length queues and the prefix cache through the worker's own batching on a stream of ETHOS
   and of tweet-length comments at batch 8, 32, 64 (`length_batching`).
3. The stream pipeline (broker, Faust, codecs, batching) with a trivial and the real scorer,
   through the adapters' `measure_pipeline`, when the caller provides it.
4. Several classifiers on one backbone: per-row LoRA (`ClassifierSet`) against swap-and-rerun
   (`AgileClassifier`s sharing the LoRA slot) with 1, 2 and 4 classifiers and mixed traffic,
   and the memory an extra classifier costs.
5. `peer`: llama.cpp (llama-cpp-python, the `peer` extra) on the same GGUF, prompt token ids
   and texts as the worker's `AgileClassifier`, one prompt per call and packed, as a ratio.
6. `coldstart`: the real worker process started before/first/second (`tools/cold_start`):
   every phase to `/health` ready and the first verdict, CPU seconds, resident memory.
7. `gpu` (only when named; `scripts/gpu-bench.sh` runs it under JAX): Gemma 3 270M and a Gemma
   2B-sized random-weight model at batch 8-256, bf16 and float32, TFLOP/s against the card's
   dense peak; on a CPU it says its figures are the CPU's.

The report names the accelerator and Keras backend the run actually used (`detect_accelerator`).
The core knows nothing of the edges: the caller (`cli.cmd_bench`) passes the model loader and
the pipeline measurement in as `BenchEdges`. Everything here is `keras.ops`/numpy, so the same
code times a JAX or torch backend.

The parts, by role:
    options       `BenchOptions`, `BenchEdges`, progress lines, the comments scored
    flops         FLOP accounting, the matmul peak, the timer
    scoring       paths (a), (b), (c)
    length_batching  length queues and the prefix cache through the worker's own batching
    tuning        XLA, dtype, prefix cache, thread pools (`run_child`)
    pipeline      broker + Faust + codecs + batching, trivial vs real scorer
    policies      1, 2, 4 classifiers: per-row LoRA vs swap-and-rerun, memory per classifier
    peer          llama.cpp on the same GGUF and prompts (`LlamaCppLabelScorer`)
    gpu           the GPU sweep and the known cards' peaks
    coldstart     worker starts, phase by phase
    machine       CPU, accelerator, backend, versions, competing load
    report        `BenchReport` and its markdown
    runner        `run_bench`
"""

from moderation_worker.tools.bench.flops import (
    FlopCount,
    count_flops,
    gate_dim_reduction,
    matmul_peak,
    memory_available_bytes,
    shaped_matmul,
    timed,
)
from moderation_worker.tools.bench.gpu import (
    GEMMA3_270M_CONFIG,
    GEMMA_2B_CONFIG,
    RANDOM_MODELS,
    GpuReport,
    GpuRow,
    bench_loader,
    dense_peak,
    gpu_section,
    measure_gpu,
    random_model,
)
from moderation_worker.tools.bench.machine import (
    Accelerator,
    OtherCpu,
    detect_accelerator,
    machine_info,
    versions,
)
from moderation_worker.tools.bench.options import (
    DEFAULT_SECTIONS,
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
from moderation_worker.tools.bench.peer import (
    SKIP_NOT_INSTALLED,
    LlamaCppLabelScorer,
    PeerReport,
    PeerRow,
    measure_peer,
    peer_section,
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
    "DEFAULT_SECTIONS",
    "ETHOS_CSV",
    "GEMMA3_270M_CONFIG",
    "GEMMA_2B_CONFIG",
    "RANDOM_MODELS",
    "LENGTH_BUCKETS",
    "SECTIONS",
    "SKIP_NOT_INSTALLED",
    "THREAD_VARIANTS",
    "Accelerator",
    "BenchEdges",
    "BenchOptions",
    "BenchReport",
    "FlopCount",
    "FullVocabPath",
    "GpuReport",
    "GpuRow",
    "LlamaCppLabelScorer",
    "Measurement",
    "ModelLoader",
    "OtherCpu",
    "PeerReport",
    "PeerRow",
    "PipelineRow",
    "PolicyReport",
    "PolicyRow",
    "TuningRow",
    "bench_loader",
    "bench_texts",
    "bucket_use",
    "causal_lm_for",
    "count_flops",
    "dense_peak",
    "detect_accelerator",
    "flop_section",
    "gate_dim_reduction",
    "gpu_section",
    "log",
    "machine_info",
    "matmul_peak",
    "measure_gpu",
    "measure_peer",
    "measure_pipelines",
    "measure_policies",
    "measure_scoring",
    "measure_threads",
    "measure_tuning",
    "memory_available_bytes",
    "peer_section",
    "pipeline_summary",
    "policies_section",
    "quick_out_path",
    "random_model",
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

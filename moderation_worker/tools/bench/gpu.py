"""The `gpu` section: label-head throughput of Gemma 3 270M and a Gemma 2B-sized model, bf16
and float32, batch 8-256, with achieved TFLOP/s against the card's published dense peak.

Why: the worker scores on a CPU today; whether a GPU pays off depends on how close batched
label-token scoring gets to the card's peak and at which batch size it saturates. Speed does not
depend on the weights, so the 2B-sized model is a KerasHub `GemmaBackbone` with gemma_2b's
config and random weights (no Kaggle download); the 270M is the run's own model. Both score
fixed `[batch, 128]` rows through `LabelTokenScorer`, what the worker runs.

`scripts/gpu-bench.sh` runs this section alone under JAX (no TensorFlow on GPU images) and
writes BENCHMARKS-gpu.md. On a machine without an accelerator the section still runs and says
plainly that its figures are the CPU's, not a GPU's.
"""

from __future__ import annotations

import gc
import re
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from moderation_worker.model.classifier import LoadedModel
from moderation_worker.model.prompts import PromptEncoder, PromptSettings
from moderation_worker.model.scoring import LabelTokenScorer
from moderation_worker.tools.bench.flops import count_flops, timed
from moderation_worker.tools.bench.machine import detect_accelerator
from moderation_worker.tools.bench.options import BenchOptions, log
from moderation_worker.tools.bench.scoring import build_backbone_copy

#: KerasHub's gemma_2b_en config (its 18 blocks' gates are intermediate_dim // 2 = 16384 wide;
#: with these values the backbone has 2,506,172,416 parameters, the preset's stated count).
GEMMA_2B_CONFIG = {
    "vocabulary_size": 256_000,
    "num_layers": 18,
    "num_query_heads": 8,
    "num_key_value_heads": 1,
    "hidden_dim": 2048,
    "intermediate_dim": 32_768,
    "head_dim": 256,
}
#: The same architecture in miniature, for tests and `--quick` runs on a CPU.
GEMMA_TINY_CONFIG = {
    "num_layers": 2,
    "num_query_heads": 2,
    "num_key_value_heads": 1,
    "hidden_dim": 64,
    "intermediate_dim": 256,
    "head_dim": 32,
}

#: Gemma 3 270M's config as the GGUF converter builds it (`gguf_gemma3_reader.backbone_config`).
GEMMA3_270M_CONFIG = {
    "vocabulary_size": 262_144,
    "image_size": None,
    "num_layers": 18,
    "num_query_heads": 4,
    "num_key_value_heads": 1,
    "hidden_dim": 640,
    "intermediate_dim": 2048,
    "head_dim": 256,
    "query_head_dim_normalize": True,
    "use_query_key_norm": True,
    "use_post_ffw_norm": True,
    "use_post_attention_norm": True,
    "use_sliding_window_attention": True,
    "sliding_window_size": 512,
    "layer_norm_epsilon": 1e-6,
    "vision_encoder": None,
}
RANDOM_PREFIX = "random:"
#: `--model random:NAME`: the architecture with random weights, for speed alone (a GPU image
#: without the GGUF package or Kaggle access). The tiny tokenizer makes the prompts.
RANDOM_MODELS = {"gemma3-270m": ("Gemma3Backbone", GEMMA3_270M_CONFIG)}
RANDOM_MODELS["gemma-2b"] = ("GemmaBackbone", GEMMA_2B_CONFIG)


def random_model(spec: str, dtype: str | None = None) -> LoadedModel:
    """`random:gemma3-270m` or `random:gemma-2b`: same shapes as the real model, random weights."""
    import keras_hub

    from moderation_worker.model.sources import tiny_tokenizer_proto
    from moderation_worker.model.tokenizer import SentencePieceTokenizer

    name = spec.removeprefix(RANDOM_PREFIX)
    if name not in RANDOM_MODELS:
        raise ValueError(
            f"unknown {spec!r}: use {', '.join(RANDOM_PREFIX + n for n in RANDOM_MODELS)}"
        )
    cls, config = RANDOM_MODELS[name]
    backbone = getattr(keras_hub.models, cls)(**config, dtype=dtype or "float32")
    tokenizer = SentencePieceTokenizer(tiny_tokenizer_proto(seed=0))
    return LoadedModel(backbone, tokenizer, f"{name} (random weights)")


def bench_loader(load_model_source: Callable[..., LoadedModel]) -> Callable[..., LoadedModel]:
    """`load_model_source` that also knows the `random:` specs (the CLI hands it to `bench`)."""

    def load(spec: str, dtype: str | None = None) -> LoadedModel:
        if spec.startswith(RANDOM_PREFIX):
            return random_model(spec, dtype)
        return load_model_source(spec, dtype)

    return load


#: Dense (no sparsity) peaks in TFLOP/s: (bfloat16 on tensor cores, float32 without them).
#: From NVIDIA's data sheets: H100 Tensor Core GPU (SXM5: BF16 1,979 with sparsity, FP32 67;
#: PCIe: 1,513 / 51), H200 Tensor Core GPU (SXM: as H100 SXM), A100 Tensor Core GPU (BF16 312,
#: FP32 19.5), L4 Tensor Core GPU (BF16 242 with sparsity, FP32 30.3). Matched against the
#: device name in order; NVL and other variants not listed report "peak unknown".
DENSE_PEAKS_TFLOPS: tuple[tuple[str, float, float], ...] = (
    (r"H100.*PCIe", 756.0, 51.0),
    (r"H[12]00(?!.*(NVL|PCIe))", 989.0, 67.0),
    (r"A100", 312.0, 19.5),
    (r"\bL4\b", 121.0, 30.3),
)


def dense_peak(device: str, dtype: str) -> float | None:
    """The published dense peak of `device` (e.g. `jax.devices()[0].device_kind`) in TFLOP/s."""
    for pattern, bf16, fp32 in DENSE_PEAKS_TFLOPS:
        if re.search(pattern, device):
            return bf16 if dtype == "bfloat16" else fp32
    return None


@dataclass
class GpuRow:
    """One model, dtype and batch size: median time per call and what it achieved."""

    model: str
    dtype: str
    batch: int
    seconds: list[float] = field(default_factory=list)
    flops_per_comment: float = 0.0
    peak_tflops: float | None = None
    note: str = ""

    @property
    def ms_per_batch(self) -> float:
        return 1e3 * statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def comments_per_s(self) -> float:
        return self.batch / statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def tflops(self) -> float:
        return self.flops_per_comment * self.comments_per_s / 1e12


@dataclass
class GpuReport:
    """Where the section ran and its rows."""

    device: str = ""
    on_accelerator: bool = False
    backend: str = ""
    repeats: int = 0
    precision: str = ""
    rows: list[GpuRow] = field(default_factory=list)


def is_out_of_memory(exc: BaseException) -> bool:
    """JAX's RESOURCE_EXHAUSTED, TensorFlow's ResourceExhaustedError, torch's OOM, MemoryError."""
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, MemoryError) or any(
        k in text for k in ("resource_exhausted", "resourceexhausted", "out of memory")
    )


def gpu_models(model: LoadedModel, options: BenchOptions) -> Iterator[tuple[str, Callable]]:
    """(name, build(dtype) -> backbone): the run's model, then the Gemma 2B-sized random one."""
    import keras_hub

    def own(dtype: str) -> Any:
        same = model.backbone.dtype_policy.name == dtype
        return model.backbone if same else build_backbone_copy(model.backbone, dtype)

    yield model.name, own
    if options.model == RANDOM_PREFIX + "gemma-2b":
        return  # the run's model is the 2B-sized one already
    tiny = options.model.startswith("tiny")
    config = dict(GEMMA_TINY_CONFIG, vocabulary_size=model.backbone.vocabulary_size)
    config = config if tiny else GEMMA_2B_CONFIG
    name = "tiny Gemma (random weights)" if tiny else "Gemma 2B-sized (random weights)"
    yield name, lambda dtype: keras_hub.models.GemmaBackbone(**config, dtype=dtype)


def _precision(backend: str) -> str:
    if backend != "jax":
        return ""
    import jax

    value = jax.config.jax_default_matmul_precision
    return (
        f"JAX `jax_default_matmul_precision` = {value!r}: at the default, XLA may run float32 "
        "matmuls as TF32 on tensor cores, so float32 can beat the float32 peak."
    )


def measure_gpu(model: LoadedModel, options: BenchOptions, texts: Sequence[str]) -> GpuReport:
    """Every model x dtype x batch size; a batch that runs out of memory ends that dtype's sweep."""
    import keras

    accelerator = detect_accelerator()
    backend = keras.backend.backend()
    report = GpuReport(
        accelerator.describe(), accelerator.found, backend, options.repeats, _precision(backend)
    )
    device = accelerator.devices[0] if accelerator.devices else ""
    encoder = PromptEncoder(model.tokenizer, PromptSettings())
    length = encoder.settings.sequence_length
    for name, build in gpu_models(model, options):
        for dtype in options.gpu_dtypes:
            log(f"gpu: {name}, {dtype}")
            try:
                backbone = build(dtype)
            except Exception as exc:  # noqa: BLE001 - the next model may still fit
                why = "out of memory" if is_out_of_memory(exc) else f"failed: {exc!r}"[:160]
                report.rows.append(GpuRow(name, dtype, 0, note=f"model not built: {why}"))
                continue
            vocab = int(backbone.vocabulary_size)
            labels = [i % vocab for i in encoder.label_ids]  # random weights: any id in range
            scorer = LabelTokenScorer(backbone, labels, "auto")  # XLA under JAX
            flops = count_flops(backbone.get_config(), length, len(labels)).label_path
            for batch_size in options.gpu_batches:
                row = GpuRow(name, dtype, batch_size, [], flops, dense_peak(device, dtype))
                report.rows.append(row)
                batch = encoder.encode([texts[i % len(texts)] for i in range(batch_size)])
                batch = type(batch)(batch.token_ids % vocab, batch.padding_mask, batch.last_index)
                try:
                    row.seconds = timed(lambda b=batch, s=scorer: s.logits(b), options.repeats)
                except Exception as exc:  # noqa: BLE001 - keep the rows measured so far
                    if is_out_of_memory(exc):
                        row.note = "out of memory: larger batches skipped"
                        log(f"gpu: {name} {dtype} batch {batch_size}: out of memory")
                        break
                    row.note = f"failed: {exc!r}"[:160]
                    continue
                log(f"gpu: batch {batch_size}: {row.comments_per_s:.1f} comments/s")
                if statistics.median(row.seconds) > options.gpu_call_budget_s:
                    row.note = (
                        f"calls over {options.gpu_call_budget_s:.0f} s: larger batches skipped"
                    )
                    break
            scorer = backbone = None  # free this dtype's weights before the next
            gc.collect()
    return report


def gpu_section(report: GpuReport) -> list[str]:
    """The markdown lines of the GPU table, with the CPU disclaimer when no GPU was used."""
    lines = ["## 4. GPU: label head by batch size, bfloat16 and float32", ""]
    if not report.on_accelerator:
        lines += [
            f"> **CPU figures, not GPU figures**: {report.device}. Every row below measures "
            "this machine's CPU and says nothing about a GPU; `scripts/gpu-bench.sh` on a GPU "
            "machine measures one.",
            "",
        ]
    lines += [
        f"Device: {report.device}. Fixed `[batch, 128]` rows of the same prompts through "
        "`LabelTokenScorer` (what the worker runs; XLA under JAX), median of "
        f"{report.repeats} calls after one that compiles. TFLOP/s = path (c) FLOPs per comment "
        "(`count_flops`) x comments/s; % of the card's dense peak for that dtype from NVIDIA's "
        "data sheets (H100/H200 SXM bf16 989, fp32 67; A100 312 / 19.5; L4 121 / 30.3).",
        "",
    ]
    if report.precision:
        lines += [report.precision, ""]
    lines += [
        "| Model | dtype | Batch | comments/s | ms/batch | GFLOP/comment | achieved TFLOP/s "
        "| % of peak | Note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report.rows:
        if not r.seconds:
            lines.append(
                f"| {r.model} | {r.dtype} | {r.batch or '–'} | – | – | – | – | – | {r.note} |"
            )
            continue
        peak = "peak unknown" if r.peak_tflops is None else f"{100 * r.tflops / r.peak_tflops:.1f}"
        lines.append(
            f"| {r.model} | {r.dtype} | {r.batch} | {r.comments_per_s:,.1f} | "
            f"{r.ms_per_batch:,.1f} | {r.flops_per_comment / 1e9:.2f} | {r.tflops:.4g} | "
            f"{peak} | {r.note} |"
        )
    return [*lines, ""]


def bench_gpu(model: LoadedModel, options: BenchOptions, texts: Sequence[str]) -> GpuReport:
    """The `gpu` section as the runner calls it: a failure is reported, never raised."""
    try:
        return measure_gpu(model, options, texts)
    except Exception as exc:  # keep the other sections' numbers
        log(f"gpu failed: {exc!r}")
        report = GpuReport(device=detect_accelerator().describe())
        report.rows.append(GpuRow("(failed)", "–", 0, note=f"`{exc!r}`"[:300]))
        return report

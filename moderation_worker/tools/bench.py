"""`moderation-worker bench`: the scorer's speed measured, next to the naive way and the bound.

One run, one model, one table (BENCHMARKS.md):

1. Scoring, comments/s at several batch sizes for three paths over the same backbone:
   (a) the codelab's way, one prompt per call with full-vocabulary logits at every position;
   (b) the same logits, batched; (c) the batched last-position label-token head
   (`LabelTokenScorer`, what the worker runs). FLOPs per comment are counted from the backbone
   config (`count_flops`) and set against this CPU's own measured matmul peak, so the table
   says how far each path is from the physical bound, not just from the others.
2. Tuning knobs measured before/after on the same machine: XLA, dtype, length buckets on real
   comment lengths, TF thread pools (in child processes: they are fixed at TF start), and the
   share of work a cached shared prompt prefix would save.
3. The stream pipeline (broker, Faust, codecs, batching) with a trivial and the real scorer,
   through the adapters' `measure_pipeline`, when the caller provides it.

The core knows nothing of the edges: the caller (`cli.cmd_bench`) passes the model loader and
the pipeline measurement in as `BenchEdges`. Everything here is `keras.ops`/numpy, so the same
code would time a JAX backend.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import ops

from moderation_worker.model.classifier import AgileClassifier, LoadedModel
from moderation_worker.model.prompts import EncodedBatch, PromptEncoder, PromptSettings
from moderation_worker.model.scoring import (
    LabelTokenScorer,
    last_token_hidden,
    output_logits,
    softmax_np,
)

ETHOS_CSV = Path("/work/shared/data/ethos/Ethos_Dataset_Binary.csv")
SECTIONS = ("scoring", "tuning", "threads", "pipeline")
LENGTH_BUCKETS = (32, 64, 96)

ModelLoader = Callable[..., LoadedModel]


# ---------------------------------------------------------------------------------------------
# Options and edges
# ---------------------------------------------------------------------------------------------


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
        matmul_sizes: square float32 matmul sizes tried for the machine's peak.
        sections: which parts to run (see `SECTIONS`).
        quick: tiny counts; what the test suite runs.
        out: where the markdown goes.
        command: the command line, written into the file.
        ethos_csv: ETHOS file for realistic comment lengths (generated texts when absent).
        pipeline_events: events per pipeline throughput run (trivial, real scorer).
    """

    model: str = "gemma3-270m"
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64)
    repeats: int = 3
    codelab_calls: int = 3
    tuning_batch: int = 8
    bucket_batches: tuple[int, ...] = (1, 8, 32)
    bucket_texts: int = 96
    matmul_sizes: tuple[int, ...] = (1024, 2048, 4096)
    sections: tuple[str, ...] = SECTIONS
    quick: bool = False
    out: Path = Path("BENCHMARKS.md")
    command: str = ""
    ethos_csv: Path = ETHOS_CSV
    pipeline_events: tuple[int, int] = (4000, 96)

    @classmethod
    def quick_defaults(cls, **overrides: Any) -> BenchOptions:
        """Tiny model and counts: exercises every code path in well under a minute."""
        base = cls(
            model="tiny",
            batch_sizes=(1, 8),
            repeats=2,
            codelab_calls=2,
            tuning_batch=8,
            bucket_batches=(8,),
            bucket_texts=16,
            matmul_sizes=(256, 512),
            quick=True,
            pipeline_events=(300, 48),
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
        pipeline_texts: `(n) -> texts` the pipeline run sends, to time the model alone on them.
    """

    load_model: ModelLoader
    measure_pipeline: Callable[..., dict[str, Any]] | None = None
    broker: Callable[[], Any] | None = None
    trivial_scorer: Callable[[int], Any] | None = None
    settings: Callable[..., Any] | None = None
    child_command: Sequence[str] = (sys.executable, "-m", "moderation_worker.cli", "bench")
    pipeline_texts: Callable[[int], list[str]] | None = None


def log(message: str) -> None:
    """Progress on stderr, one line per step, so a long run shows where it is."""
    print(f"bench {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# FLOP accounting
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per comment (a multiply-add counts 2) of each scoring path at one sequence length.

    Counted: the q/k/v/o projections, attention scores and the attention-weighted sum over all
    `T` key positions (the dense T x T the kernels compute; causal masking would halve it),
    the gated MLP's three matrices, and the output projection. Not counted: norms, RoPE,
    softmax, embedding lookup: O(T * d) element-wise work, under 0.1 % here.
    """

    sequence_length: int
    per_token_layer: dict[str, float]
    backbone: float
    full_vocab_head: float
    label_head: float
    prefix_tokens: int = 0

    @property
    def full_vocab_path(self) -> float:
        """Paths (a) and (b): backbone plus vocabulary logits at every position."""
        return self.backbone + self.full_vocab_head

    @property
    def label_path(self) -> float:
        """Path (c): backbone plus the label logits at the last real position."""
        return self.backbone + self.label_head

    @property
    def prefix_share(self) -> float:
        """Share of path (c)'s FLOPs a cached shared prompt head would skip (its rows' work)."""
        return self.prefix_tokens / self.sequence_length * self.backbone / self.label_path


def count_flops(
    config: dict[str, Any], sequence_length: int, n_labels: int, prefix_tokens: int = 0
) -> FlopCount:
    """Count FLOPs per comment from a Gemma/Gemma 3 backbone config (`backbone.get_config()`).

    With d = hidden_dim, F = intermediate_dim, L = num_layers, Hq/Hkv query/key-value heads
    of size h, V = vocabulary_size, T = sequence_length, per token and layer:
    projections 2d(Hq h + 2 Hkv h) + 2 Hq h d, attention 4 Hq h T, MLP 6 d F; backbone
    L T (those); output head 2 d V T for full logits, 2 d n_labels + 2 T d for the label head.
    """
    d = float(config["hidden_dim"])
    ffn = float(config["intermediate_dim"])
    layers = int(config["num_layers"])
    hq = float(config["num_query_heads"])
    hkv = float(config["num_key_value_heads"])
    h = float(config["head_dim"])
    vocab = float(config["vocabulary_size"])
    t = float(sequence_length)
    per = {
        "qkv_projection": 2 * d * (hq * h + 2 * hkv * h),
        "output_projection": 2 * hq * h * d,
        "attention": 4 * hq * h * t,
        "mlp": 3 * 2 * d * ffn,
    }
    backbone = layers * t * sum(per.values())
    return FlopCount(
        sequence_length=sequence_length,
        per_token_layer=per,
        backbone=backbone,
        full_vocab_head=2 * d * vocab * t,
        label_head=2 * d * n_labels + 2 * t * d,
        prefix_tokens=prefix_tokens,
    )


# ---------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of `repeats` calls of `fn` after `warmup` untimed ones (compilation, caches)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def matmul_peak(sizes: Sequence[int], repeats: int = 5) -> dict[str, Any]:
    """Best GFLOP/s of square float32 matmuls through `keras.ops` (the backend's BLAS/oneDNN).

    Best, not median: the peak is what the hardware and library can do, and the other
    engineers' jobs on a shared machine only ever make it look lower.
    """
    import keras
    from keras import ops

    best: dict[str, Any] = {"gflops": 0.0, "size": None}
    rng = np.random.default_rng(0)
    for n in sizes:
        a = ops.convert_to_tensor(rng.standard_normal((n, n), dtype=np.float32))
        b = ops.convert_to_tensor(rng.standard_normal((n, n), dtype=np.float32))

        def run(a=a, b=b) -> None:
            keras.ops.convert_to_numpy(ops.sum(ops.matmul(a, b)))

        seconds = min(timed(run, repeats))
        gflops = 2.0 * n**3 / seconds / 1e9
        log(f"matmul {n}x{n}: {gflops:.1f} GFLOP/s")
        if gflops > best["gflops"]:
            best = {"gflops": gflops, "size": n}
    return best


def shaped_matmul(m: int, k: int, n: int, repeats: int = 5) -> float:
    """GFLOP/s of one model-shaped matmul (e.g. the MLP's [B*T, d] x [d, F])."""
    from keras import ops

    rng = np.random.default_rng(1)
    a = ops.convert_to_tensor(rng.standard_normal((m, k), dtype=np.float32))
    b = ops.convert_to_tensor(rng.standard_normal((k, n), dtype=np.float32))
    seconds = min(timed(lambda: ops.convert_to_numpy(ops.sum(ops.matmul(a, b))), repeats))
    return 2.0 * m * k * n / seconds / 1e9


def memory_available_bytes() -> int | None:
    """`MemAvailable` from /proc/meminfo (None off Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------------
# Texts
# ---------------------------------------------------------------------------------------------

_WORDS = (
    "the match last night was great and the referee made a few calls I disagree with thanks "
    "for sharing this recipe I will try it tomorrow with my family you are an idiot and people "
    "like you are trash honestly this thread is going nowhere but the original post had a point"
).split()


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
    texts = [" ".join(rng.choice(_WORDS, size=k)) for k in lengths]
    return texts, "generated (ETHOS file not found): 3-150 words, log-normal lengths"


# ---------------------------------------------------------------------------------------------
# Scoring paths
# ---------------------------------------------------------------------------------------------


def causal_lm_for(backbone: Any, jit_compile: bool | str) -> Any:
    """The KerasHub CausalLM over `backbone`, without a preprocessor: the codelab's model."""
    import keras_hub

    classes = {
        "Gemma3Backbone": keras_hub.models.Gemma3CausalLM,
        "GemmaBackbone": keras_hub.models.GemmaCausalLM,
    }
    cls = classes.get(type(backbone).__name__)
    if cls is None:
        raise ValueError(f"no CausalLM known for {type(backbone).__name__}")
    lm = cls(backbone=backbone, preprocessor=None)
    lm.compile(jit_compile=jit_compile)
    return lm


class FullVocabPath:
    """Paths (a)/(b): full-vocabulary logits at all positions, label columns read on the host."""

    def __init__(self, backbone: Any, label_ids: Sequence[int], jit_compile: bool | str) -> None:
        self.lm = causal_lm_for(backbone, jit_compile)
        self.label_ids = list(label_ids)

    def probabilities(self, token_ids: np.ndarray, padding_mask: np.ndarray, last: np.ndarray):
        logits = self.lm.predict_on_batch({"token_ids": token_ids, "padding_mask": padding_mask})
        rows = np.asarray(logits)[np.arange(len(last)), last][:, self.label_ids]
        return softmax_np(rows)


@dataclass
class Measurement:
    """One timed configuration: comments/s from the median of the repeats."""

    label: str
    batch: int
    seconds: list[float]
    comments_per_call: int
    flops_per_comment: float | None = None
    note: str = ""
    max_dp: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def comments_per_s(self) -> float:
        return self.comments_per_call / self.median

    def gflops(self) -> float | None:
        if self.flops_per_comment is None:
            return None
        return self.flops_per_comment * self.comments_per_s / 1e9


def build_backbone_copy(backbone: Any, dtype: str) -> Any:
    """The same architecture and weights in another dtype (bfloat16 for the dtype knob)."""
    config = {**backbone.get_config(), "dtype": dtype}
    copy = type(backbone).from_config(config)
    copy.set_weights(backbone.get_weights())
    return copy


def measure_scoring(
    model: LoadedModel,
    options: BenchOptions,
    texts: Sequence[str],
    flops: FlopCount,
    jit_compile: bool | str = "auto",
) -> list[Measurement]:
    """Paths (a), (b), (c) at every batch size, with agreement of their probabilities."""
    encoder = PromptEncoder(model.tokenizer, PromptSettings())
    head = LabelTokenScorer(model.backbone, encoder.label_ids, jit_compile)
    head_xla = LabelTokenScorer(model.backbone, encoder.label_ids, True)
    full = FullVocabPath(model.backbone, encoder.label_ids, jit_compile)
    out: list[Measurement] = []
    mem = memory_available_bytes()
    vocab = int(model.backbone.vocabulary_size)
    length = encoder.settings.sequence_length

    # (a) one prompt per call: the codelab's loop. The batch size does not change it.
    one = encoder.encode(texts[:1], batch_size=1)
    log(f"(a) codelab, one prompt per call, [1, {length}] -> [1, {length}, {vocab}] logits")
    seconds = timed(
        lambda: full.probabilities(one.token_ids, one.padding_mask, one.last_index),
        options.codelab_calls,
    )
    p_a = full.probabilities(one.token_ids, one.padding_mask, one.last_index)
    p_c = head.probabilities(one)
    out.append(
        Measurement(
            "(a) codelab: 1 prompt/call, full-vocab logits at all positions",
            1,
            seconds,
            1,
            flops.full_vocab_path,
            max_dp=float(np.abs(p_a - p_c).max()),
        )
    )
    for batch_size in options.batch_sizes:
        batch = encoder.encode([texts[i % len(texts)] for i in range(batch_size)], batch_size)
        logits_bytes = batch_size * length * vocab * 4
        p_c = head.probabilities(batch)
        if mem is not None and 2.5 * logits_bytes > mem:
            note = (
                f"skipped: {logits_bytes / 2**30:.1f} GiB of logits per call, "
                f"{mem / 2**30:.1f} GiB available"
            )
            log(f"(b) batch {batch_size}: {note}")
            out.append(
                Measurement(
                    "(b) batched full-vocab logits", batch_size, [float("nan")], 0, note=note
                )
            )
        else:
            log(f"(b) batched full-vocab logits, batch {batch_size}")
            seconds = timed(
                lambda b=batch: full.probabilities(b.token_ids, b.padding_mask, b.last_index),
                options.repeats,
            )
            p_b = full.probabilities(batch.token_ids, batch.padding_mask, batch.last_index)
            out.append(
                Measurement(
                    "(b) batched full-vocab logits",
                    batch_size,
                    seconds,
                    batch_size,
                    flops.full_vocab_path,
                    max_dp=float(np.abs(p_b - p_c).max()),
                )
            )
        log(f"(c) batched label-token head, batch {batch_size}")
        seconds = timed(lambda b=batch: head.logits(b), options.repeats)
        out.append(
            Measurement(
                "(c) batched last-position label head",
                batch_size,
                seconds,
                batch_size,
                flops.label_path,
                max_dp=0.0,
            )
        )
        log(f"(c) label-token head with XLA, batch {batch_size}")
        seconds = timed(lambda b=batch: head_xla.logits(b), options.repeats)
        out.append(
            Measurement(
                "(c) + XLA (jit_compile=True)",
                batch_size,
                seconds,
                batch_size,
                flops.label_path,
                max_dp=float(np.abs(head_xla.probabilities(batch) - p_c).max()),
            )
        )
    return out


def time_label_head(
    backbone: Any,
    encoder: PromptEncoder,
    texts: Sequence[str],
    batch_size: int,
    repeats: int,
    jit_compile: bool | str = "auto",
) -> tuple[list[float], np.ndarray]:
    """Seconds per call of path (c) at one batch size, and its probabilities."""
    scorer = LabelTokenScorer(backbone, encoder.label_ids, jit_compile)
    batch = encoder.encode([texts[i % len(texts)] for i in range(batch_size)], batch_size)
    seconds = timed(lambda: scorer.logits(batch), repeats)
    return seconds, scorer.probabilities(batch)


class PrefixCachedLabelModel(keras.Model):
    """Path (c) with the shared prompt head's keys/values computed once: a measured prototype.

    Every prompt starts with the same tokens (BOS + instructions + labels + `Text:`). Their
    per-layer keys and values are computed once at construction, then each batch runs only
    positions `prefix..L-1` through KerasHub's cached decoder-layer call
    (`cache_update_index = prefix`). Exact under right padding; valid only for the weights
    it was built with (rebuild after loading LoRA weights). Gemma 3 backbones only.

    Args:
        backbone: a KerasHub `Gemma3Backbone`.
        label_ids: vocabulary ids of the labels.
        prefix_ids: the token ids every prompt starts with (`PromptEncoder.head_ids`).
        length: the longest row length it will see (the cache is cut for shorter buckets).
    """

    def __init__(
        self,
        backbone: keras.Model,
        label_ids: Sequence[int],
        prefix_ids: Sequence[int],
        length: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.backbone = backbone
        self.label_ids = [int(i) for i in label_ids]
        self.prefix = len(prefix_ids)
        shape = [1, length, backbone.num_key_value_heads, backbone.head_dim]
        mask = np.zeros((1, length), dtype=np.int32)
        mask[:, : self.prefix] = 1
        x = self._embed(np.asarray([prefix_ids], dtype=np.int32))
        self.caches = []
        for layer in backbone.transformer_layers:
            dtype = backbone.compute_dtype
            empty = (ops.zeros(shape, dtype=dtype), ops.zeros(shape, dtype=dtype))
            x, cache = layer(x, padding_mask=mask, cache=empty, cache_update_index=0)
            self.caches.append(tuple(ops.convert_to_numpy(c) for c in cache))

    def _embed(self, token_ids: Any) -> Any:
        x = self.backbone.token_embedding(token_ids)
        return x * ops.cast(ops.sqrt(self.backbone.hidden_dim), x.dtype)

    def call(self, inputs: dict[str, Any]) -> Any:
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        batch, width = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        h = self._embed(token_ids[:, self.prefix :])
        for layer, (k, v) in zip(self.backbone.transformer_layers, self.caches, strict=True):
            size = (batch, width, k.shape[2], k.shape[3])
            cut = (1, width, k.shape[2], k.shape[3])
            cache = tuple(
                ops.broadcast_to(ops.slice(ops.convert_to_tensor(c), (0, 0, 0, 0), cut), size)
                for c in (k, v)
            )
            h, _ = layer(h, padding_mask=padding_mask, cache=cache, cache_update_index=self.prefix)
        h = self.backbone.layer_norm(h)
        last = last_token_hidden(h, inputs["last_index"] - self.prefix)
        return output_logits(self.backbone.token_embedding, last, self.label_ids)


class PrefixCachedScorer:
    """`LabelTokenScorer`'s interface over `PrefixCachedLabelModel`."""

    def __init__(
        self, backbone: keras.Model, encoder: PromptEncoder, jit_compile: bool | str = "auto"
    ) -> None:
        self.model = PrefixCachedLabelModel(
            backbone, encoder.label_ids, encoder.head_ids, encoder.settings.sequence_length
        )
        self.model.compile(jit_compile=jit_compile)

    def logits(self, batch: EncodedBatch) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(batch.as_inputs()), dtype=np.float32)

    def probabilities(self, batch: EncodedBatch) -> np.ndarray:
        return softmax_np(self.logits(batch))


# ---------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------


@dataclass
class TuningRow:
    """One knob setting, compared against the baseline setting measured beside it."""

    knob: str
    setting: str
    batch: int
    comments_per_s: float
    baseline: float | None
    note: str = ""

    @property
    def change(self) -> str:
        if self.baseline is None or not np.isfinite(self.comments_per_s):
            return "baseline"
        return f"{self.comments_per_s / self.baseline:.2f}x"


def measure_tuning(
    model: LoadedModel,
    options: BenchOptions,
    texts: Sequence[str],
    flops: FlopCount,
    rows: list[TuningRow],
) -> list[TuningRow]:
    """XLA, dtype, prefix cache and length buckets, each beside the baseline it changes.

    The baseline is what the product runs today: `jit_compile="auto"`, which Keras resolves
    to *no* XLA on a CPU-only TensorFlow. Rows are appended to `rows` as they are measured,
    so a failure keeps the earlier ones.
    """
    encoder = PromptEncoder(model.tokenizer, PromptSettings())
    b = options.tuning_batch
    batch = encoder.encode([texts[i % len(texts)] for i in range(b)], b)

    def fixed(scorer: Any) -> tuple[float, np.ndarray]:
        seconds = timed(lambda: scorer.logits(batch), options.repeats)
        return b / statistics.median(seconds), scorer.probabilities(batch)

    def head(backbone: Any, jit: bool | str) -> LabelTokenScorer:
        return LabelTokenScorer(backbone, encoder.label_ids, jit)

    # XLA: Keras' "auto" is off on a CPU-only TF; compare with forcing it on.
    log(f"tuning: XLA off ('auto' on CPU) vs on, batch {b}")
    base, p_base = fixed(head(model.backbone, "auto"))
    xla, p_xla = fixed(head(model.backbone, True))
    rows.append(
        TuningRow("XLA", "jit_compile='auto' (Keras default: off on CPU-only TF)", b, base, None)
    )
    rows.append(
        TuningRow(
            "XLA",
            "jit_compile=True",
            b,
            xla,
            base,
            f"max abs dp {np.abs(p_xla - p_base).max():.1e}",
        )
    )

    # dtype: bfloat16 weights and activations, same architecture, both XLA settings.
    log(f"tuning: bfloat16 copy of the backbone, batch {b}")
    bf16 = build_backbone_copy(model.backbone, "bfloat16")
    for jit, reference, name in (("auto", base, "XLA off"), (True, xla, "XLA on")):
        rate, p = fixed(head(bf16, jit))
        rows.append(
            TuningRow(
                "dtype",
                f"bfloat16, {name}",
                b,
                rate,
                reference,
                f"vs float32 {name}; max abs dp vs float32 {np.abs(p - p_base).max():.3f}",
            )
        )
    del bf16

    # Shared prompt prefix: the prototype with the head's keys/values cached, fixed 128.
    for jit, reference, name in (("auto", base, "XLA off"), (True, xla, "XLA on")):
        log(f"tuning: shared-prefix KV cache (prototype), {name}, batch {b}")
        rate, p = fixed(PrefixCachedScorer(model.backbone, encoder, jit))
        rows.append(
            TuningRow(
                "shared prompt prefix",
                f"KV cache of the {flops.prefix_tokens}-token head, {name}",
                b,
                rate,
                reference,
                f"vs float32 {name}; {100 * flops.prefix_share:.1f} % fewer FLOPs; "
                f"max abs dp {np.abs(p - p_base).max():.1e}",
            )
        )

    # Length buckets on real comment lengths: whole passes over the same comments.
    real = list(texts[: options.bucket_texts])
    lengths = np.array([len(encoder.encode_ids(t)[0]) for t in real])
    fixed_only = (encoder.settings.sequence_length,)
    bucketed = (*LENGTH_BUCKETS, encoder.settings.sequence_length)
    for batch_size in options.bucket_batches:
        runs: dict[str, tuple[Any, Sequence[int]]] = {
            "fixed 128, XLA off": (head(model.backbone, "auto"), fixed_only),
            f"length_buckets={LENGTH_BUCKETS}, XLA off": (head(model.backbone, "auto"), bucketed),
        }
        if batch_size == b:
            runs["buckets + prefix cache, XLA off"] = (
                PrefixCachedScorer(model.backbone, encoder, "auto"),
                bucketed,
            )
            runs["fixed 128, XLA on"] = (head(model.backbone, True), fixed_only)
            runs["buckets, XLA on"] = (head(model.backbone, True), bucketed)
            runs["buckets + prefix cache, XLA on"] = (
                PrefixCachedScorer(model.backbone, encoder, True),
                bucketed,
            )
        results = {}
        for name, (scorer, buckets) in runs.items():
            log(f"tuning: {name}, batch {batch_size}, {len(real)} comments")
            warm_buckets(scorer, encoder, batch_size, buckets)

            def one_pass(
                scorer: Any = scorer, buckets: Sequence[int] = buckets, size: int = batch_size
            ) -> np.ndarray:
                return score_pass(scorer, encoder, real, size, buckets)

            seconds = timed(one_pass, max(1, options.repeats - 1), 0)
            results[name] = (len(real) / statistics.median(seconds), one_pass())
        names = list(results)
        base_pass, p_fixed = results[names[0]]
        rows.append(
            TuningRow(
                "length buckets",
                names[0],
                batch_size,
                base_pass,
                None,
                f"{len(real)} ETHOS prompts: p50 {np.percentile(lengths, 50):.0f}, p90 "
                f"{np.percentile(lengths, 90):.0f} tokens",
            )
        )
        use = bucket_use(encoder, real, batch_size, bucketed)
        for name in names[1:]:
            dp = np.abs(results[name][1] - p_fixed).max()
            note = f"max abs dp {dp:.1e}"
            if "uckets" in name:
                note = f"batches per bucket {use}; " + note
            rows.append(
                TuningRow("length buckets", name, batch_size, results[name][0], base_pass, note)
            )
    return rows


def warm_buckets(
    scorer: Any, encoder: PromptEncoder, batch_size: int, buckets: Sequence[int]
) -> None:
    """Compile every bucket's graph before the clock starts (XLA takes ~25 s per shape here)."""
    warm = encoder.encode([""], batch_size)
    shortest = int(warm.last_index[0]) + 1  # no real prompt is shorter
    for bucket in (k for k in buckets if k >= shortest):
        scorer.logits(
            EncodedBatch(
                warm.token_ids[:, :bucket],
                warm.padding_mask[:, :bucket],
                np.minimum(warm.last_index, bucket - 1),
            )
        )


def score_pass(
    scorer: Any,
    encoder: PromptEncoder,
    texts: Sequence[str],
    batch_size: int,
    buckets: Sequence[int],
) -> np.ndarray:
    """`AgileClassifier.predict_proba`'s loop for any scorer: fixed chunks, cut to a bucket."""
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        batch = encoder.encode(chunk, batch_size=batch_size)
        if len(buckets) > 1:
            batch = batch.cut_to(buckets)
        out.append(scorer.probabilities(batch)[: len(chunk)])
    return np.concatenate(out)


def bucket_use(
    encoder: PromptEncoder, texts: Sequence[str], batch_size: int, buckets: Sequence[int]
) -> str:
    """Which bucket each batch lands in: the longest prompt of a batch decides its length."""
    counts = dict.fromkeys(buckets, 0)
    for start in range(0, len(texts), batch_size):
        batch = encoder.encode(texts[start : start + batch_size], batch_size=batch_size)
        counts[batch.cut_to(buckets).token_ids.shape[1]] += 1
    total = sum(counts.values())
    return ", ".join(f"{k}: {100 * v / total:.0f} %" for k, v in counts.items())


THREAD_VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("TF defaults (intra/inter = cores)", {}),
    ("intra_op=1, inter_op=1", {"intra": 1, "inter": 1}),
    ("intra_op=2, inter_op=1", {"intra": 2, "inter": 1}),
    ("oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)", {"env": {"TF_ENABLE_ONEDNN_OPTS": "0"}}),
)


def measure_threads(options: BenchOptions, edges: BenchEdges) -> list[TuningRow]:
    """Thread pools and oneDNN, each in a fresh process: TF fixes them when it starts.

    The baseline is a child with TF's defaults too, so every row pays the same process start.
    """
    rows: list[TuningRow] = []
    variants = THREAD_VARIANTS[1:2] if options.quick else THREAD_VARIANTS
    base: float | None = None
    for name, variant in variants:
        log(f"threads: {name} (child process)")
        spec = {
            "model": options.model,
            "batch": options.tuning_batch,
            "repeats": options.repeats,
            "intra": variant.get("intra", 0),
            "inter": variant.get("inter", 0),
        }
        proc = subprocess.run(
            [*edges.child_command, "--child", json.dumps(spec)],
            env={**os.environ, **variant.get("env", {}), "TF_CPP_MIN_LOG_LEVEL": "3"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            rows.append(
                TuningRow("threads", name, options.tuning_batch, float("nan"), base, "failed")
            )
            log(f"threads: {name} failed: {proc.stderr[-500:]}")
            continue
        result = json.loads(lines[-1])
        rows.append(
            TuningRow(
                "threads",
                name,
                options.tuning_batch,
                result["comments_per_s"],
                base,
                "separate process, XLA off ('auto')",
            )
        )
        base = base if base is not None else result["comments_per_s"]
    return rows


def run_child(spec: dict[str, Any], load_model: ModelLoader) -> dict[str, Any]:
    """Body of a thread-variant child: path (c) at one batch size, as a JSON-able dict.

    The pools are set before the first op runs, which is the only time TF accepts them.
    """
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(int(spec.get("intra", 0)))
    tf.config.threading.set_inter_op_parallelism_threads(int(spec.get("inter", 0)))
    model = load_model(spec["model"])
    encoder = PromptEncoder(model.tokenizer, PromptSettings())
    texts = [f"comment number {i} with a few words" for i in range(spec["batch"])]
    seconds, _ = time_label_head(model.backbone, encoder, texts, spec["batch"], spec["repeats"])
    return {"comments_per_s": spec["batch"] / statistics.median(seconds)}


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------


@dataclass
class PipelineRow:
    """One `measure_pipeline` run."""

    run: str
    scorer: str
    result: dict[str, Any]


def measure_pipelines(
    model: LoadedModel, options: BenchOptions, edges: BenchEdges, rows: list[PipelineRow]
) -> list[PipelineRow]:
    """Trivial vs real scorer through the embedded broker; paced below capacity and overload."""
    assert edges.measure_pipeline and edges.broker and edges.trivial_scorer and edges.settings
    batch = options.tuning_batch
    n_trivial, n_real = options.pipeline_events
    with edges.broker() as broker:
        settings = edges.settings(
            broker_url=broker.url,
            batch_size=batch,
            max_wait_ms=50,
            input_partitions=4,
            session_timeout_s=3.0,
            heartbeat_interval_s=0.5,
            rebalance_timeout_s=3.0,
            commit_interval_s=0.5,
            log_level="WARNING",
        )
        trivial = edges.trivial_scorer(batch)
        log(f"pipeline: trivial scorer, {n_trivial} events, backlog drained as fast as possible")
        r = edges.measure_pipeline(settings, trivial, n_trivial, fetch_max_wait_ms=20)
        rows.append(PipelineRow("throughput (backlog)", "trivial", r))
        # The worker's classifier: AgileClassifier's defaults plus the worker's length buckets.
        clf = AgileClassifier(model, batch_size=batch, length_buckets=settings.length_buckets)
        warm_buckets(clf.scorer, clf.encoder, batch, clf.length_buckets)
        texts = edges.pipeline_texts(n_real) if edges.pipeline_texts else []
        if texts:
            seconds = timed(lambda: clf.predict_proba(texts), max(1, options.repeats - 1), 0)
            rate = len(texts) / statistics.median(seconds)
            log(f"pipeline: the same classifier alone on the same texts: {rate:.2f} comments/s")
            rows.append(
                PipelineRow(
                    "model alone: `predict_proba` on the same texts, no broker",
                    f"{model.name} label head",
                    {"events_per_s": rate, "fill_ratio": 1.0, "missing": 0, "duplicates": 0},
                )
            )
        log(f"pipeline: real scorer, {n_real} events, backlog")
        r = edges.measure_pipeline(settings, clf, n_real, fetch_max_wait_ms=20)
        rows.append(PipelineRow("throughput (backlog)", f"{model.name} label head", r))
        capacity = r["events_per_s"]
        loads = (("paced at 50 % of capacity", 0.5), ("overload at 2x capacity", 2.0))
        for name, factor in loads[: 1 if options.quick else 2]:
            rate = max(0.5, capacity * factor)
            log(f"pipeline: real scorer {name}: {rate:.2f} events/s, {n_real} events")
            r = edges.measure_pipeline(settings, clf, n_real, rate=rate, fetch_max_wait_ms=20)
            rows.append(PipelineRow(f"{name} ({rate:.2f}/s)", f"{model.name} label head", r))
    return rows


# ---------------------------------------------------------------------------------------------
# Machine and rendering
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    """The SIMD extensions that bound a float32/bfloat16 matmul on this CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                keep = ("avx", "fma", "amx", "vnni", "bf16")
                return " ".join(sorted(f for f in flags if any(k in f for k in keep)))
    except OSError:
        pass
    return "unknown"


def load_average() -> str:
    """1-minute load average: above the core count, something else competed for the CPU."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def other_load() -> str:
    """Other moderation-worker jobs on the machine right now (training, scoring, evaluation).

    On a shared machine these skew every timing; the report names them. The bench's own
    process and its thread-variant children are left out.
    """
    own = {os.getpid(), os.getppid()}
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            pid = int(cmdline.parent.name)
            args = [a.decode("utf-8", "replace") for a in cmdline.read_bytes().split(b"\0") if a]
        except (OSError, ValueError):
            continue
        if pid in own or not any(a.endswith("moderation-worker") for a in args[:3]):
            continue
        sub = next((a for a in args[1:] if not a.startswith("-") and "/" not in a), "")
        if sub == "bench":
            continue
        found.append(f"pid {pid}: moderation-worker {sub}")
    return "; ".join(sorted(found))


def _process_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds so far, short command) for every process we can read."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
            head, rest = raw.rsplit(")", 1)
            fields = rest.split()
            args = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        name = " ".join(a.decode("utf-8", "replace").rsplit("/", 1)[-1] for a in args[:3] if a)
        name = name or head.split("(", 1)[-1]
        table[int(stat.parent.name)] = (
            int(fields[1]),
            (int(fields[11]) + int(fields[12])) / tick,
            name[:80],
        )
    return table


class OtherCpu:
    """CPU time other processes take while the bench runs, sampled every few seconds.

    The machine is shared: a training run, a CI run or another engineer's tests on the same
    cores lower every rate here. The report states how much CPU they took, so a reader can
    tell a clean run from a loaded one.
    """

    def __init__(self, interval_s: float = 2.0) -> None:
        import threading

        self.interval_s = interval_s
        self.started = time.monotonic()
        self.seconds: dict[str, float] = {}
        self._last = _process_table()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-other-cpu", daemon=True)
        self._thread.start()

    def _mine(self, pid: int, table: dict[int, tuple[int, float, str]]) -> bool:
        me = os.getpid()
        for _ in range(64):
            if pid == me:
                return True
            if pid not in table or pid <= 1:
                return False
            pid = table[pid][0]
        return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        table = _process_table()
        for pid, (_, cpu, name) in table.items():
            if self._mine(pid, table):
                continue
            before = self._last.get(pid)
            delta = cpu - before[1] if before is not None else cpu
            if delta > 0:
                self.seconds[name] = self.seconds.get(name, 0.0) + delta
        self._last = table

    def share(self) -> float:
        """Other processes' CPU as a fraction of all cores over the run so far."""
        wall = max(1e-9, time.monotonic() - self.started)
        return sum(self.seconds.values()) / (wall * (os.cpu_count() or 1))

    def summary(self) -> str:
        top = sorted(self.seconds.items(), key=lambda kv: -kv[1])[:3]
        names = "; ".join(f"{name} {sec:.0f} s" for name, sec in top if sec >= 1)
        return (
            f"other processes took {sum(self.seconds.values()):.0f} CPU-s, "
            f"{100 * self.share():.1f} % of the machine" + (f" (top: {names})" if names else "")
        )

    def stop(self) -> None:
        self._stop.set()
        self.sample()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("keras", "keras-hub", "tensorflow", "numpy", "faust-streaming"):
        try:
            out[name] = package_version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine_info() -> dict[str, Any]:
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "flags": cpu_flags(),
        "memory_gib": mem,
        "platform": platform.platform(),
        "backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
    }


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or not np.isfinite(x):
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _fmt_ms(seconds: float) -> str:
    return "–" if not np.isfinite(seconds) else f"{seconds * 1e3:,.1f}"


@dataclass
class BenchReport:
    """Everything one run measured, rendered to markdown by `render`."""

    options: BenchOptions
    started: str
    machine: dict[str, Any]
    versions: dict[str, str]
    load_before: str
    load_after: str = ""
    other_cpu: str = ""
    other_share: float = 0.0
    loadavg_before: str = field(default_factory=load_average)
    loadavg_after: str = ""
    model_name: str = ""
    model_config: dict[str, Any] = field(default_factory=dict)
    flops: FlopCount | None = None
    peak: dict[str, Any] = field(default_factory=dict)
    shaped: dict[str, float] = field(default_factory=dict)
    texts_source: str = ""
    scoring: list[Measurement] = field(default_factory=list)
    tuning: list[TuningRow] = field(default_factory=list)
    threads: list[TuningRow] = field(default_factory=list)
    pipeline: list[PipelineRow] = field(default_factory=list)
    pipeline_note: str = ""
    seconds: float = 0.0


def render(report: BenchReport) -> str:
    """The BENCHMARKS.md text: header, tables, then how the numbers were counted."""
    o, m, f = report.options, report.machine, report.flops
    peak = report.peak.get("gflops")
    under_load = report.load_before or report.load_after
    if report.other_share > 0.05:
        under_load = "; ".join(x for x in (under_load, report.other_cpu) if x)
    lines = ["# Benchmarks", ""]
    lines += [
        "Generated by `moderation-worker bench`; rerun it to refresh this file. "
        "Timings are medians of the repeats after a warm-up call that compiles the graph.",
        "",
    ]
    if under_load:
        lines += [
            f"> **Measured under load**: other jobs shared this {m['cores']}-core machine "
            f"({under_load}); rates below are lower than the machine does alone.",
            "",
        ]
    if o.quick:
        lines += [
            "> `--quick` run: tiny random model and tiny counts, for the test suite only.",
            "",
        ]
    lines += [
        f"- Command: `{o.command}`",
        f"- Date: {report.started} (took {report.seconds:.0f} s); 1-min load average "
        f"{report.loadavg_before} at the start, {report.loadavg_after} at the end; "
        f"{report.other_cpu or 'other processes not sampled'}",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {_fmt(m['memory_gib'], 1)} GiB; "
        f"SIMD: {m['flags']}; {m['platform']}",
        f"- Accelerator: none (no GPU lent to this task); Keras backend: {m['backend']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()),
        f"- Model: `{o.model}` ({report.model_name}), zero-shot (no LoRA; a rank-4 LoRA on q/v "
        "adds < 0.1 % FLOPs), float32, sequence length "
        f"{f.sequence_length if f else '?'}, labels {', '.join(PromptSettings().labels)}",
        f"- Texts: {report.texts_source}",
        f"- Worker defaults at this commit: {worker_defaults()}",
        "",
    ]
    lines += ["## Matrix-multiply peak of this machine", ""]
    lines += ["| Measurement | GFLOP/s |", "|---|---:|"]
    lines.append(
        f"| float32 square matmul via `keras.ops.matmul`, best of 5, n = {report.peak.get('size')} "
        f"(tried {', '.join(map(str, o.matmul_sizes))}) | **{_fmt(peak, 1)}** |"
    )
    for name, value in report.shaped.items():
        lines.append(f"| {name} | {_fmt(value, 1)} |")
    lines.append("")

    if report.scoring:
        lines += ["## 1. Scoring: same model, same run", ""]
        lines += [
            "Every path scores fixed `[batch, 128]` rows of the same prompts. (a), (b) and (c) "
            "run with Keras' default `jit_compile='auto'`, which is XLA *off* on a CPU-only "
            "TensorFlow (what the worker runs today); the `(c) + XLA` rows force it on. "
            "Δp compares label probabilities with (c) on the same rows.",
            "",
        ]
        lines += [
            "| Path | Batch | comments/s | ms/comment | GFLOP/comment | achieved GFLOP/s "
            "| % of peak | vs (a) | max abs Δp vs (c) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        codelab = next(
            (s.comments_per_s for s in report.scoring if s.label.startswith("(a)")), None
        )
        for s in report.scoring:
            if s.comments_per_call == 0:
                lines.append(f"| {s.label} | {s.batch} | {s.note} | | | | | | |")
                continue
            g = s.gflops()
            lines.append(
                f"| {s.label} | {s.batch} | {_fmt(s.comments_per_s)} | "
                f"{_fmt_ms(s.median / s.comments_per_call)} | "
                f"{_fmt((s.flops_per_comment or 0) / 1e9, 2)} | {_fmt(g, 1)} | "
                f"{_fmt(100 * g / peak if g and peak else None, 1)} | "
                f"{_fmt(s.comments_per_s / codelab if codelab else None)}x | "
                f"{'–' if s.max_dp is None else f'{s.max_dp:.1e}'} |"
            )
        lines.append("")

    if report.tuning or report.threads:
        lines += ["## 5. Tuning: before / after (path (c))", ""]
        lines += [
            "| Knob | Setting | Batch | comments/s | vs baseline | Note |",
            "|---|---|---:|---:|---:|---|",
        ]
        for t in [*report.tuning, *report.threads]:
            lines.append(
                f"| {t.knob} | {t.setting} | {t.batch} | {_fmt(t.comments_per_s)} | "
                f"{t.change} | {t.note} |"
            )
        if f:
            lines.append(
                f"| shared prompt prefix (analysis) | KV cache of the {f.prefix_tokens}-token "
                f"instruction head | – | – | ≤ {1 / (1 - f.prefix_share):.2f}x | "
                f"skips {100 * f.prefix_share:.1f} % of path (c)'s FLOPs at "
                f"{f.sequence_length} tokens (upper bound of the row above) |"
            )
        lines.append("")

    lines += ["## 2./3. Pipeline: broker + Faust + codecs + batching", ""]
    lines += [
        f"One in-process worker (`pipeline_bench.measure_pipeline`) on the embedded "
        f"Tansu broker, batch {o.tuning_batch}, `max_wait_ms` 50, 4 partitions, fetch wait "
        "20 ms (a Tansu workaround); the real scorer is the worker's classifier "
        f"({worker_defaults()}), every graph compiled before the clock starts. Throughput runs "
        "drain a pre-filled topic (latency there is queueing in the backlog); paced runs send "
        "at a fixed rate while the worker runs.",
        "",
    ]
    if report.pipeline:
        lines += [
            "| Run | Scorer | Workers | events/s | batch fill | p50 latency s | p99 latency s "
            "| lost | duplicates |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in report.pipeline:
            r = p.result
            lines.append(
                f"| {p.run} | {p.scorer} | {r.get('workers', 1)} | {_fmt(r['events_per_s'])} | "
                f"{_fmt(r['fill_ratio'])} | {_fmt(r.get('latency_p50_s'), 3)} | "
                f"{_fmt(r.get('latency_p99_s'), 3)} | {r['missing']} | {r['duplicates']} |"
            )
        lines.append("")
    if report.pipeline_note:
        lines += [report.pipeline_note, ""]

    lines += [scale_note(report), ""]

    lines += ["## 4. GPU", ""]
    lines += [
        "| Device | Model | Batch | comments/s | % of bf16 peak |",
        "|---|---|---:|---:|---:|",
        "| not measured: no GPU lent to this task | Gemma 2B architecture, Gemma 3 270M "
        "| 32–512 | – | – |",
        "",
    ]
    if f:
        lines += flop_section(f, report.model_config, peak)
    return "\n".join(lines) + "\n"


def flop_section(f: FlopCount, config: dict[str, Any], peak: float | None) -> list[str]:
    """The FLOP accounting, with this config's numbers filled in."""
    d, ffn, layers = config["hidden_dim"], config["intermediate_dim"], config["num_layers"]
    hq, hkv, h = config["num_query_heads"], config["num_key_value_heads"], config["head_dim"]
    vocab, t = config["vocabulary_size"], f.sequence_length
    per = f.per_token_layer
    lines = ["## FLOP accounting", ""]
    lines += [
        "A multiply-add counts 2 FLOPs. With hidden size d, MLP size F, L layers, Hq query and "
        "Hkv key/value heads of size h, vocabulary V and T tokens per prompt, per comment:",
        "",
        "```",
        "per token and layer:",
        "  q, k, v projections   2·d·(Hq·h + 2·Hkv·h)",
        "  output projection     2·Hq·h·d",
        "  attention             4·Hq·h·T        (scores QKᵀ + weighted sum, dense T×T)",
        "  gated MLP             3 · 2·d·F       (gate, up, down)",
        "backbone                L·T·(sum of the above)",
        "full-vocab head (a, b)  2·d·V·T         (logits at every position)",
        "label head (c)          2·d·n_labels + 2·T·d   (one position, 2 label rows + the pick)",
        "```",
        "",
        f"This model: d = {d}, F = {ffn}, L = {layers}, Hq = {hq}, Hkv = {hkv}, h = {h}, "
        f"V = {vocab:,}, T = {t}.",
        "",
        "| Term | GFLOP per comment |",
        "|---|---:|",
    ]
    for name, value in per.items():
        lines.append(
            f"| {name.replace('_', ' ')} (all layers, T tokens) | {value * layers * t / 1e9:.3f} |"
        )
    lines += [
        f"| **backbone** | **{f.backbone / 1e9:.3f}** |",
        f"| full-vocab head at {t} positions | {f.full_vocab_head / 1e9:.3f} |",
        f"| label head at 1 position | {f.label_head / 1e9:.6f} |",
        f"| **path (a)/(b) total** | **{f.full_vocab_path / 1e9:.3f}** |",
        f"| **path (c) total** | **{f.label_path / 1e9:.3f}** |",
        "",
        f"Path (c) does {f.full_vocab_path / f.label_path:.2f}x less work than (a)/(b) per "
        "comment. Norms, RoPE, softmax and the embedding lookup are O(T·d) element-wise work "
        "and are left out (< 0.1 %). Attention is counted as the dense T×T product the kernels "
        "compute; a causal kernel could skip half of it.",
        "",
    ]
    if peak:
        bound = peak * 1e9 / f.label_path
        lines += [
            f"At the measured peak of {peak:.1f} GFLOP/s, the bound for path (c) is "
            f"{bound:.2f} comments/s per machine at {t} tokens, and "
            f"{peak * 1e9 / f.full_vocab_path:.2f} for (a)/(b).",
            "",
        ]
    lines += [
        "### Shared prompt prefix",
        "",
        f"Every prompt starts with the same {f.prefix_tokens} tokens (BOS + instruction + label "
        "list + separator + `Text:`). Their keys and values could be computed once and reused "
        "(KerasHub's `call_with_cache` with `cache_update_index = prefix`), which skips those "
        f"rows' projections, MLP and attention: {100 * f.prefix_tokens / t:.1f} % of the backbone "
        f"at T = {t}, {100 * f.prefix_share:.1f} % of path (c), so at most "
        f"{1 / (1 - f.prefix_share):.2f}x. The share grows when rows are cut to a shorter "
        "length bucket (the prefix is a larger part of a short prompt). `PrefixCachedLabelModel` "
        "in `tools/bench.py` is a working prototype (exact to float rounding; the "
        "tuning table measures it); moving it into `scoring.py` would also need the cache "
        "rebuilt whenever LoRA weights are loaded, since the prefix keys depend on them.",
        "",
    ]
    return lines


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def run_bench(options: BenchOptions, edges: BenchEdges) -> BenchReport:
    """Run the selected sections; write `OUT.partial` after each one, rename it to `OUT` at the end.

    A crash keeps the sections measured so far, and never clobbers the last complete table.
    """
    started = time.perf_counter()
    report = BenchReport(
        options=options,
        started=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine_info(),
        versions=versions(),
        load_before=other_load(),
    )
    if report.load_before:
        log(f"WARNING: measuring under load ({report.load_before})")
    others = OtherCpu()
    out = Path(options.out)
    partial = out.with_name(out.name + ".partial")  # a crash never clobbers the last good table

    def save() -> None:
        report.seconds = time.perf_counter() - started
        report.load_after = other_load()
        report.loadavg_after = load_average()
        others.sample()
        report.other_cpu, report.other_share = others.summary(), others.share()
        partial.write_text(render(report), encoding="utf-8")
        if report.other_share > 0.05:
            log(f"WARNING: {report.other_cpu}")

    log(f"loading model {options.model}")
    model = edges.load_model(options.model)
    report.model_name = model.name
    report.model_config = model.backbone.get_config()
    encoder = PromptEncoder(model.tokenizer, PromptSettings())
    flops = count_flops(
        report.model_config,
        encoder.settings.sequence_length,
        len(encoder.label_ids),
        prefix_tokens=len(encoder.head_ids),
    )
    report.flops = flops
    log(
        f"FLOPs/comment: (a)/(b) {flops.full_vocab_path / 1e9:.2f} G, "
        f"(c) {flops.label_path / 1e9:.2f} G"
    )
    texts, report.texts_source = bench_texts(options, max(options.bucket_texts, 64))

    report.peak = matmul_peak(options.matmul_sizes)
    d, ffn = report.model_config["hidden_dim"], report.model_config["intermediate_dim"]
    rows = options.tuning_batch * encoder.settings.sequence_length
    report.shaped[f"MLP-shaped matmul [{rows}×{d}]·[{d}×{ffn}] (batch {options.tuning_batch})"] = (
        shaped_matmul(rows, d, ffn)
    )
    save()

    if "scoring" in options.sections:
        report.scoring = measure_scoring(model, options, texts, flops)
        save()
    if "tuning" in options.sections:
        try:
            measure_tuning(model, options, texts, flops, report.tuning)
        except Exception as exc:  # keep the other sections' numbers
            log(f"tuning failed: {exc!r}")
            report.tuning.append(
                TuningRow("(failed)", type(exc).__name__, 0, float("nan"), None, str(exc)[:200])
            )
        save()
    if "threads" in options.sections:
        report.threads = measure_threads(options, edges)
        save()
    if "pipeline" in options.sections:
        if edges.measure_pipeline is None:
            report.pipeline_note = "Not measured: the pipeline bench is not available."
        else:
            try:
                measure_pipelines(model, options, edges, report.pipeline)
                report.pipeline_note = pipeline_summary(report)
            except Exception as exc:  # keep the other sections' numbers
                log(f"pipeline failed: {exc!r}")
                report.pipeline_note = f"Pipeline run failed: `{exc!r}`"[:400]
        save()
    others.stop()
    save()
    partial.replace(out)
    log(f"wrote {options.out} in {report.seconds:.0f} s")
    return report


def pipeline_summary(report: BenchReport) -> str:
    """The pipeline's share of end-to-end time: seconds per event without vs with the model."""
    by_scorer = {p.scorer: p.result for p in report.pipeline if p.run.startswith("throughput")}
    trivial = by_scorer.get("trivial", {}).get("events_per_s")
    real = next((r["events_per_s"] for s, r in by_scorer.items() if s != "trivial"), None)
    if not trivial or not real:
        return ""
    share = real / trivial
    alone = next((p.result["events_per_s"] for p in report.pipeline if "alone" in p.run), None)
    text = (
        f"Pipeline share of end-to-end time: {1e3 / trivial:.2f} ms/event of pipeline (trivial "
        f"scorer) against {1e3 / real:.1f} ms/event end to end with the model, a ratio of "
        f"**{share:.4f}** ({100 * share:.2f} %)."
    )
    if alone:
        text += (
            f" The same classifier alone on the same texts, in the same process, scores "
            f"{alone:.2f} comments/s at batch {report.options.tuning_batch}; through the worker "
            f"{real:.2f} events/s ({100 * real / alone:.0f} % of it)."
        )
        if real < 0.9 * alone:
            text += (
                " On this 2-core machine the broker (Tansu), the load generator and the "
                "worker's event loop share the cores with TensorFlow's two compute threads, "
                "which is where the rest goes; with the broker elsewhere the pipeline's own "
                "cost is the ratio above."
            )
    return text


def worker_defaults() -> str:
    """The classifier settings the worker runs with at this commit (they follow this table)."""
    import inspect

    from moderation_worker.settings import Settings

    jit = inspect.signature(AgileClassifier.__init__).parameters["jit_compile"].default
    buckets = Settings.model_fields["length_buckets"].default
    return f"`AgileClassifier` jit_compile={jit!r}, length_buckets={tuple(buckets)}"


def scale_note(report: BenchReport) -> str:
    """1 vs 2 workers: what this machine can say, measured where it can be."""
    text = (
        "**1 vs 2 workers in one consumer group**: not measured as a pipeline run; "
        "`measure_pipeline` drives one in-process worker."
    )
    rates = {t.setting: t.comments_per_s for t in report.threads if np.isfinite(t.comments_per_s)}
    one = next((v for k, v in rates.items() if k.startswith("intra_op=1")), None)
    full = next((v for k, v in rates.items() if k.startswith("TF defaults")), None)
    if one and full:
        text += (
            f" From the thread rows: one worker using both cores scores {full:.2f} comments/s; "
            f"a worker pinned to one core {one:.2f}, so two one-core workers would reach at most "
            f"{2 * one:.2f} ({2 * one / full:.2f}x one worker)."
        )
    text += (
        " The model is compute-bound, so throughput scales with cores, not with workers: more "
        "machines (one model per worker process) add throughput linearly until every input "
        "partition has its own worker; partitions bound the parallelism of one consumer group. "
        "Two workers sharing a group, one killed mid-stream, losing nothing, is a test: "
        "`tests/test_worker_broker.py`."
    )
    return text


def shell_command(argv: Sequence[str]) -> str:
    """The command line as typed, for the report."""
    return "moderation-worker " + " ".join(shlex.quote(a) for a in argv)

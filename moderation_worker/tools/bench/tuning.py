"""Tuning knobs measured before/after on the same machine: XLA, dtype, the prefix cache,
length buckets on real comment lengths, and TF thread pools (in child processes: TF fixes
them when it starts)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moderation_worker.model.classifier import LoadedModel
from moderation_worker.model.prompts import EncodedBatch, PromptEncoder, PromptSettings
from moderation_worker.model.scoring import LabelTokenScorer
from moderation_worker.tools.bench.flops import FlopCount, timed
from moderation_worker.tools.bench.options import (
    BenchEdges,
    BenchOptions,
    ModelLoader,
    log,
)
from moderation_worker.tools.bench.scoring import build_backbone_copy, time_label_head


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

    def head(backbone: Any, jit: bool | str, prefix: bool = False) -> LabelTokenScorer:
        ids = encoder.head_ids if prefix else None
        scorer = LabelTokenScorer(backbone, encoder.label_ids, jit, prefix_ids=ids)
        if scorer.prefix is not None:
            scorer.prefix.refresh()  # zero-shot: the backbone's own weights
        return scorer

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

    # Shared prompt prefix: the worker's path with the head's keys/values cached, fixed 128.
    for jit, reference, name in (("auto", base, "XLA off"), (True, xla, "XLA on")):
        log(f"tuning: shared-prefix KV cache, {name}, batch {b}")
        rate, p = fixed(head(model.backbone, jit, prefix=True))
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

    # Length buckets and length-aware batching: the "length" section (`length_batching`).
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

"""Scoring paths (a), (b), (c) over the same backbone, timed at every batch size.

(a) the codelab's way, one prompt per call with full-vocabulary logits at every position;
(b) the same logits, batched; (c) the batched last-position label-token head
(`LabelTokenScorer`, what the worker runs), with and without XLA.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moderation_worker.model.classifier import LoadedModel
from moderation_worker.model.prompts import PromptEncoder, PromptSettings
from moderation_worker.model.scoring import LabelTokenScorer, softmax_np
from moderation_worker.tools.bench.flops import FlopCount, memory_available_bytes, timed
from moderation_worker.tools.bench.options import BenchOptions, log


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
        if mem is not None and 4 * logits_bytes > mem:  # copies of the logits: 2.5x was OOM-killed
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

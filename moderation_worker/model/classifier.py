"""`AgileClassifier`: the object users hold — prompt, scorer, LoRA adapter and threshold.

It turns texts into label probabilities in fixed `[batch_size, sequence_length]` chunks, so a
compiled graph is built once and reused; the last chunk is padded with empty rows whose
outputs are dropped. The classifier owns its adapter, not the backbone: classifiers built on
one `LoadedModel` share the backbone and each puts its adapter (or none) into the backbone's
LoRA slot before each model call (see `lora_slot`), so none changes another's scores.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from moderation_worker.events import ModelIdentity
from moderation_worker.model.lora import LoraAdapter, LoraMetadata
from moderation_worker.model.lora_slot import adapter_slot
from moderation_worker.model.prompts import PromptEncoder, PromptSettings, Tokenizer
from moderation_worker.model.scoring import LabelTokenScorer
from moderation_worker.threshold_source import resolve_threshold


@dataclass
class LoadedModel:
    """A base model as a model source delivers it: backbone, tokenizer and a stable name."""

    backbone: keras.Model
    tokenizer: Tokenizer
    name: str


class AgileClassifier:
    """Hateful / not-hateful classifier on a (LoRA-tuned) Gemma backbone.

    Args:
        model: the base model (see `moderation_worker.model.sources`).
        prompt: prompt settings; replaced by the LoRA metadata's prompt when weights are given.
        lora_weights: path of a `.lora.h5` file (with its `.lora.json`), or None for zero-shot.
        adapter: a `LoraAdapter` already in memory, instead of `lora_weights`.
        threshold: decision threshold on p(positive label); default: the LoRA metadata's
            calibrated threshold, else 0.5.
        batch_size: rows per model call; every call has exactly this shape.
        jit_compile: XLA-compile the forward pass. On by default: Keras's "auto" leaves XLA off
            for TensorFlow on a CPU, and XLA measured 1.36x faster there (BENCHMARKS.md).
        length_buckets: optional shorter sequence lengths (e.g. `(32, 64)`): a batch whose
            longest prompt fits a bucket is cut to it. Exact (right padding, causal attention)
            and one compiled graph per bucket; pays off when most comments are short.
        prefix_cache: compute the prompt head's keys and values once (with this adapter) and
            only the rest of each row per call (`prefix_cache`; Gemma 3 backbones). Exact.

    Example:
        >>> clf = AgileClassifier(load_model_source("tiny"), batch_size=8)
        >>> clf.predict_proba(["you are lovely", "you are awful"]).shape
        (2, 2)
    """

    def __init__(
        self,
        model: LoadedModel,
        prompt: PromptSettings | None = None,
        lora_weights: str | Path | None = None,
        threshold: float | None = None,
        batch_size: int = 8,
        jit_compile: bool | str = True,
        length_buckets: Sequence[int] | None = None,
        adapter: LoraAdapter | None = None,
        prefix_cache: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if lora_weights is not None and adapter is not None:
            raise ValueError("give lora_weights or adapter, not both")
        if lora_weights is not None:
            adapter = LoraAdapter.load(lora_weights, base_model=model.name)
        self.base = model
        self.adapter = adapter
        self.lora: LoraMetadata | None = adapter.metadata if adapter is not None else None
        self.slot = adapter_slot(model.backbone)
        if adapter is not None:
            adapter.check_base_model(model.name)
            if prompt is not None and prompt != adapter.metadata.prompt:
                raise ValueError(
                    "the prompt settings differ from those the LoRA weights were trained with: "
                    f"{prompt.to_dict()} vs {adapter.metadata.prompt.to_dict()}"
                )
            prompt = adapter.metadata.prompt
            # Enable LoRA before the scorer compiles, so its graph reads the LoRA variables.
            self.slot.enable(adapter.rank, adapter.target_layers)
        self.prompt = prompt or PromptSettings()
        self.encoder = PromptEncoder(model.tokenizer, self.prompt)  # checks single-token labels
        prefix_ids = self.encoder.head_ids if prefix_cache else None
        self.scorer = LabelTokenScorer(
            model.backbone, self.encoder.label_ids, jit_compile, prefix_ids=prefix_ids
        )
        if self.scorer.prefix is not None:  # keys/values of the head under this adapter
            self.scorer.prefix.refresh(0, lambda: self.slot.holding(self.adapter))
        self.batch_size = batch_size
        length = self.prompt.sequence_length
        self.length_buckets = tuple(sorted({int(b) for b in (length_buckets or ()) if b < length}))
        self.length_buckets += (length,)
        lora_sha = adapter.sha256 if adapter is not None else None
        self.identity = ModelIdentity(base_model=model.name, lora_sha256=lora_sha)
        self.threshold = resolve_threshold(threshold, model=self).value

    @property
    def calibrated_threshold(self) -> float | None:
        """The threshold calibrated into the LoRA metadata (validation split), if any."""
        return self.lora.threshold if self.lora is not None else None

    @property
    def labels(self) -> tuple[str, ...]:
        return self.prompt.labels

    @property
    def positive_label(self) -> str:
        return self.prompt.positive_label

    def predict_proba(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Label probabilities, float32 `[len(texts), len(labels)]`, rows summing to 1.

        `progress=True` shows a bar on stderr, for evaluations that take minutes on a CPU.
        """
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        starts = range(0, len(texts), self.batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="scoring", unit="batch", file=sys.stderr)
        for start in starts:
            chunk = texts[start : start + self.batch_size]
            batch = self.encoder.encode(chunk, batch_size=self.batch_size)
            if len(self.length_buckets) > 1:
                batch = batch.cut_to(self.length_buckets)
            with self.slot.holding(self.adapter):  # a write only if another adapter is in
                probs = self.scorer.probabilities(batch)
            out[start : start + len(chunk)] = probs[: len(chunk)]
        return out

    def length_bucket(self, text: str) -> int:
        """The compiled length `text`'s prompt needs: the smallest bucket that holds it."""
        return bucket_for(len(self.encoder.encode_ids(text)[0]), self.length_buckets)

    def canary_texts(self) -> list[str]:
        """One harmless text per compiled shape (length bucket), shortest first.

        The worker scores them at start (so every shape is compiled before it joins the
        group) and again when a whole batch fails, to tell a broken shape from bad comments.
        """
        texts: list[str] = []
        lower = 0
        for bucket in self.length_buckets:
            text = _text_in_bucket(self.encoder, lower, bucket)
            if text is not None:
                texts.append(text)
            lower = bucket
        return texts or ["hello"]

    def p_positive(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """p(positive label) per text: the score thresholds and ROC curves work on."""
        return self.predict_proba(texts, progress)[:, self.prompt.positive_index]

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Boolean decisions: p(positive label) >= threshold."""
        return self.p_positive(texts) >= self.threshold


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest of `buckets` (sorted, the last one the full sequence length) >= `length`."""
    return next((b for b in buckets if b >= length), buckets[-1])


def _text_in_bucket(encoder: PromptEncoder, lower: int, upper: int) -> str | None:
    """A text of repeated "hello" whose prompt is longer than `lower` tokens and at most `upper`."""
    fixed = len(encoder.head_ids) + len(encoder.tail_ids)
    words = max(1, upper - fixed)
    while words >= 1:
        text = " ".join(["hello"] * words)
        length = len(encoder.encode_ids(text)[0])
        if length <= upper:
            return text if length > lower else None
        words -= max(1, (length - upper) // 2)
    return None

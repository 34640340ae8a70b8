"""LoRA fine-tuning of the agile classifier: the loss sits on the label token only.

The codelab appends the label to the prompt and trains a causal LM on the whole sequence with
the prompt tokens masked out by sample weights. That is the same as a cross-entropy on the
one position that predicts the label, which is what `LabelTokenModel` computes directly: the
hidden state at the last prompt token, projected to logits. `loss="vocab"` projects onto the
whole vocabulary (the codelab's objective); `loss="labels"` onto the label tokens only (the
probabilities scoring reads). Sample weights remain for what they are really for here: class
balance.

Batches are padded to the longest prompt in the batch rounded up to `length_bucket` tokens,
not always to 128: with right padding and causal attention the label position's hidden state
does not depend on padding after it, so this is exact and most ETHOS prompts are short.

`train_lora` fits the LoRA variables of a backbone; `train_classifier` is the whole job the
`train` command runs: fit, take the factors out as a `LoraAdapter`, calibrate its threshold on
the validation rows (`calibrate_threshold`), record what it was trained for, and save it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np

from moderation_worker.model.classifier import AgileClassifier, LoadedModel
from moderation_worker.model.lora import LoraAdapter, LoraMetadata
from moderation_worker.model.lora_slot import adapter_slot
from moderation_worker.model.prompts import PromptEncoder, PromptSettings
from moderation_worker.model.scoring import LabelTokenModel
from moderation_worker.thresholds import ThresholdChoice, choose_threshold

LossKind = Literal["vocab", "labels"]


@dataclass(frozen=True)
class TrainingConfig:
    """The codelab's defaults: rank 4, Adam 5e-4, batch 2, 4 epochs (128 tokens via the prompt)."""

    rank: int = 4
    learning_rate: float = 5e-4
    batch_size: int = 2
    epochs: int = 4
    seed: int = 1234
    loss: LossKind = "vocab"
    balance_classes: bool = False
    target_layers: tuple[str, ...] = ("query_dense", "value_dense", "query", "value")
    length_bucket: int = 16

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "seed": self.seed,
            "loss": self.loss,
            "balance_classes": self.balance_classes,
            "target_layers": list(self.target_layers),
            "length_bucket": self.length_bucket,
        }


@dataclass
class TrainingResult:
    history: dict[str, list[float]]
    seconds: float
    trainable_parameters: int
    steps: int
    extra: dict[str, Any] = field(default_factory=dict)


class LabelledPromptBatches:
    """Shuffled batches of encoded prompts with the label target, length-bucketed.

    Yields `(inputs, targets, sample_weights)`; a new shuffle every epoch from a fixed seed.
    """

    def __init__(
        self,
        prompts: Sequence[list[int]],
        targets: np.ndarray,
        weights: np.ndarray,
        batch_size: int,
        pad_id: int,
        max_length: int,
        bucket: int,
        seed: int,
    ) -> None:
        self.prompts = prompts
        self.targets = targets
        self.weights = weights
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.max_length = max_length
        self.bucket = max(1, bucket)
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(prompts))

    def __len__(self) -> int:
        return int(np.ceil(len(self.prompts) / self.batch_size))

    def __getitem__(self, index: int):
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        longest = max(len(self.prompts[r]) for r in rows)
        length = min(self.max_length, int(np.ceil(longest / self.bucket) * self.bucket))
        token_ids = np.full((len(rows), length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), length), dtype=np.int32)
        last = np.zeros((len(rows),), dtype=np.int32)
        for i, r in enumerate(rows):
            ids = self.prompts[r]
            token_ids[i, : len(ids)] = ids
            mask[i, : len(ids)] = 1
            last[i] = len(ids) - 1
        inputs = {"token_ids": token_ids, "padding_mask": mask, "last_index": last}
        return inputs, self.targets[rows], self.weights[rows]

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.prompts))


def class_weights(labels: np.ndarray, balance: bool) -> np.ndarray:
    """Per-example weights: 1.0, or inverse class frequency (mean 1) when balancing."""
    if not balance:
        return np.ones(len(labels), dtype=np.float32)
    counts = np.bincount(labels, minlength=2).astype(np.float64)
    per_class = len(labels) / (len(counts) * np.maximum(counts, 1))
    return per_class[labels].astype(np.float32)


def train_lora(
    backbone: keras.Model,
    encoder: PromptEncoder,
    texts: Sequence[str],
    labels: np.ndarray,
    config: TrainingConfig = TrainingConfig(),
    verbose: int | str = 1,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    init: LoraAdapter | None = None,
    time_budget_s: float | None = None,
) -> TrainingResult:
    """Enable LoRA on `backbone` and fit it so the label token follows each prompt.

    `init` starts from an adapter's factors (same rank and target layers) instead of a fresh
    initialisation: the agile loop fine-tunes production further on new labels. Training
    stops at the first step after `time_budget_s` (`result.extra["stopped_early"]`).

    `labels` holds label indices into `encoder.settings.labels`. `verbose=1` shows a Keras
    progress bar per epoch; each batch shape compiles once (at most 128/bucket shapes).
    The seed fixes LoRA initialisation and shuffling. The fitted factors stay in the
    backbone's LoRA variables, which no adapter describes any more: take them out with
    `LoraAdapter.from_backbone` (classifiers on this backbone re-apply their own adapter).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n_labels = len(encoder.settings.labels)
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if len(texts) == 0:
        raise ValueError("no training examples")
    if labels.min() < 0 or labels.max() >= n_labels:
        raise ValueError(f"labels must be indices in [0, {n_labels})")
    slot = adapter_slot(backbone)
    with slot.lock:  # nobody scores through these variables while they are being fitted
        keras.utils.set_random_seed(config.seed)
        slot.start_training(config.rank, config.target_layers, config.seed)
        if init is not None:
            if init.rank != config.rank or set(init.factors) != set(slot.lora_layers()):
                raise ValueError(
                    f"cannot start from an adapter of rank {init.rank} on other layers than "
                    f"rank {config.rank} on {config.target_layers}"
                )
            slot.apply(init)
            slot.mark_modified()  # the fit below changes them; they are init's no longer
        return _fit(backbone, encoder, texts, labels, config, verbose, on_epoch, time_budget_s)


def _fit(
    backbone: keras.Model,
    encoder: PromptEncoder,
    texts: Sequence[str],
    labels: np.ndarray,
    config: TrainingConfig,
    verbose: int | str,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
    time_budget_s: float | None = None,
) -> TrainingResult:
    trainable = int(sum(np.prod(v.shape) for v in backbone.trainable_weights))
    if trainable == 0:
        raise ValueError(f"no layer matched LoRA targets {config.target_layers}")

    if config.loss == "vocab":
        model = LabelTokenModel(backbone, None)
        targets = np.asarray(encoder.label_ids, dtype=np.int64)[labels]
    elif config.loss == "labels":
        model = LabelTokenModel(backbone, encoder.label_ids)
        targets = labels
    else:
        raise ValueError(f"loss must be 'vocab' or 'labels', got {config.loss!r}")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    prompts = [encoder.encode_ids(t)[0] for t in texts]
    batches = LabelledPromptBatches(
        prompts,
        targets,
        class_weights(labels, config.balance_classes),
        config.batch_size,
        encoder.tokenizer.pad_id,
        encoder.settings.sequence_length,
        config.length_bucket,
        config.seed,
    )
    history: dict[str, list[float]] = {}
    start = time.perf_counter()
    steps, stopped = 0, False
    for epoch in range(config.epochs):
        bar = keras.utils.Progbar(len(batches), verbose=verbose)
        if verbose:
            print(f"Epoch {epoch + 1}/{config.epochs}", flush=True)
        sums: dict[str, float] = {}
        for step in range(len(batches)):
            inputs, y, weights = batches[step]
            # train_on_batch reports this batch's values; the Progbar and `sums` average them.
            logs = model.train_on_batch(inputs, y, sample_weight=weights, return_dict=True)
            values = [(k, float(v)) for k, v in logs.items()]
            for key, value in values:
                sums[key] = sums.get(key, 0.0) + value
            bar.update(step + 1, values=values)
            steps += 1
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                stopped = True
                break
        means = {k: v / max(1, step + 1) for k, v in sums.items()}
        for key, value in means.items():
            history.setdefault(key, []).append(value)
        batches.on_epoch_end()
        if on_epoch is not None:
            on_epoch(epoch, means)
        if stopped:
            print(f"time budget of {time_budget_s:.0f} s spent: stopped in epoch {epoch + 1}")
            break
    seconds = time.perf_counter() - start
    return TrainingResult(
        history=history,
        seconds=seconds,
        trainable_parameters=trainable,
        steps=steps,
        extra={"stopped_early": stopped},
    )


ValidationReport = Callable[[np.ndarray, np.ndarray, float], dict[str, Any]]


@dataclass(frozen=True)
class TrainedAdapter:
    """What `train_classifier` made: the adapter (saved when a path was given), the training
    run, and the threshold calibrated on the validation rows (None when they cannot tell)."""

    adapter: LoraAdapter
    training: TrainingResult
    threshold: ThresholdChoice | None

    @property
    def metadata(self) -> LoraMetadata:
        return self.adapter.metadata

    def summary(self) -> dict[str, Any]:
        """JSON-ready: where the weights are, the threshold and its validation metrics."""
        return {
            "lora_weights": None if self.adapter.path is None else str(self.adapter.path),
            "threshold": self.metadata.threshold,
            "policy": self.metadata.threshold_policy,
            "validation": self.metadata.metrics.get("validation"),
        }


def calibrate_threshold(
    classifier: AgileClassifier,
    texts: Sequence[str],
    labels: np.ndarray,
    policy: str = "max-f1",
    progress: bool = False,
) -> ThresholdChoice:
    """Score labelled rows (1 = the positive label) and choose a threshold by `policy`."""
    p_positive = classifier.p_positive(texts, progress=progress)
    return choose_threshold(np.asarray(labels), p_positive, policy)


def train_classifier(
    base: LoadedModel,
    texts: Sequence[str],
    labels: np.ndarray,
    validation_texts: Sequence[str] = (),
    validation_labels: np.ndarray | None = None,
    *,
    prompt: PromptSettings | None = None,
    config: TrainingConfig = TrainingConfig(),
    policy: str = "max-f1",
    out: str | Path | None = None,
    data_sha256: str | None = None,
    notes: Mapping[str, Any] | None = None,
    validation_report: ValidationReport | None = None,
    batch_size: int = 8,
    verbose: int | str = 1,
    progress: bool = False,
    init: LoraAdapter | None = None,
    time_budget_s: float | None = None,
) -> TrainedAdapter:
    """Train a LoRA adapter for a binary prompt, calibrate its threshold, save it.

    Args:
        base: the base model; its backbone's LoRA variables are used for the fit.
        texts, labels: training rows; labels are 0/1 with 1 = the prompt's positive label.
        validation_texts, validation_labels: rows to calibrate the threshold on; with fewer
            than both classes the threshold is 0.5 and no policy is recorded.
        prompt: the prompt to train for (two labels); default `PromptSettings()`.
        config: training settings (rank, learning rate, epochs, seed, loss, targets).
        policy: threshold policy (`thresholds.parse_policy`), e.g. "max-f1".
        out: path prefix to write `out.lora.h5` and `out.lora.json`; None keeps it in memory.
        data_sha256: hash of the training data, recorded in the metadata.
        notes: more facts for the metadata's `training` record (e.g. the data source).
        validation_report: `(labels, p_positive, threshold) -> dict` of validation metrics for
            the metadata; default the chosen operating point (`ThresholdChoice`).
        batch_size: rows per model call when scoring the validation rows.
        verbose: Keras progress bars while training; `progress`: a bar while scoring.
        init, time_budget_s: start from this adapter; stop training after this long
            (`train_lora`).

    Example:
        >>> trained = train_classifier(base, texts, labels, val_texts, val_labels, out="m")
        >>> AgileClassifier(base, adapter=trained.adapter).threshold  # the calibrated one
    """
    prompt = prompt or PromptSettings()
    if len(prompt.labels) != 2:
        raise ValueError(
            f"binary labels need a prompt with exactly two labels, got {prompt.labels}"
        )
    binary = np.asarray(labels, dtype=np.int64)
    if binary.size and not np.isin(binary, (0, 1)).all():
        raise ValueError("labels must be 0 or 1 (1 = the positive label)")
    indices = np.where(binary == 1, prompt.positive_index, 1 - prompt.positive_index)
    encoder = PromptEncoder(base.tokenizer, prompt)
    result = train_lora(
        base.backbone,
        encoder,
        texts,
        indices,
        config,
        verbose=verbose,
        init=init,
        time_budget_s=time_budget_s,
    )
    metadata = LoraMetadata(
        base_model=base.name,
        prompt=prompt,
        rank=config.rank,
        target_layers=config.target_layers,
        data_sha256=data_sha256,
        training={
            **config.to_dict(),
            "train_rows": len(texts),
            "validation_rows": len(validation_texts),
            **(notes or {}),
            "seconds": round(result.seconds, 1),
            "trainable_parameters": result.trainable_parameters,
            **({"init_sha256": init.sha256} if init is not None else {}),
            **({"stopped_early": True} if result.extra.get("stopped_early") else {}),
        },
        metrics={"train_history": result.history},
    )
    adapter = LoraAdapter.from_backbone(base.backbone, metadata)

    choice = None
    y_val = np.asarray(validation_labels if validation_labels is not None else [], np.int64)
    if len(validation_texts) and len(set(y_val.tolist())) == 2:
        clf = AgileClassifier(base, adapter=adapter, batch_size=batch_size)
        p_val = clf.p_positive(validation_texts, progress=progress)
        choice = choose_threshold(y_val, p_val, policy)
        report = validation_report(y_val, p_val, choice.threshold) if validation_report else None
        metadata.metrics["validation"] = report if report is not None else choice.to_dict()
    adapter = adapter.with_metadata(
        replace(
            metadata,
            threshold=choice.threshold if choice else 0.5,
            threshold_policy=choice.policy if choice else None,
        )
    )
    if out is not None:
        adapter = adapter.save(out)
    return TrainedAdapter(adapter, result, choice)

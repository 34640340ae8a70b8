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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import keras
import numpy as np

from moderation_worker.model.prompts import PromptEncoder
from moderation_worker.model.scoring import LabelTokenModel

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
) -> TrainingResult:
    """Enable LoRA on `backbone` and fit it so the label token follows each prompt.

    `labels` holds label indices into `encoder.settings.labels`. `verbose=1` shows a Keras
    progress bar per epoch; each batch shape compiles once (at most 128/bucket shapes).
    The seed fixes LoRA initialisation and shuffling.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n_labels = len(encoder.settings.labels)
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if len(texts) == 0:
        raise ValueError("no training examples")
    if labels.min() < 0 or labels.max() >= n_labels:
        raise ValueError(f"labels must be indices in [0, {n_labels})")
    keras.utils.set_random_seed(config.seed)
    backbone.enable_lora(config.rank, target_layer_names=list(config.target_layers))
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
        means = {k: v / len(batches) for k, v in sums.items()}
        for key, value in means.items():
            history.setdefault(key, []).append(value)
        batches.on_epoch_end()
        if on_epoch is not None:
            on_epoch(epoch, means)
    seconds = time.perf_counter() - start
    return TrainingResult(
        history=history,
        seconds=seconds,
        trainable_parameters=trainable,
        steps=len(batches) * config.epochs,
    )

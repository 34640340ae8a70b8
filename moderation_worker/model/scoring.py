"""Batched label-token scoring: one backbone call, then logits for the label tokens only.

The codelab computes the full vocabulary's logits at every position and reads one row. For
Gemma 3 270M that is 128 x 262,144 logits per comment (~21 GFLOP of output projection, more
than the whole transformer stack). Here the model reads the hidden state at each row's last
real token and multiplies it with the (tied) embedding rows of the label tokens alone:
`[batch, hidden] x [hidden, labels]`. Same numbers, a fraction of the work.

Everything is `keras.ops`, so TensorFlow (CPU) and JAX (GPU) run the same code.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from moderation_worker.model.prefix_cache import PrefixCache, supports
from moderation_worker.model.prompts import EncodedBatch


def last_token_hidden(hidden: object, last_index: object) -> object:
    """Pick `hidden[b, last_index[b], :]` for each row, as `[batch, hidden]`.

    A one-hot contraction instead of a gather keeps it identical on every backend and costs
    batch x length x hidden multiply-adds, noise next to the backbone.
    """
    length = ops.shape(hidden)[1]
    pick = ops.one_hot(ops.cast(last_index, "int32"), length, dtype=hidden.dtype)
    return ops.einsum("bl,blh->bh", pick, hidden)


def output_logits(embedding: keras.layers.Layer, hidden: object, token_ids: Sequence[int] | None):
    """Logits of `hidden` against the output embedding, for `token_ids` only (or all tokens).

    Mirrors `ReversibleEmbedding.call(reverse=True)` (tied weights, reverse dtype, soft cap)
    so the label logits equal the corresponding columns of the full `CausalLM` logits.
    """
    if getattr(embedding, "tie_weights", True):
        table = embedding.embeddings  # [vocab, hidden]
        kernel = ops.transpose(table if token_ids is None else ops.take(table, token_ids, axis=0))
    else:
        table = embedding.reverse_embeddings  # [hidden, vocab]
        kernel = table if token_ids is None else ops.take(table, token_ids, axis=1)
    reverse_dtype = getattr(embedding, "reverse_dtype", None)
    if reverse_dtype is not None:
        hidden = ops.cast(hidden, reverse_dtype)
        kernel = ops.cast(kernel, reverse_dtype)
    else:
        kernel = ops.cast(kernel, hidden.dtype)
    logits = ops.matmul(hidden, kernel)
    soft_cap = getattr(embedding, "logit_soft_cap", None)
    if soft_cap is not None:
        logits = ops.multiply(ops.tanh(ops.divide(logits, soft_cap)), soft_cap)
    return ops.cast(logits, "float32")


class LabelTokenModel(keras.Model):
    """Backbone + last-real-token pick + label-token logits: the classifier as one Keras model.

    Inputs are `{"token_ids", "padding_mask", "last_index"}`; output is float32 logits
    `[batch, len(label_ids)]`, or `[batch, vocabulary]` when `label_ids` is None (used by the
    training loss that matches the codelab's language-model objective at the label position).

    Args:
        backbone: a KerasHub Gemma/Gemma3 backbone (LoRA may be enabled on it).
        label_ids: the vocabulary ids of the labels, in label order, or None for all tokens.
        prefix: the shared prompt head's keys and values (`prefix_cache.PrefixCache`): every
            row must start with its tokens, and only the positions after it are computed.
    """

    def __init__(
        self,
        backbone: keras.Model,
        label_ids: Sequence[int] | None,
        prefix: PrefixCache | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.backbone = backbone
        self.label_ids = None if label_ids is None else [int(i) for i in label_ids]
        self.prefix = prefix

    def call(self, inputs: dict[str, object]) -> object:
        return label_logits(self.backbone, self.prefix, inputs, self.label_ids, rows=None)


def label_logits(
    backbone: keras.Model,
    prefix: PrefixCache | None,
    inputs: dict[str, object],
    label_ids: Sequence[int] | None,
    rows: object | None,
) -> object:
    """The label logits at each row's last real token, through the prefix cache when given
    (`rows`: each row's adapter slot in it, or None for slot 0)."""
    if prefix is None:
        hidden = backbone(
            {"token_ids": inputs["token_ids"], "padding_mask": inputs["padding_mask"]}
        )
        last = last_token_hidden(hidden, inputs["last_index"])
    else:
        hidden = prefix.hidden(inputs["token_ids"], inputs["padding_mask"], rows)
        last = last_token_hidden(hidden, ops.subtract(inputs["last_index"], prefix.length))
    return output_logits(backbone.token_embedding, last, label_ids)


def softmax_np(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float64 then float32."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


class LabelTokenScorer:
    """Scores fixed-shape encoded batches; one compiled graph per batch shape, reused.

    Args:
        backbone: the KerasHub backbone.
        label_ids: vocabulary ids of the labels.
        jit_compile: compile the forward pass with XLA (the default on JAX; measured on TF).
        prefix_ids: the prompt head every row starts with, to compute once (`refresh_prefix`
            after the backbone's weights change); None, or a backbone without support: off.
    """

    def __init__(
        self,
        backbone: keras.Model,
        label_ids: Sequence[int],
        jit_compile: bool | str = "auto",
        prefix_ids: Sequence[int] | None = None,
    ) -> None:
        prefix = PrefixCache(backbone, prefix_ids) if prefix_ids and supports(backbone) else None
        self.model = LabelTokenModel(backbone, label_ids, prefix)
        self.model.compile(jit_compile=jit_compile)

    @property
    def prefix(self) -> PrefixCache | None:
        return self.model.prefix

    def logits(self, batch: EncodedBatch) -> np.ndarray:
        out = self.model.predict_on_batch(batch.as_inputs())
        return np.asarray(out, dtype=np.float32)

    def probabilities(self, batch: EncodedBatch) -> np.ndarray:
        return softmax_np(self.logits(batch))

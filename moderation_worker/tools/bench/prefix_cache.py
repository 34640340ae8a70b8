"""Path (c) with the shared prompt head computed once: a measured prototype of a prefix cache.

The tuning table times it; moving it into `model/scoring.py` would also need the cache rebuilt
whenever LoRA weights are loaded, since the prefix keys depend on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from moderation_worker.model.prompts import EncodedBatch, PromptEncoder
from moderation_worker.model.scoring import last_token_hidden, output_logits, softmax_np


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

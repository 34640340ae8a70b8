"""The shared prompt head computed once per adapter, not once per row.

Every prompt of a classifier starts with the same tokens (BOS, the instructions, the labels,
`Text:`): 24 of the ~50 tokens of a typical ETHOS prompt with the default prompt. Their keys
and values in each attention layer depend only on those tokens and on the adapter's weights,
so they are computed once, kept in (non-trainable) variables, and each batch runs only the
positions after the head through KerasHub's cached decoder-layer call
(`cache_update_index = prefix`), the way generation reuses a prompt's cache. Exact under right
padding and causal attention (BENCHMARKS.md measures the gap: ~1e-6).

One row of keys/values per adapter slot: a single-adapter classifier has one; a
`ClassifierSet` has one per stack slot, gathered per row by the row's adapter index, and
recomputed for a slot whenever an adapter is written into it. Variables, not constants, so
a recompute needs no recompilation (TensorFlow and JAX read variables at call time).

Gemma 3 backbones only (their decoder blocks take `cache` as a `(key, value)` pair);
`supports(backbone)` says so and callers fall back to the full forward pass otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import keras
import numpy as np
from keras import ops


def supports(backbone: keras.Model) -> bool:
    """Whether `backbone`'s decoder blocks take a `(key, value)` cache (Gemma 3's do)."""
    return type(backbone).__name__ == "Gemma3Backbone" and hasattr(backbone, "transformer_layers")


def common_prefix(heads: Sequence[Sequence[int]]) -> list[int]:
    """The longest run of token ids every prompt head starts with."""
    out: list[int] = []
    for column in zip(*heads, strict=False):
        if any(token != column[0] for token in column):
            break
        out.append(int(column[0]))
    return out


class PrefixCache(keras.layers.Layer):
    """Per-layer keys and values of one shared prefix, one row per adapter slot.

    Args:
        backbone: a KerasHub `Gemma3Backbone`.
        prefix_ids: the token ids every row starts with (at least BOS).
        slots: adapter slots (1 for a single-adapter classifier).
    """

    def __init__(self, backbone: keras.Model, prefix_ids: Sequence[int], slots: int = 1) -> None:
        super().__init__(name="prefix_cache", dtype=backbone.dtype_policy)
        if not supports(backbone):
            raise ValueError(f"no prefix cache for {type(backbone).__name__} backbones")
        if not prefix_ids:
            raise ValueError("the prefix needs at least one token")
        self.prefix_ids = [int(i) for i in prefix_ids]
        self.length = len(self.prefix_ids)
        self.slots = slots
        shape = (slots, self.length, backbone.num_key_value_heads, backbone.head_dim)
        dtype = backbone.compute_dtype
        self.keys = [
            self.add_weight(shape=shape, initializer="zeros", dtype=dtype, trainable=False)
            for _ in backbone.transformer_layers
        ]
        self.values_ = [
            self.add_weight(shape=shape, initializer="zeros", dtype=dtype, trainable=False)
            for _ in backbone.transformer_layers
        ]
        self._backbone_ref = [backbone]  # not tracked: the backbone belongs to its model
        # Every weight exists now. Left unbuilt (it is used through `hidden`, never called),
        # Keras on JAX would run the whole model eagerly before every `predict_on_batch`.
        self.built = True

    @property
    def backbone(self) -> keras.Model:
        return self._backbone_ref[0]

    def refresh(self, slot: int = 0, weights: Callable[[], AbstractContextManager] | None = None):
        """Recompute `slot`'s keys and values with the weights in force inside `weights()` (the
        adapter written into the backbone, or a per-row stack context for that slot)."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot must be in [0, {self.slots}), got {slot}")
        backbone = self.backbone
        ids = np.asarray([self.prefix_ids], dtype=np.int32)
        mask = np.ones_like(ids)
        shape = (1, self.length, backbone.num_key_value_heads, backbone.head_dim)
        with weights() if weights is not None else nullcontext():
            x = embed(backbone, ids)
            for i, layer in enumerate(backbone.transformer_layers):
                empty = (ops.zeros(shape, x.dtype), ops.zeros(shape, x.dtype))
                x, (k, v) = layer(x, padding_mask=mask, cache=empty, cache_update_index=0)
                for store, new in ((self.keys[i], k), (self.values_[i], v)):
                    value = ops.convert_to_numpy(store)
                    value[slot] = ops.convert_to_numpy(new)[0]
                    store.assign(value)

    def hidden(self, token_ids: object, padding_mask: object, rows: object | None) -> object:
        """Final hidden states of positions `prefix..` of each row (after the last norm).

        `rows` are each row's slot (`[batch]` int32), or None for slot 0 in every row.
        Positions before the prefix come from the cache; the mask still covers all of them.
        """
        backbone = self.backbone
        batch, width = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        h = embed(backbone, token_ids[:, self.length :])
        tail = (batch, width - self.length, backbone.num_key_value_heads, backbone.head_dim)
        for layer, k, v in zip(backbone.transformer_layers, self.keys, self.values_, strict=True):
            cache = tuple(
                ops.concatenate([_per_row(c, rows, batch), ops.zeros(tail, h.dtype)], axis=1)
                for c in (k, v)
            )
            h, _ = layer(h, padding_mask=padding_mask, cache=cache, cache_update_index=self.length)
        return backbone.layer_norm(h)


def embed(backbone: keras.Model, token_ids: object) -> object:
    """Gemma 3's text embedding: the token table scaled by sqrt(hidden_dim)."""
    x = backbone.token_embedding(token_ids)
    return x * ops.cast(ops.sqrt(backbone.hidden_dim), x.dtype)


def _per_row(store: object, rows: object | None, batch: object) -> object:
    """`store[rows[b]]` for each row, or slot 0 broadcast over the batch."""
    if rows is None:
        return ops.broadcast_to(store[:1], (batch, *store.shape[1:]))
    return ops.take(store, rows, axis=0)

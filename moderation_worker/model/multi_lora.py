"""Per-row LoRA: every row of one batch runs through the shared backbone with its own adapter.

The S-LoRA / Punica idea in `keras.ops`: the base projection `x W` is computed once for the
whole batch; each row then adds its own low-rank delta `(x A_i) B_i`, with `A_i, B_i` gathered
from the adapters stacked along a new leading axis. So one compiled graph per batch shape
serves any mix of classifiers, and an extra classifier costs its factors (about a megabyte),
never another copy of the backbone or another pass over it.

How it is wired: `AdapterStack` holds the stacked factors as (non-trainable) Keras variables
and, once per layer, replaces the `call` of each LoRA-targeted `EinsumDense` layer with one
that reads the active stack and the batch's per-row adapter indices from a context variable
(so several stacks, e.g. sets of different sizes, can share one backbone). The indices are a
model input (`adapter_index`), so they are a tensor of the traced graph (TensorFlow or JAX
alike), not a Python value baked in at compile time. Outside `rows_using(...)` the layers run
their own `call`, so single-adapter classifiers on the same backbone are unaffected.

Stack slot 0 is the identity (zeros): rows that use no adapter (zero-shot) point at it. The
LoRA scale `alpha / rank` is 1, KerasHub's default; lower ranks are zero-padded (exact).
"""

from __future__ import annotations

import contextlib
import contextvars
import string
import weakref
from collections.abc import Iterator, Sequence

import keras
import numpy as np
from keras import ops

from moderation_worker.model.lora import DEFAULT_TARGET_LAYERS, LoraAdapter
from moderation_worker.model.lora_slot import _weighted_layers
from moderation_worker.model.prefix_cache import PrefixCache
from moderation_worker.model.scoring import label_logits

#: The stack and per-row adapter indices (`[batch]` int32) of the call being traced.
_ROW_ADAPTERS: contextvars.ContextVar[tuple[AdapterStack, object] | None] = contextvars.ContextVar(
    "row_adapters", default=None
)
#: Layers whose `call` was replaced already (once per layer, whatever the number of stacks).
_PATCHED: weakref.WeakSet[keras.layers.Layer] = weakref.WeakSet()


@contextlib.contextmanager
def rows_using(stack: AdapterStack, adapter_index: object) -> Iterator[None]:
    """Inside the block, `stack`'s layers apply row `i`'s adapter `adapter_index[i]`."""
    token = _ROW_ADAPTERS.set((stack, adapter_index))
    try:
        yield
    finally:
        _ROW_ADAPTERS.reset(token)


def _delta_equations(equation: str) -> tuple[str, str]:
    """From `btd,dnh->btnh`: `btd,bdnr->btnr` (x A, per row) and `btnr,brh->btnh` (then B).

    KerasHub's LoRA factors an EinsumDense kernel `[..., out]` as `A [..., rank]` times
    `B [rank, out]`; the per-row versions gain the input's batch letter in front.
    """
    if "." in equation:
        raise ValueError(f"per-row LoRA does not support ellipsis equations ({equation!r})")
    inputs, out = equation.split("->")
    x_spec, k_spec = inputs.split(",")
    batch, feature = x_spec[0], k_spec[-1]
    if out[-1] != feature or feature in x_spec or batch not in out:
        raise ValueError(f"per-row LoRA cannot factor EinsumDense equation {equation!r}")
    r = next(c for c in string.ascii_lowercase[::-1] if c not in equation)
    low = out[:-1] + r
    return f"{x_spec},{batch}{k_spec[:-1]}{r}->{low}", f"{low},{batch}{r}{feature}->{out}"


class _Untracked:
    """A box Keras's attribute tracking does not look into."""

    def __init__(self, value: object) -> None:
        self.value = value


class AdapterStack(keras.layers.Layer):
    """`capacity` adapters' LoRA factors, stacked per targeted layer of one backbone.

    Args:
        backbone: the shared KerasHub backbone.
        capacity: adapter slots, counting slot 0 (the identity).
        rank: the highest adapter rank the stack holds.
        target_layers: names of the layers that get LoRA (KerasHub's targets).
    """

    def __init__(
        self,
        backbone: keras.Model,
        capacity: int,
        rank: int,
        target_layers: Sequence[str] = DEFAULT_TARGET_LAYERS,
        **kwargs,
    ) -> None:
        super().__init__(trainable=False, **kwargs)
        if capacity < 2:
            raise ValueError(
                f"capacity must be >= 2 (the identity and one adapter), got {capacity}"
            )
        self.capacity, self.rank = int(capacity), int(rank)
        self.target_layers = tuple(target_layers)
        self._a: dict[int, keras.Variable] = {}
        self._b: dict[int, keras.Variable] = {}
        self._host: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        targets: dict[int, keras.layers.Layer] = {}
        for index, layer in enumerate(_weighted_layers(backbone)):
            if layer.name not in self.target_layers or not hasattr(layer, "enable_lora"):
                continue
            if not hasattr(layer, "equation") or getattr(layer, "quantization_mode", None):
                raise ValueError(
                    f"per-row LoRA needs float EinsumDense layers; {layer.name} is not"
                )
            kernel_shape = tuple(int(s) for s in layer._kernel.shape)
            a_shape = (self.capacity, *kernel_shape[:-1], self.rank)
            b_shape = (self.capacity, self.rank, kernel_shape[-1])
            self._host[index] = (np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32))
            self._a[index] = self.add_weight(
                shape=a_shape, initializer="zeros", trainable=False, name=f"lora_a_{index}"
            )
            self._b[index] = self.add_weight(
                shape=b_shape, initializer="zeros", trainable=False, name=f"lora_b_{index}"
            )
            targets[index] = layer
        # Not a tracked attribute: the backbone's layers must not become this layer's sublayers.
        self._targets = _Untracked(targets)
        if not targets:
            raise ValueError(f"no layer of the backbone matched LoRA targets {self.target_layers}")
        for index, layer in targets.items():
            self._patch(index, layer)
        self.built = True

    @property
    def layers_by_index(self) -> dict[int, keras.layers.Layer]:
        return self._targets.value

    def _patch(self, index: int, layer: keras.layers.Layer) -> None:
        """Give `layer` (once) a `call` that adds each row's delta while a stack is active."""
        if layer in _PATCHED:
            return
        _PATCHED.add(layer)
        own_call = layer.call
        first, second = _delta_equations(layer.equation)

        def call(inputs, training=None):
            active = _ROW_ADAPTERS.get()
            if active is None:
                return own_call(inputs, training=training)
            stack, rows = active
            x = ops.einsum(layer.equation, inputs, layer._kernel)  # the base, LoRA-free
            if index in stack._a:  # a layer another stack targets: the base alone
                a = ops.take(stack._a[index], rows, axis=0)
                b = ops.take(stack._b[index], rows, axis=0)
                x = ops.add(x, ops.einsum(second, ops.einsum(first, inputs, a), b))
            if layer.bias is not None:
                x = ops.add(x, layer.bias)
            if layer.activation is not None:
                x = layer.activation(x)
            return x

        layer.call = call

    def put(self, slot: int, adapter: LoraAdapter | None) -> None:
        """Write `adapter`'s factors (None: zeros) into `slot`. No recompilation: the compiled
        graphs read the variables."""
        if not 1 <= slot < self.capacity:
            raise ValueError(f"slot must be in [1, {self.capacity}), got {slot}")
        factors = adapter.factors if adapter is not None else {}
        if adapter is not None:
            if adapter.rank > self.rank:
                raise ValueError(f"adapter rank {adapter.rank} exceeds the stack's {self.rank}")
            stray = sorted(set(factors) - set(self.layers_by_index))
            if stray:
                raise ValueError(
                    f"the adapter has factors for layers {stray[:5]} outside this stack's "
                    f"targets {self.target_layers}"
                )
        for index in self.layers_by_index:
            host_a, host_b = self._host[index]
            host_a[slot] = 0.0
            host_b[slot] = 0.0
            if index in factors:
                a, b = factors[index]
                if a.shape[:-1] != host_a.shape[1:-1] or b.shape[1:] != host_b.shape[2:]:
                    raise ValueError(
                        f"LoRA factors of layer {index} have shapes {a.shape}, {b.shape}; "
                        f"the backbone's are {host_a.shape[1:]}, {host_b.shape[1:]}"
                    )
                host_a[slot][..., : a.shape[-1]] = a
                host_b[slot][: b.shape[0]] = b
            self._a[index].assign(host_a)
            self._b[index].assign(host_b)

    def nbytes_per_slot(self) -> int:
        """Memory one more classifier costs in the stack (its factors, float32)."""
        return sum(a[0].nbytes + b[0].nbytes for a, b in self._host.values())


class MultiLoraModel(keras.Model):
    """Backbone + per-row LoRA + label-token logits, for rows of many classifiers at once.

    Inputs: `token_ids`, `padding_mask`, `last_index` as in `LabelTokenModel`, plus
    `adapter_index` (`[batch]` int32, each row's stack slot). Output: float32 logits
    `[batch, len(label_ids)]` over the union of every classifier's label tokens; the caller
    picks each row's own columns. With a `PrefixCache` of one row per stack slot, only the
    positions after the shared prompt head are computed (each row reads its slot's keys).
    """

    def __init__(
        self,
        backbone: keras.Model,
        stack: AdapterStack,
        label_ids: Sequence[int],
        prefix: PrefixCache | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.stack = stack
        self.label_ids = [int(i) for i in label_ids]
        self.prefix = prefix

    def call(self, inputs: dict[str, object]) -> object:
        rows = ops.cast(inputs["adapter_index"], "int32")
        with rows_using(self.stack, rows):
            return label_logits(self.backbone, self.prefix, inputs, self.label_ids, rows)

"""Applying LoRA adapters to a shared backbone: one slot of LoRA variables per backbone.

KerasHub puts LoRA into a backbone as variables (`lora_kernel_a`, `lora_kernel_b` of each
targeted layer). `AdapterSlot` owns those variables for everything that uses the backbone: it
enables LoRA once, remembers which `LoraAdapter` the variables hold, and writes another one's
factors in only when a caller asks for it (`holding(adapter)` around each model call). A write
is an assignment of kilobytes to a few MB, with no disk read and no recompilation, since the
compiled graphs read the variables; asking for the adapter already there costs nothing.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import numpy as np

from moderation_worker.model.lora import DEFAULT_TARGET_LAYERS, LoraAdapter, LoraMetadata

_UNKNOWN = object()  # the slot's variables hold something no adapter object describes


def _weighted_layers(backbone: keras.Model) -> list[keras.layers.Layer]:
    """The backbone's layers that have weights, in KerasHub's order: a `.lora.h5`'s keys."""
    return [layer for layer in backbone._flatten_layers(include_self=False) if layer.weights]


class AdapterSlot:
    """The LoRA variables of one backbone, and which adapter they hold now.

    Get it with `adapter_slot(backbone)`: one slot per backbone, shared by every classifier
    on it. LoRA is enabled on the backbone once, with the first adapter's rank and targets;
    an adapter of a lower rank is zero-padded into it (exact: the padded rows of `B` are
    zero, and the scale `alpha / rank` is 1 either way). `active` is the adapter in the
    variables, None for none (the identity), or unknown after training wrote into them.

    Args:
        backbone: the shared KerasHub backbone.
    """

    def __init__(self, backbone: keras.Model) -> None:
        self._backbone = weakref.ref(backbone)  # the slot must not keep a backbone alive
        self.lock = threading.RLock()
        self.active: Any = None  # before LoRA is enabled the backbone is the base model
        self.writes = 0  # how many times factors were written into the variables

    @property
    def backbone(self) -> keras.Model:
        backbone = self._backbone()
        if backbone is None:
            raise RuntimeError("the backbone of this adapter slot no longer exists")
        return backbone

    @property
    def enabled(self) -> bool:
        return bool(getattr(self.backbone, "_lora_enabled_layers", None))

    @property
    def rank(self) -> int | None:
        return getattr(self.backbone, "_lora_rank", None) if self.enabled else None

    def lora_layers(self) -> dict[int, keras.layers.Layer]:
        """LoRA-enabled layers by their `.lora.h5` index."""
        if not self.enabled:
            return {}
        layers = _weighted_layers(self.backbone)
        return {i: layers[i] for i in self.backbone._lora_enabled_layers}

    def enable(self, rank: int, target_layers: Sequence[str] = DEFAULT_TARGET_LAYERS) -> None:
        """Enable LoRA once; later calls only check that `rank` fits the enabled rank."""
        with self.lock:
            if self.enabled:
                if rank > self.rank:
                    raise ValueError(
                        f"LoRA is enabled on this backbone with rank {self.rank}; an adapter "
                        f"of rank {rank} does not fit (build the highest-rank one first)"
                    )
                return
            self.backbone.enable_lora(rank, target_layer_names=list(target_layers))
            if not self.enabled:
                raise ValueError(f"no layer of the backbone matched LoRA targets {target_layers}")
            # KerasHub initialises B to zeros, so the new variables are the identity already.
            self.active = None

    def start_training(self, rank: int, target_layers: Sequence[str], seed: int) -> None:
        """Enable LoRA (or check it is enabled with `rank` on `target_layers`) and put a fresh
        initialisation in: the variables then belong to the training run, to no adapter.

        On a new backbone KerasHub's own initialisation is kept (A he-uniform, B zeros, drawn
        from the global seed); on one whose slot already held adapters, the same
        distributions are drawn again from `seed`.
        """
        with self.lock:
            if not self.enabled:
                self.enable(rank, target_layers)
            else:
                wanted = {
                    i
                    for i, layer in enumerate(_weighted_layers(self.backbone))
                    if layer.name in target_layers and hasattr(layer, "enable_lora")
                }
                if self.rank != rank or wanted != set(self.lora_layers()):
                    raise ValueError(
                        f"LoRA is enabled on this backbone with rank {self.rank} on other "
                        f"layers; cannot train rank {rank} on {tuple(target_layers)} here "
                        "(use a fresh base model)"
                    )
                for i, layer in enumerate(self.lora_layers().values()):
                    init = keras.initializers.HeUniform(seed=seed + i)
                    shape = tuple(layer.lora_kernel_a.shape)
                    layer.lora_kernel_a.assign(init(shape, dtype="float32"))
                    layer.lora_kernel_b.assign(np.zeros(layer.lora_kernel_b.shape, np.float32))
            self.mark_modified()

    def capture(self, metadata: LoraMetadata) -> LoraAdapter:
        """The factors now in the variables as an adapter (after training), now the active one."""
        with self.lock:
            if self.rank != metadata.rank:
                raise ValueError(
                    f"the backbone's LoRA rank is {self.rank}, the metadata says {metadata.rank}"
                )
            factors = {
                index: (
                    keras.ops.convert_to_numpy(layer.lora_kernel_a),
                    keras.ops.convert_to_numpy(layer.lora_kernel_b),
                )
                for index, layer in self.lora_layers().items()
            }
            adapter = LoraAdapter(factors, metadata)
            self.active = adapter
            return adapter

    def mark_modified(self) -> None:
        """Something other than `apply` (training) wrote into the LoRA variables."""
        self.active = _UNKNOWN

    def apply(self, adapter: LoraAdapter | None) -> bool:
        """Put `adapter` (None: the identity) into the LoRA variables unless it is there.

        Returns whether anything was written. Cheap either way: no disk, no recompilation.
        """
        with self.lock:
            if self.active is adapter:
                return False
            if not self.enabled:
                if adapter is None:
                    return False  # a base model without LoRA is the identity already
                self.enable(adapter.rank, adapter.target_layers)
            layers = self.lora_layers()
            factors = adapter.factors if adapter is not None else {}
            if adapter is not None and adapter.rank != self.rank:
                # Zero-padding a lower rank is exact only while the scale alpha/rank is 1.
                if any(layer.lora_alpha != layer.lora_rank for layer in layers.values()):
                    raise ValueError(f"cannot pad a rank-{adapter.rank} adapter to {self.rank}")
            stray = sorted(set(factors) - set(layers))
            if stray:
                raise ValueError(
                    f"the adapter has factors for layers {stray[:5]} where LoRA is not enabled "
                    "on this backbone (different target layers?)"
                )
            for index, layer in layers.items():
                a, b = factors.get(index, (None, None))
                layer.lora_kernel_a.assign(_padded(a, layer.lora_kernel_a.shape, -1, index))
                layer.lora_kernel_b.assign(_padded(b, layer.lora_kernel_b.shape, 0, index))
            self.active = adapter
            self.writes += 1
            return True

    @contextlib.contextmanager
    def holding(self, adapter: LoraAdapter | None) -> Iterator[None]:
        """`adapter` is in the variables, and stays there, for the duration of the block."""
        with self.lock:
            self.apply(adapter)
            yield


def _padded(factor: np.ndarray | None, shape: Sequence[int], rank_axis: int, index: int):
    """`factor` zero-padded along its rank axis to the variable's shape (zeros for None)."""
    shape = tuple(int(s) for s in shape)
    out = np.zeros(shape, dtype=np.float32)
    if factor is None:
        return out
    axis = rank_axis % len(shape)
    fits = factor.ndim == len(shape) and all(
        f <= s if i == axis else f == s
        for i, (f, s) in enumerate(zip(factor.shape, shape, strict=True))
    )
    if not fits:
        raise ValueError(
            f"LoRA factor of layer {index} has shape {factor.shape}; the backbone's is {shape}"
        )
    out[tuple(slice(0, n) for n in factor.shape)] = factor
    return out


_SLOTS: weakref.WeakKeyDictionary[keras.Model, AdapterSlot] = weakref.WeakKeyDictionary()
_SLOTS_LOCK = threading.Lock()


def adapter_slot(backbone: keras.Model) -> AdapterSlot:
    """The one `AdapterSlot` of `backbone`, shared by everything that scores or trains on it."""
    with _SLOTS_LOCK:
        slot = _SLOTS.get(backbone)
        if slot is None:
            slot = _SLOTS[backbone] = AdapterSlot(backbone)
        return slot

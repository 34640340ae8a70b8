"""LoRA adapters as data: low-rank factors applied to a shared backbone, never owned by it.

An adapter (`LoraAdapter`) is the factor pair `(A, B)` of each targeted layer as numpy arrays,
plus what it was trained for (`LoraMetadata`: base model, prompt, rank, calibrated threshold,
data hash, metrics) and the sha256 of its weights file. Several classifiers may share one
backbone (one `LoadedModel`), each with its own adapter: the backbone's LoRA variables are one
slot (`lora_slot.AdapterSlot`) that holds one adapter at a time, and a classifier writes *its*
factors into the slot before each model call when another adapter is in it. The write is a
variable assignment of a few kilobytes to megabytes, no disk and no recompilation; the same
adapter twice in a row costs nothing. This is S-LoRA/Punica's rule, "an adapter is data applied
to a shared backbone", at the granularity of a batch rather than a row.

On disk an adapter is KerasHub's `.lora.h5` (`lora/vars/rank`, `lora/<layer index>/vars/
lora_kernel_{a,b}`, layer indices into the backbone's weight-bearing layers, as
`Backbone.save_lora_weights` writes it) next to a `.lora.json` of its metadata. Only the
factors are saved (kilobytes to a few MB), never the base model; loading refuses weights
trained for another base model and restores the exact prompt they were trained with.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np
import orjson

from moderation_worker.model.prompts import PromptSettings

LORA_SUFFIX = ".lora.h5"
METADATA_SUFFIX = ".lora.json"
DEFAULT_TARGET_LAYERS = ("query_dense", "value_dense", "query", "value")

Factors = Mapping[int, tuple[np.ndarray, np.ndarray]]


@dataclass
class LoraMetadata:
    """What a LoRA weights file was trained for, and how well it did."""

    base_model: str
    prompt: PromptSettings
    rank: int
    target_layers: tuple[str, ...] = DEFAULT_TARGET_LAYERS
    threshold: float | None = None
    threshold_policy: str | None = None
    data_sha256: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "moderation-worker/lora-v1",
            "base_model": self.base_model,
            "prompt": self.prompt.to_dict(),
            "rank": self.rank,
            "target_layers": list(self.target_layers),
            "threshold": self.threshold,
            "threshold_policy": self.threshold_policy,
            "data_sha256": self.data_sha256,
            "training": self.training,
            "metrics": self.metrics,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraMetadata:
        return cls(
            base_model=data["base_model"],
            prompt=PromptSettings.from_dict(data["prompt"]),
            rank=int(data["rank"]),
            target_layers=tuple(data.get("target_layers") or DEFAULT_TARGET_LAYERS),
            threshold=data.get("threshold"),
            threshold_policy=data.get("threshold_policy"),
            data_sha256=data.get("data_sha256"),
            training=data.get("training") or {},
            metrics=data.get("metrics") or {},
        )


def lora_paths(path: str | Path) -> tuple[Path, Path]:
    """(`X.lora.h5`, `X.lora.json`) for `X`, `X.lora.h5` or `X.lora.json`."""
    text = str(path)
    for suffix in (LORA_SUFFIX, METADATA_SUFFIX):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
    return Path(text + LORA_SUFFIX), Path(text + METADATA_SUFFIX)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_lora_metadata(path: str | Path) -> LoraMetadata:
    weights_path, meta_path = lora_paths(path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"LoRA weights file {weights_path} does not exist")
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"LoRA metadata {meta_path} is missing; it must sit next to {weights_path.name}"
        )
    try:
        return LoraMetadata.from_dict(orjson.loads(meta_path.read_bytes()))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"LoRA metadata {meta_path} is invalid: {exc}") from None


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """One adapter: per-layer LoRA factors as read-only numpy arrays, and their metadata.

    Args:
        factors: layer index (into the backbone's weight-bearing layers, KerasHub's key)
            -> `(A, B)`, with `A` of shape `kernel_shape[:-1] + (rank,)` and `B` of shape
            `(rank, kernel_shape[-1])`.
        metadata: what the factors were trained for (base model, prompt, rank, threshold).
        sha256: sha256 of the `.lora.h5` file it was loaded from or saved to (the model
            identity in verdicts); None for an adapter that exists only in memory.
        path: that `.lora.h5` file, if any.

    Example:
        >>> adapter = LoraAdapter.load("weights.lora.h5", base_model=base.name)
        >>> a = AgileClassifier(base, adapter=adapter)
        >>> b = AgileClassifier(base, adapter=LoraAdapter.load("other.lora.h5"))
        >>> a.predict_proba(texts); b.predict_proba(texts)  # same backbone, each its adapter
    """

    factors: Factors
    metadata: LoraMetadata
    sha256: str | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        frozen: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for index, (a, b) in sorted(self.factors.items()):
            a = np.array(a, dtype=np.float32)
            b = np.array(b, dtype=np.float32)
            if a.shape[-1] != self.metadata.rank or b.ndim != 2 or b.shape[0] != a.shape[-1]:
                raise ValueError(
                    f"LoRA factors of layer {index} have shapes {a.shape} x {b.shape}, "
                    f"not rank {self.metadata.rank}"
                )
            a.setflags(write=False)  # data shared by every backbone it is applied to
            b.setflags(write=False)
            frozen[int(index)] = (a, b)
        if not frozen:
            raise ValueError("a LoRA adapter needs the factors of at least one layer")
        object.__setattr__(self, "factors", frozen)

    @property
    def rank(self) -> int:
        return self.metadata.rank

    @property
    def target_layers(self) -> tuple[str, ...]:
        return self.metadata.target_layers

    def check_base_model(self, base_model: str) -> None:
        """Raise ValueError unless these factors were trained on `base_model`."""
        if self.metadata.base_model != base_model:
            where = f"LoRA weights {self.path}" if self.path else "this LoRA adapter"
            raise ValueError(
                f"{where} were trained on {self.metadata.base_model!r}, not on {base_model!r}"
            )

    def with_metadata(self, metadata: LoraMetadata) -> LoraAdapter:
        """The same factors with other metadata (e.g. a threshold calibrated after training);
        not yet saved, so without sha256 or path."""
        return LoraAdapter(self.factors, metadata)

    @classmethod
    def load(cls, path: str | Path, base_model: str | None = None) -> LoraAdapter:
        """Read `X.lora.h5` and `X.lora.json`; with `base_model`, refuse weights for another."""
        weights_path, _ = lora_paths(path)
        metadata = read_lora_metadata(path)
        if base_model is not None and metadata.base_model != base_model:
            raise ValueError(
                f"LoRA weights {weights_path} were trained on {metadata.base_model!r}, "
                f"not on {base_model!r}"
            )
        factors: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        with h5py.File(weights_path, "r") as h5:
            group = h5["lora"]
            rank = int(group["vars"]["rank"][()])
            for key in group:
                if key != "vars":
                    weights = group[key]["vars"]
                    factors[int(key)] = (
                        weights["lora_kernel_a"][()],
                        weights["lora_kernel_b"][()],
                    )
        if rank != metadata.rank:
            raise ValueError(
                f"LoRA weights {weights_path} have rank {rank}, their metadata says {metadata.rank}"
            )
        return cls(factors, metadata, file_sha256(weights_path), weights_path)

    def save(self, path: str | Path) -> LoraAdapter:
        """Write `X.lora.h5` and `X.lora.json`; returns the adapter with its file's sha256.

        Both files are written to temporaries and renamed, so a crash never leaves a weights
        file whose metadata belongs to another run.
        """
        weights_path, meta_path = lora_paths(path)
        weights_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(suffix=LORA_SUFFIX, dir=weights_path.parent)
        os.close(fd)
        tmp_weights = Path(tmp_name)
        tmp_meta = tmp_weights.with_suffix(".json.tmp")
        try:
            with h5py.File(tmp_weights, "w") as h5:
                group = h5.create_group("lora")
                group.create_group("vars").create_dataset("rank", data=np.int64(self.rank))
                for index, (a, b) in self.factors.items():
                    weights = group.create_group(str(index)).create_group("vars")
                    weights.create_dataset("lora_kernel_a", data=a)
                    weights.create_dataset("lora_kernel_b", data=b)
            sha256 = file_sha256(tmp_weights)
            tmp_meta.write_bytes(orjson.dumps(self.metadata.to_dict(), option=orjson.OPT_INDENT_2))
            os.chmod(tmp_weights, 0o644)  # mkstemp makes 0600; weights are read by other users
            os.replace(tmp_weights, weights_path)
            os.replace(tmp_meta, meta_path)
        finally:
            tmp_weights.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)
        return LoraAdapter(self.factors, self.metadata, sha256, weights_path)

    @classmethod
    def from_backbone(cls, backbone: keras.Model, metadata: LoraMetadata) -> LoraAdapter:
        """Copy the factors out of a backbone's LoRA variables (after `train_lora`).

        The backbone's slot then holds this adapter, so scoring with it needs no write.
        """
        from moderation_worker.model.lora_slot import adapter_slot

        return adapter_slot(backbone).capture(metadata)

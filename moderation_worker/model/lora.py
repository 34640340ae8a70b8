"""LoRA weights on disk: KerasHub's `.lora.h5` plus a small JSON of what they were trained for.

Only the low-rank factors are saved (kilobytes to a few MB), never the base model. The JSON
records the base model, the prompt (labels, instructions, separator, length), rank and target
layers, the training data hash, settings and metrics, so loading refuses weights trained for
another base model and restores the exact prompt they were trained with.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import orjson

from moderation_worker.model.prompts import PromptSettings

LORA_SUFFIX = ".lora.h5"
METADATA_SUFFIX = ".lora.json"
DEFAULT_TARGET_LAYERS = ("query_dense", "value_dense", "query", "value")


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


def save_lora(backbone: keras.Model, path: str | Path, metadata: LoraMetadata) -> Path:
    """Write the LoRA factors and their metadata; returns the `.lora.h5` path.

    Both files are written to temporaries and renamed, so a crash never leaves a weights
    file whose metadata belongs to another run.
    """
    weights_path, meta_path = lora_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_weights = tempfile.mkstemp(suffix=LORA_SUFFIX, dir=weights_path.parent)
    os.close(fd)
    try:
        backbone.save_lora_weights(tmp_weights)
        tmp_meta = Path(tmp_weights).with_suffix(".json.tmp")
        tmp_meta.write_bytes(orjson.dumps(metadata.to_dict(), option=orjson.OPT_INDENT_2))
        os.chmod(tmp_weights, 0o644)  # mkstemp makes 0600; weights are read by other users
        os.replace(tmp_weights, weights_path)
        os.replace(tmp_meta, meta_path)
    finally:
        for leftover in (Path(tmp_weights), Path(tmp_weights).with_suffix(".json.tmp")):
            leftover.unlink(missing_ok=True)
    return weights_path


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


def load_lora(backbone: keras.Model, path: str | Path, base_model: str) -> tuple[LoraMetadata, str]:
    """Enable LoRA with the saved rank and targets and load the factors onto `backbone`.

    Returns the metadata and the weights file's sha256 (the model identity in verdicts).
    Raises ValueError when the weights were trained on another base model.
    """
    weights_path, _ = lora_paths(path)
    metadata = read_lora_metadata(path)
    if metadata.base_model != base_model:
        raise ValueError(
            f"LoRA weights {weights_path} were trained on {metadata.base_model!r}, "
            f"not on {base_model!r}"
        )
    backbone.enable_lora(metadata.rank, target_layer_names=list(metadata.target_layers))
    backbone.load_lora_weights(str(weights_path))
    return metadata, file_sha256(weights_path)

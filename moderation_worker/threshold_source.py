"""Which threshold is in force, and where it came from: the one place that decides.

Highest priority first: the `threshold` setting (or a `--threshold` flag), the
`threshold_file` that `moderation-worker calibrate` writes, the threshold calibrated into the
model's LoRA metadata, and 0.5. The worker, `score`, `evaluate` and `/health` all ask here, so a
verdict's threshold and the answer to "why this value?" never disagree. The threshold file is a
small TOML of its own so that it can change (SIGHUP) without touching the config or the model.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from moderation_worker.events import utc_now
from moderation_worker.settings import Settings, SettingsError

log = logging.getLogger("moderation_worker.threshold")

DEFAULT_THRESHOLD = 0.5
_RESERVED_KEYS = ("threshold", "policy", "chosen_at", "validation")


@dataclass(frozen=True)
class ThresholdInForce:
    """A threshold and its origin: `setting`, `file`, `model` or `default` (plus the detail,
    e.g. the file's path and the policy that chose it)."""

    value: float
    source: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source, "detail": self.detail}


def resolve_threshold(
    explicit: float | None = None,
    threshold_file: str | Path | None = None,
    model: Any = None,
) -> ThresholdInForce:
    """The threshold in force for these inputs; raises `SettingsError` for a bad file."""
    if explicit is not None:
        return ThresholdInForce(float(explicit), "setting", "threshold")
    if threshold_file is not None:
        data = read_threshold_file(threshold_file)
        detail = f"{threshold_file} ({data.get('policy', 'unknown policy')})"
        return ThresholdInForce(data["threshold"], "file", detail)
    calibrated = getattr(model, "calibrated_threshold", None)
    if calibrated is not None:
        return ThresholdInForce(float(calibrated), "model", "calibrated into the LoRA metadata")
    return ThresholdInForce(DEFAULT_THRESHOLD, "default", "no threshold configured")


def threshold_for(settings: Settings, model: Any = None) -> ThresholdInForce:
    """`resolve_threshold` from a worker's settings."""
    return resolve_threshold(settings.threshold, settings.threshold_file, model)


class ThresholdSource:
    """The threshold a running worker applies; `reload()` (SIGHUP) re-resolves it without
    touching the model. Called once per batch, so it is a plain attribute read.

    Args:
        settings: the worker's settings.
        model: the classifier (its calibrated threshold is the fallback).
        reload_settings: rebuilds the settings on reload (the CLI re-reads its config file and
            the environment); by default the same settings, which re-reads `threshold_file`.
    """

    def __init__(
        self,
        settings: Settings,
        model: Any = None,
        reload_settings: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        self._reload_settings = reload_settings
        self.in_force = threshold_for(settings, model)

    def bind_model(self, model: Any) -> ThresholdInForce:
        """The model is loaded (after start): its calibrated threshold may now be the fallback."""
        self.model = model
        self.in_force = threshold_for(self.settings, model)
        return self.in_force

    @property
    def value(self) -> float:
        return self.in_force.value

    def __call__(self) -> float:
        return self.in_force.value

    def reload(self) -> ThresholdInForce:
        """Re-resolve; on a bad file keep the old value and raise `SettingsError`."""
        settings = self._reload_settings() if self._reload_settings else self.settings
        in_force = threshold_for(settings, self.model)
        old, self.in_force = self.in_force, in_force
        self.settings = settings  # the policy is rebuilt from the same reloaded settings
        log.info(
            "threshold reloaded",
            extra={
                "threshold": in_force.value,
                "threshold_source": in_force.source,
                "previous_threshold": old.value,
            },
        )
        return in_force


def read_threshold_file(path: str | Path) -> dict[str, Any]:
    """Read a threshold TOML (`threshold = 0.42`, plus the policy and metrics that chose it)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"threshold_file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"threshold_file {path} is not valid TOML: {exc}") from None
    value = data.get("threshold")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise SettingsError(f"threshold_file {path}: 'threshold' must be a number in [0, 1]")
    data["threshold"] = float(value)
    return data


def write_threshold_file(
    path: str | Path, choice: Any, extra: dict[str, Any] | None = None
) -> Path:
    """Write the TOML that `read_threshold_file` reads, for a `thresholds.ThresholdChoice`.

    `extra` (e.g. model identity) goes in as top-level keys or tables. TOML has no null, so
    None values are left out. The file is replaced atomically because a running worker
    re-reads it on SIGHUP and must never see half a file.
    """
    extra = dict(extra or {})
    clash = [key for key in extra if key in _RESERVED_KEYS]
    if clash:
        raise ValueError(f"extra keys {clash} clash with the threshold file's own keys")
    if not (math.isfinite(choice.threshold) and 0.0 <= choice.threshold <= 1.0):
        raise ValueError(f"threshold must be in [0, 1], got {choice.threshold}")
    validation = {k: v for k, v in choice.to_dict().items() if k not in ("threshold", "policy")}
    header = {"threshold": float(choice.threshold), "policy": choice.policy, "chosen_at": utc_now()}
    body = _plain({**header, **extra, "validation": validation})
    text = "# Decision threshold for moderation-worker: hateful when p(hateful) >= threshold.\n"
    try:
        text += tomli_w.dumps(body)
    except TypeError as exc:
        raise TypeError(f"cannot write the threshold file {path}: {exc}") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _plain(value: Any) -> Any:
    """Values TOML can hold: numpy scalars to Python, paths to strings, None left out."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    return value

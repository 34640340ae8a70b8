"""One settings object for the worker, the CLI and the demo.

Values come, highest priority first, from keyword arguments, `MODERATION_*` environment
variables, and an optional TOML file (`MODERATION_CONFIG_FILE`, or `--config` on the command
line). The threshold lives in its own small TOML file that `moderation-worker calibrate` writes,
so it can change (restart or SIGHUP) without touching the rest of the config or the model.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .events import DEFAULT_MAX_TEXT_CHARS

CONFIG_FILE_ENV = "MODERATION_CONFIG_FILE"
DEFAULT_MODEL = "gemma3-270m"
DEFAULT_LORA = "default"


class Settings(BaseSettings):
    """Everything a deployment can set. Invalid values fail at start, naming the setting."""

    model_config = SettingsConfigDict(
        env_prefix="MODERATION_", extra="forbid", frozen=True, validate_default=True
    )

    # Kafka edge
    broker_url: str = Field(
        "kafka://localhost:9092", description="Kafka bootstrap URL(s), ;-separated"
    )
    app_id: str = Field("moderation-worker", description="Faust app id; also the consumer group")
    input_topic: str = "comments"
    verdict_topic: str = "comments.verdicts"
    dlq_topic: str = "comments.dlq"
    input_partitions: int = Field(6, ge=1, description="partitions when the worker creates topics")
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    # Consumer-group timing. Defaults are Faust's, right for Apache Kafka; tests against Tansu
    # use short values because every join there waits about half the session timeout.
    session_timeout_s: float = Field(60.0, gt=0, description="consumer group session timeout")
    heartbeat_interval_s: float = Field(3.0, gt=0, description="must be below session timeout")
    rebalance_timeout_s: float = Field(60.0, gt=0, description="max time for a group rejoin")
    commit_interval_s: float = Field(2.8, gt=0, description="how often acked offsets commit")
    # Batching
    batch_size: int = Field(8, ge=1, le=4096, description="rows per model call (fixed shape)")
    max_wait_ms: int = Field(200, ge=1, description="flush a partial batch after this wait")
    # Model
    model: str = Field(DEFAULT_MODEL, description="model source: gemma3-270m, preset:NAME, tiny")
    lora_weights: str | None = Field(
        DEFAULT_LORA, description="LoRA weights file, 'default' (shipped), or 'none' (zero-shot)"
    )
    sequence_length: int = Field(128, ge=16, le=8192)
    length_buckets: tuple[int, ...] = Field(
        (32, 64, 96),
        description="shorter shapes a batch is cut to when its prompts fit (exact; () = off)",
    )
    model_retries: int = Field(
        3, ge=0, description="retries of a batch when the model fails even on a known-good text"
    )
    model_retry_backoff_s: float = Field(1.0, gt=0, description="first retry delay, doubling")
    # Decision
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="overrides threshold_file")
    threshold_file: Path | None = Field(None, description="TOML written by `calibrate`")
    max_text_chars: int = Field(DEFAULT_MAX_TEXT_CHARS, ge=1)
    # Operations
    web_port: int = Field(6066, ge=0, le=65535, description="Faust web server: /health, /metrics")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="extra Prometheus port")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("broker_url")
    @classmethod
    def _broker_has_scheme(cls, value: str) -> str:
        for url in value.split(";"):
            if "://" not in url:
                raise ValueError(f"{url!r} needs a scheme, e.g. kafka://host:9092")
        return value

    @field_validator("input_topic", "verdict_topic", "dlq_topic", "app_id")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("length_buckets")
    @classmethod
    def _positive_buckets(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(b < 8 for b in value):
            raise ValueError(f"length buckets must be >= 8 tokens, got {value}")
        return tuple(sorted(set(value)))

    @model_validator(mode="after")
    def _distinct_topics(self) -> Settings:
        topics = [self.input_topic, self.verdict_topic, self.dlq_topic]
        if len(set(topics)) != 3:
            raise ValueError(f"input, verdict and dead-letter topics must differ, got {topics}")
        if self.heartbeat_interval_s >= self.session_timeout_s:
            raise ValueError(
                f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be below "
                f"session_timeout_s ({self.session_timeout_s})"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    def resolved_threshold(self, fallback: float) -> float:
        """The threshold to apply now: explicit value, else the threshold file, else `fallback`.

        Called again on SIGHUP, so an edited threshold file takes effect without a model reload.
        """
        if self.threshold is not None:
            return self.threshold
        if self.threshold_file is not None:
            return read_threshold_file(self.threshold_file)["threshold"]
        return fallback

    def public_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings, optionally from a TOML file, raising `SettingsError` with a readable text."""
    from pydantic import ValidationError

    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise SettingsError(f"config file {path} does not exist")
        os.environ[CONFIG_FILE_ENV] = str(path)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            env = f"MODERATION_{where.upper()}" if err["loc"] else ""
            hint = f" (env {env})" if env else ""
            lines.append(f"invalid setting {where}{hint}: {err['msg']}")
        raise SettingsError("\n".join(lines)) from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file is not valid TOML: {exc}") from None


class SettingsError(ValueError):
    """Configuration that cannot start a worker; the message names the setting."""


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

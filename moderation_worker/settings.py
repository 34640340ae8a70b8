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
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from moderation_worker.console_settings import ConsoleSettings
from moderation_worker.events import DEFAULT_MAX_DEPTH, DEFAULT_MAX_TEXT_CHARS
from moderation_worker.loop_settings import LoopSettings
from moderation_worker.speed_settings import SpeedSettings

CONFIG_FILE_ENV = "MODERATION_CONFIG_FILE"
DEFAULT_MODEL = "gemma3-270m"
DEFAULT_LORA = "default"
#: The one classifier a worker runs when `classifiers` is empty (from `lora_weights`, `threshold`).
DEFAULT_CLASSIFIER = "hate"


class ClassifierConfig(BaseModel):
    """One named LoRA classifier on the shared base model (a `[[classifiers]]` table)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="e.g. hate, violence")
    lora: str = Field(DEFAULT_LORA, description="its .lora.h5 file, or 'default' (shipped)")
    mode: Literal["enforce", "shadow"] = Field("enforce", description="shadow: never decides")
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="for every community")
    community_thresholds: dict[str, Annotated[float, Field(ge=0.0, le=1.0)]] = {}  # first


def check_community(community: Any) -> str:
    """A community name as routes and control keys carry it: short, printable, no '/', not '*'."""
    if not isinstance(community, str) or not community or len(community) > 128:
        raise ValueError(f"community {community!r} must be a string of 1 to 128 characters")
    if "/" in community or community == "*" or not community.isprintable():
        raise ValueError(f"community {community!r} must be printable, without '/', and not '*'")
    return community


class Settings(BaseSettings):
    """Everything a deployment can set. Invalid values fail at start, naming the setting."""

    model_config = SettingsConfigDict(
        env_prefix="MODERATION_",
        extra="forbid",
        frozen=True,
        validate_default=True,
        hide_input_in_errors=True,  # a validation error must never echo a secret
        env_nested_delimiter="__",  # MODERATION_LOOP__MIN_NEW_LABELS=200
    )

    # Kafka edge
    broker_url: str = Field(
        "kafka://localhost:9092", description="Kafka bootstrap URL(s), ;-separated"
    )
    # Kafka security: TLS (SSL), mutual TLS (a client certificate), SASL (PLAIN or SCRAM).
    # Checked together in `_kafka_security` below; `adapters/kafka_security.py` turns these into
    # the SSL context and the Faust/aiokafka credentials. Secrets: `sasl_password` is a SecretStr
    # (never printed), or comes from `sasl_password_file` (e.g. a mounted Kubernetes secret).
    # OAUTHBEARER is not offered: aiokafka needs a token-provider object for it, not settings.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL"
    )
    ssl_cafile: Path | None = Field(
        None, description="PEM CA bundle the broker certificate must chain to (default: system)"
    )
    ssl_certfile: Path | None = Field(None, description="PEM client certificate (mutual TLS)")
    ssl_keyfile: Path | None = Field(None, description="PEM private key of ssl_certfile")
    ssl_keyfile_password_file: Path | None = Field(
        None, description="file holding the password of an encrypted ssl_keyfile"
    )
    ssl_check_hostname: bool = Field(
        True, description="require the broker certificate to name the broker_url host"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism; required with SASL_PLAINTEXT / SASL_SSL"
    )
    sasl_username: str | None = Field(None, description="SASL user (Confluent Cloud: API key)")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password; prefer sasl_password_file"
    )
    sasl_password_file: Path | None = Field(
        None, description="file holding the SASL password (trailing newline stripped)"
    )
    app_id: str = Field("moderation-worker", description="Faust app id; also the consumer group")
    input_topic: str = "comments"
    verdict_topic: str = "comments.verdicts"
    dlq_topic: str = "comments.dlq"
    input_partitions: int = Field(6, ge=1, description="partitions when the worker creates topics")
    topic_replication_factor: int = Field(
        3,
        ge=1,
        description="replicas of topics the worker creates; with acks=all, 1 can lose verdicts",
    )
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
        (64, 96),  # 32 held no real prompt (the head alone is 24 tokens); each shape is a compile
        description="shorter shapes a batch is cut to when its prompts fit (exact; () = off)",
    )
    model_retries: int = Field(
        3, ge=0, description="retries of a batch when the model fails even on a known-good text"
    )
    model_retry_backoff_s: float = Field(1.0, gt=0, description="first retry delay, doubling")
    model_timeout_s: float | None = Field(
        300.0, gt=0, description="a batch's model step taking longer stops the worker (no ack)"
    )
    publish_timeout_s: float = Field(
        60.0, gt=0, description="publishing a batch taking longer stops the worker (no ack)"
    )
    # Decision
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="overrides threshold_file")
    threshold_file: Path | None = Field(None, description="TOML written by `calibrate`")
    # Classifiers, routing and the control topic (`policy.py` turns these into a PolicyState)
    classifiers: tuple[ClassifierConfig, ...] = Field(
        (), description="named LoRA classifiers; () = one 'hate' from lora_weights and threshold"
    )
    routing_field: str = Field("community", description="event field that picks the route")
    routes: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="community -> classifiers that score its events"
    )
    default_route: tuple[str, ...] | None = Field(
        None, description="classifiers for unrouted events; None = every classifier"
    )
    spare_classifier_slots: int = Field(2, ge=0, description="adapter slots kept for new LoRAs")
    control_topic: str | None = Field("moderation.control", description="live overrides; ''=none")
    loop: LoopSettings = Field(default_factory=LoopSettings, description="the agile loop")
    console: ConsoleSettings = Field(default_factory=ConsoleSettings, description="the console")
    speed: SpeedSettings = Field(default_factory=SpeedSettings, description="speed knobs")
    max_text_chars: int = Field(DEFAULT_MAX_TEXT_CHARS, ge=1)
    max_event_depth: int = Field(
        DEFAULT_MAX_DEPTH, ge=2, le=200, description="deeper events are dead-lettered (too_deep)"
    )
    # Operations
    web_port: int = Field(6066, ge=0, le=65535, description="Faust web server: /health, /metrics")
    web_bind: str = Field(
        "127.0.0.1",
        description="address the web server and metrics_port listen on; 0.0.0.0 in containers",
    )
    shutdown_timeout_s: float = Field(
        60.0, gt=0, description="on SIGTERM, time to finish and ack the batch in flight"
    )
    metrics_port: int | None = Field(None, ge=0, le=65535, description="extra Prometheus port")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("broker_url")
    @classmethod
    def _broker_has_scheme(cls, value: str) -> str:
        for url in value.split(";"):
            if "://" not in url:
                raise ValueError(f"{url!r} needs a scheme, e.g. kafka://host:9092")
        return value

    @field_validator("control_topic")
    @classmethod
    def _optional_topic(cls, value: str | None) -> str | None:
        return (value or "").strip() or None

    @field_validator("input_topic", "verdict_topic", "dlq_topic", "app_id", "routing_field")
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

    @model_validator(mode="after")
    def _classifiers_and_routes(self) -> Settings:
        names = [c.name for c in self.classifiers] or [DEFAULT_CLASSIFIER]
        if len(set(names)) != len(names):
            raise ValueError(f"classifier names must be unique, got {names}")
        if self.classifiers and (self.threshold is not None or self.threshold_file is not None):
            raise ValueError("threshold/threshold_file do not apply to [[classifiers]]; set theirs")
        communities = [k for c in self.classifiers for k in c.community_thresholds]
        for community in (*self.routes, *communities):
            check_community(community)
        given = {f"routes.{c}": r for c, r in self.routes.items()}
        if self.default_route is not None:
            given["default_route"] = self.default_route
        for where, route in given.items():
            unknown = [n for n in route if n not in names]
            if not route or unknown or len(set(route)) != len(route):
                raise ValueError(
                    f"{where} must list distinct configured classifiers ({', '.join(names)}), "
                    f"got {list(route)}"
                )
        if self.control_topic in (self.input_topic, self.verdict_topic, self.dlq_topic):
            raise ValueError(f"control_topic {self.control_topic!r} is another worker topic")
        return self

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
        _check_kafka_security(self)
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

    def public_dict(self) -> dict[str, Any]:
        """The settings as JSON-able values, secrets masked (startup log, `config` command)."""
        data = self.model_dump(mode="json")
        for name in SECRET_FIELDS:
            if data.get(name) is not None:
                data[name] = REDACTED
        return data

    def sasl_password_value(self) -> str | None:
        """The SASL password: `sasl_password`, else the content of `sasl_password_file`."""
        if self.sasl_password is not None:
            return self.sasl_password.get_secret_value()
        if self.sasl_password_file is not None:
            return _read_secret_file(self.sasl_password_file, "sasl_password_file")
        return None

    def ssl_keyfile_password_value(self) -> str | None:
        """The password of an encrypted `ssl_keyfile`, read from `ssl_keyfile_password_file`."""
        if self.ssl_keyfile_password_file is None:
            return None
        return _read_secret_file(self.ssl_keyfile_password_file, "ssl_keyfile_password_file")


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


# --------------------------------------------------------------------------- Kafka security
#: Fields whose value is a secret: masked by `public_dict()`.
SECRET_FIELDS = ("sasl_password",)
REDACTED = "**********"
_TLS_FILES = ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_keyfile_password_file")
_SASL_FIELDS = ("sasl_mechanism", "sasl_username", "sasl_password", "sasl_password_file")


def _readable_file(path: Path, name: str) -> None:
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ValueError(f"{name} {path} {what}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{name} {path} is not readable by this process")


def _read_secret_file(path: Path, name: str) -> str:
    """A secret from a file (trailing newline stripped); errors name the setting, not the value."""
    try:
        value = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise SettingsError(f"{name} {path} cannot be read: {exc.strerror}") from None
    if not value:
        raise SettingsError(f"{name} {path} is empty")
    return value


def _check_kafka_security(s: Settings) -> None:
    """Cross-field rules of the Kafka security settings; each message names the settings.

    TLS settings under a non-TLS protocol (and SASL settings under a non-SASL one) are errors,
    not warnings: ignoring them would connect without the encryption or the login the
    deployment asked for.
    """
    protocol = s.security_protocol
    tls = protocol in ("SSL", "SASL_SSL")
    sasl = protocol in ("SASL_PLAINTEXT", "SASL_SSL")
    if not tls:
        given = [n for n in _TLS_FILES if getattr(s, n) is not None]
        if not s.ssl_check_hostname:
            given.append("ssl_check_hostname")
        if given:
            raise ValueError(
                f"{', '.join(given)} set, but security_protocol is {protocol} (no TLS); "
                "use SSL or SASL_SSL, or remove them"
            )
    if not sasl:
        given = [n for n in _SASL_FIELDS if getattr(s, n) is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} set, but security_protocol is {protocol} (no SASL); "
                "use SASL_PLAINTEXT or SASL_SSL, or remove them"
            )
    else:
        missing = [n for n in ("sasl_mechanism", "sasl_username") if getattr(s, n) is None]
        if s.sasl_password is None and s.sasl_password_file is None:
            missing.append("sasl_password or sasl_password_file")
        if missing:
            raise ValueError(f"security_protocol {protocol} requires {', '.join(missing)}")
        if s.sasl_username is not None and not s.sasl_username.strip():
            raise ValueError("sasl_username must not be empty")
    if s.sasl_password is not None and s.sasl_password_file is not None:
        raise ValueError("set sasl_password or sasl_password_file, not both")
    if s.sasl_password is not None and not s.sasl_password.get_secret_value():
        raise ValueError("sasl_password must not be empty")
    for name in (*_TLS_FILES, "sasl_password_file"):
        path = getattr(s, name)
        if path is not None:
            _readable_file(path, name)
    if s.ssl_keyfile is not None and s.ssl_certfile is None:
        raise ValueError("ssl_keyfile set without ssl_certfile (the client certificate)")
    combined = s.ssl_certfile is not None and _has_private_key(s.ssl_certfile)
    if s.ssl_certfile is not None and s.ssl_keyfile is None and not combined:
        raise ValueError(
            f"ssl_certfile {s.ssl_certfile} holds no private key; set ssl_keyfile as well"
        )
    if s.ssl_keyfile_password_file is not None and s.ssl_certfile is None:
        raise ValueError("ssl_keyfile_password_file set without ssl_certfile / ssl_keyfile")
    if s.sasl_password_file is not None:
        try:
            _read_secret_file(s.sasl_password_file, "sasl_password_file")
        except SettingsError as exc:
            raise ValueError(str(exc)) from None


def _has_private_key(pem: Path) -> bool:
    """True when a PEM file also carries its private key (a combined cert+key file)."""
    try:
        return "PRIVATE KEY-----" in pem.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False

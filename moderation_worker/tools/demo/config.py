"""What the demo was asked to do, and the settings its worker runs with."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from moderation_worker.control_records import record_for_threshold
from moderation_worker.settings import (
    DEFAULT_LORA,
    DEFAULT_MODEL,
    ClassifierConfig,
    Settings,
    load_settings,
)
from moderation_worker.threshold_source import read_threshold_file

DEFAULT_OUT = Path("runs/demo/verdicts.jsonl")

#: Consumer-group timing for the demo's worker. Tansu 0.6.0 makes every join wait about half
#: the session timeout, so the embedded broker gets short values (as in tests/fixtures_broker);
#: Apache Kafka refuses session timeouts under its group.min.session.timeout.ms (6 s).
EMBEDDED_GROUP_TIMING = {
    "session_timeout_s": 3.0,
    "heartbeat_interval_s": 0.5,
    "rebalance_timeout_s": 3.0,
}
EXTERNAL_GROUP_TIMING = {
    "session_timeout_s": 6.0,
    "heartbeat_interval_s": 1.0,
    "rebalance_timeout_s": 6.0,
}
#: Faust hard-codes its worker consumer's fetch.max.wait; Tansu answers a waiting fetch only
#: when that wait runs out, so on the embedded broker an idle worker sees new records late.
FAUST_FETCH_MAX_WAIT_S = 1.5


#: The demo's classifiers, all on the one base model: (name, mode, LoRA on Gemma 3 270M).
#: `shipped:<name>` adapters exist for gemma3-270m only; other models score those zero-shot.
DEMO_CLASSIFIERS = (
    ("hate", "enforce", DEFAULT_LORA),
    ("violence", "enforce", "shipped:violence"),
    ("directed", "shadow", "shipped:directed"),
)
#: Events of the `gaming` community get all three; every other event the two enforced ones.
DEMO_ROUTES = {"gaming": ("hate", "violence", "directed")}
DEMO_DEFAULT_ROUTE = ("hate", "violence")
DEMO_CONTROL_TOPIC = "moderation.control"  # when the user's settings have none


@dataclass(frozen=True)
class LiveChange:
    """The control record the demo publishes halfway through the stream: one threshold.

    The default raises hate's threshold for `gaming` from its LoRA's 0.796 to 0.99, above
    some built-in hateful samples' scores (0.978 to 0.984 with the shipped LoRA): in the second
    half, hate no longer flags three gaming comments it would have flagged before, and two of
    them are no longer `flagged` at all (violence flags the third). Other communities keep
    their threshold.
    """

    classifier: str = "hate"
    threshold: float = 0.99
    community: str | None = "gaming"
    reason: str = "demo: a live threshold change halfway through the stream"

    def record(self) -> tuple[bytes, bytes]:
        """The control record's key and value (`policy.record_for_threshold`)."""
        key, value = record_for_threshold(
            self.classifier, self.threshold, self.community, "moderation-worker demo", self.reason
        )
        assert value is not None
        return key, value

    @property
    def key(self) -> str:
        return self.record()[0].decode("utf-8")


class DemoError(RuntimeError):
    """The demo cannot go on (worker died, broker unreachable); the message says why."""


@dataclass(frozen=True)
class DemoConfig:
    """What `moderation-worker demo` was asked to do (the command line, as a value)."""

    input_file: Path | None = None
    ethos: Path | None = None
    limit: int | None = None
    rate: float | None = None
    with_bad_events: bool = True
    broker: str | None = None
    model: str = DEFAULT_MODEL
    lora: str | None = DEFAULT_LORA
    batch_size: int = 8
    max_wait_ms: int = 200
    out: Path = DEFAULT_OUT
    timeout_s: float | None = None
    ready_timeout_s: float = 1200.0
    config_file: str | None = None
    progress: bool | None = None  # None: bars when stderr is a terminal
    live_change: LiveChange | None = LiveChange()  # None: no control record (--no-live-change)

    def stream_timeout(self, n_events: int) -> float:
        """Seconds from the first produced event until all must be accounted for.

        Generous by default (Gemma 3 270M on a busy laptop CPU scores a few comments a
        second, and a paced stream takes n/rate anyway): it exists to end a stuck demo with
        a message, not to race a slow one.
        """
        if self.timeout_s is not None:
            return self.timeout_s
        paced = n_events / self.rate if self.rate else 0.0
        return 60.0 + 2.0 * n_events + paced


def demo_classifiers(config: DemoConfig, threshold: float | None) -> tuple[ClassifierConfig, ...]:
    """The three demo classifiers for this model and `--lora`; `threshold` (the user's
    `threshold` setting, if any) becomes hate's, for every community.

    `--lora none` makes all three zero-shot; `--lora FILE` replaces the hate adapter only.
    A model without shipped adapters (e.g. `tiny`) scores violence and directed zero-shot.
    """
    shipped = config.model.strip() == DEFAULT_MODEL and config.lora is not None
    out = []
    for name, mode, lora in DEMO_CLASSIFIERS:
        if name == "hate":
            lora = config.lora or "none"
        elif not shipped:
            lora = "none"
        out.append(ClassifierConfig(name=name, lora=lora, mode=mode, threshold=threshold))
        threshold = None
    return tuple(out)


def demo_settings(config: DemoConfig, broker_url: str, embedded: bool, web_port: int) -> Settings:
    """The worker's settings: the user's (environment, config file) with the demo's choices.

    The worker always runs the demo's three classifiers and routes (`DEMO_CLASSIFIERS`), routed
    by the events' `community`. On the embedded broker the topic names are the configured ones
    (the broker is fresh). On a real broker they get a per-run suffix, the control topic
    included (the demo's live change must never reach a production fleet), and the consumer
    group always does, so a demo never joins a production group or mixes its records with a
    real pipeline's.
    """
    base = load_settings(config.config_file)
    tag = uuid.uuid4().hex[:8]
    suffix = "" if embedded else f"-demo-{tag}"
    timing = EMBEDDED_GROUP_TIMING if embedded else EXTERNAL_GROUP_TIMING
    threshold = base.threshold
    if threshold is None and base.threshold_file is not None:
        threshold = float(read_threshold_file(base.threshold_file)["threshold"])
    return base.model_copy(
        update={
            "broker_url": broker_url,
            "app_id": f"{base.app_id}-demo-{tag}",
            "input_topic": base.input_topic + suffix,
            "verdict_topic": base.verdict_topic + suffix,
            "dlq_topic": base.dlq_topic + suffix,
            "control_topic": (base.control_topic or DEMO_CONTROL_TOPIC) + suffix,
            "classifiers": demo_classifiers(config, threshold),
            "routes": dict(DEMO_ROUTES),
            "default_route": DEMO_DEFAULT_ROUTE,
            "routing_field": "community",
            "threshold": None,  # a threshold setting is hate's now (classifiers refuse both)
            "threshold_file": None,
            "model": config.model,
            "lora_weights": config.lora,
            "batch_size": config.batch_size,
            "max_wait_ms": config.max_wait_ms,
            "web_port": web_port,
            "metrics_port": None,
            # One embedded broker holds one replica; a real cluster keeps the configured factor.
            "topic_replication_factor": 1 if embedded else base.topic_replication_factor,
            "log_level": "INFO",
            **timing,
        }
    )

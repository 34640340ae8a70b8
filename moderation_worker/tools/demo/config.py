"""What the demo was asked to do, and the settings its worker runs with."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from moderation_worker.settings import DEFAULT_LORA, DEFAULT_MODEL, Settings, load_settings

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


def demo_settings(config: DemoConfig, broker_url: str, embedded: bool, web_port: int) -> Settings:
    """The worker's settings: the user's (environment, config file) with the demo's choices.

    On the embedded broker the topic names are the configured ones (the broker is fresh).
    On a real broker they get a per-run suffix, and the consumer group always does, so a demo
    never joins a production group or mixes its records with a real pipeline's.
    """
    base = load_settings(config.config_file)
    tag = uuid.uuid4().hex[:8]
    suffix = "" if embedded else f"-demo-{tag}"
    timing = EMBEDDED_GROUP_TIMING if embedded else EXTERNAL_GROUP_TIMING
    return base.model_copy(
        update={
            "broker_url": broker_url,
            "app_id": f"{base.app_id}-demo-{tag}",
            "input_topic": base.input_topic + suffix,
            "verdict_topic": base.verdict_topic + suffix,
            "dlq_topic": base.dlq_topic + suffix,
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

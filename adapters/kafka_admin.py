"""Our own Kafka clients beside the worker's: broker URLs, topic creation, producers, consumers.

The demo, the pipeline bench and the broker tests all do what a platform team's services do next
to the worker: create its topics, produce comments, read verdicts. This is the one place that
turns `Settings` into those aiokafka clients, so each connects exactly as the worker does (TLS,
mutual TLS and SASL through `kafka_security.aiokafka_client_kwargs`) and topics get the configured
partitions and `topic_replication_factor`.

aiokafka is imported inside the functions: importing this module costs a tool nothing.

Example:
    settings = Settings(broker_url="kafka://127.0.0.1:9092")
    await create_topics(settings, [settings.input_topic, settings.verdict_topic])
    producer = kafka_producer(settings, linger_ms=5)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from adapters.kafka_security import aiokafka_client_kwargs
from moderation_worker.settings import Settings

#: CreateTopics error code of a topic that is already there: not an error for us.
TOPIC_ALREADY_EXISTS = 36


def _urls(broker_url: str) -> list[str]:
    return [u.strip() for u in broker_url.replace(",", ";").split(";") if u.strip()]


def normalize_broker_url(url: str) -> str:
    """`host:9092` or `kafka://host:9092` (`;`- or `,`-separated for several) -> Faust's spelling.

    What a user types after `--broker`; `Settings.broker_url` wants a scheme on every URL.
    """
    parts = _urls(url)
    if not parts:
        raise ValueError("--broker needs a URL such as kafka://localhost:9092")
    return ";".join(u if "://" in u else f"kafka://{u}" for u in parts)


def aiokafka_bootstrap(broker_url: str) -> str:
    """Faust broker URL(s) -> aiokafka's bootstrap servers: `kafka://a:1;kafka://b:2` -> `a:1,b:2`.

    URLs without a scheme and `,` as the separator are accepted too.
    """
    parts = _urls(broker_url)
    if not parts:
        raise ValueError(f"no broker in {broker_url!r}")
    return ",".join(u.split("://", 1)[-1].rstrip("/") for u in parts)


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """Bootstrap servers and security keyword arguments for any aiokafka client on `settings`.

    Holds the SASL password in clear when SASL is configured: pass it on, never log it.
    """
    return {
        "bootstrap_servers": aiokafka_bootstrap(settings.broker_url),
        **aiokafka_client_kwargs(settings),
    }


def kafka_producer(settings: Settings, **options: Any) -> Any:
    """An (unstarted) `AIOKafkaProducer` on `settings`' cluster; `options` go to aiokafka."""
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(**client_kwargs(settings), **options)


def kafka_consumer(settings: Settings, *topics: str, **options: Any) -> Any:
    """An (unstarted) `AIOKafkaConsumer` on `settings`' cluster, subscribed to `topics` if any."""
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer(*topics, **client_kwargs(settings), **options)


def admin_client(settings: Settings, **options: Any) -> Any:
    """An (unstarted) `AIOKafkaAdminClient` on `settings`' cluster."""
    from aiokafka.admin import AIOKafkaAdminClient

    return AIOKafkaAdminClient(**client_kwargs(settings), **options)


async def create_topics(
    settings: Settings,
    names: Iterable[str],
    *,
    partitions: int | None = None,
    replication_factor: int | None = None,
    request_timeout_ms: int = 15_000,
) -> list[str]:
    """Create the topics among `names` that do not exist yet; return the names created.

    Partitions default to `settings.input_partitions`, replicas to
    `settings.topic_replication_factor`. Existing topics are left as they are. aiokafka reports
    a refused topic (say, more replicas than brokers) only in the response, so that is checked
    here and raised as the matching `KafkaError`, instead of failing later in the worker.
    """
    from aiokafka.admin import NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    wanted = list(dict.fromkeys(names))
    admin = admin_client(settings, request_timeout_ms=request_timeout_ms)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(
                name,
                partitions or settings.input_partitions,
                replication_factor or settings.topic_replication_factor,
            )
            for name in wanted
            if name not in existing
        ]
        if not new:
            return []
        response = None
        with contextlib.suppress(TopicAlreadyExistsError):  # created meanwhile by someone else
            response = await admin.create_topics(new)
    finally:
        await admin.close()
    for error in getattr(response, "topic_errors", ()):
        topic, code = error[0], error[1]
        if code not in (0, TOPIC_ALREADY_EXISTS):
            message = error[2] if len(error) > 2 and error[2] else ""
            raise for_code(code)(f"cannot create topic {topic!r}: {message}".rstrip(": "))
    return [topic.name for topic in new]

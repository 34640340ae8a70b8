"""`adapters.kafka_admin`: broker URLs in both spellings, clients that connect as the worker does,
and topic creation that is idempotent and says when the cluster refuses a topic."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from aiokafka.errors import InvalidReplicationFactorError

from adapters import kafka_admin
from adapters.kafka_admin import (
    aiokafka_bootstrap,
    client_kwargs,
    create_topics,
    kafka_consumer,
    normalize_broker_url,
)
from moderation_worker.settings import Settings
from tests.fixtures_broker import BrokerInfo


def test_broker_urls_in_faust_and_aiokafka_spelling() -> None:
    assert aiokafka_bootstrap("kafka://a:9092;kafka://b:9093") == "a:9092,b:9093"
    assert aiokafka_bootstrap("a:1, b:2") == "a:1,b:2"
    assert aiokafka_bootstrap("kafka://a:1/") == "a:1"
    assert normalize_broker_url("a:1,kafka://b:2") == "kafka://a:1;kafka://b:2"
    for empty in ("", " ; "):
        with pytest.raises(ValueError):
            aiokafka_bootstrap(empty)
        with pytest.raises(ValueError, match="--broker"):
            normalize_broker_url(empty)


def test_clients_carry_the_security_settings() -> None:
    settings = Settings(
        broker_url="kafka://k1:9092;kafka://k2:9092",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="alice",
        sasl_password="s3cret",
    )
    kwargs = client_kwargs(settings)
    assert kwargs["bootstrap_servers"] == "k1:9092,k2:9092"
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT"
    assert (kwargs["sasl_mechanism"], kwargs["sasl_plain_password"]) == ("SCRAM-SHA-512", "s3cret")


class _RefusingAdmin:
    """An admin client whose cluster has one broker, so three replicas are refused."""

    def __init__(self) -> None:
        self.asked: list[Any] = []

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def list_topics(self) -> list[str]:
        return ["old"]

    async def create_topics(self, new: list[Any]) -> Any:
        self.asked += new
        errors = [
            (t.name, 38, "Replication factor: 3 larger than available brokers: 1.") for t in new
        ]
        return type("Response", (), {"topic_errors": errors})()


async def test_a_refused_topic_is_raised_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    admin = _RefusingAdmin()
    monkeypatch.setattr(kafka_admin, "admin_client", lambda settings, **kw: admin)
    settings = Settings(input_partitions=2)  # topic_replication_factor 3 by default
    with pytest.raises(InvalidReplicationFactorError, match="'new'.*larger than available"):
        await create_topics(settings, ["old", "new"])
    assert [(t.name, t.num_partitions, t.replication_factor) for t in admin.asked] == [
        ("new", 2, 3)
    ]


@pytest.mark.broker
async def test_create_topics_makes_the_missing_ones_only(broker: BrokerInfo) -> None:
    tag = uuid.uuid4().hex[:8]
    settings = Settings(broker_url=broker.url, input_partitions=3, topic_replication_factor=1)
    a, b, c = (f"admin-{tag}-{x}" for x in "abc")
    assert await create_topics(settings, [a, b, a]) == [a, b]
    assert await create_topics(settings, [a, c], partitions=1) == [c]
    consumer = kafka_consumer(settings, group_id=None)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = {t: consumer.partitions_for_topic(t) for t in (a, b, c)}
    finally:
        await consumer.stop()
    assert partitions == {a: {0, 1, 2}, b: {0, 1, 2}, c: {0}}

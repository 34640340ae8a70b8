"""Secured Kafka clusters: TLS, mutual TLS and SASL settings, through real endpoints.

Fast tests (no broker) cover the settings rules, secret redaction (public_dict, repr, validation
errors, the `config` command), the SSL context and the Faust credentials mapping.

Broker tests (`-m broker`) run an embedded Tansu per scenario. Tansu's own TLS flags do not
bring up a TLS listener, so `tests/tls_proxy.TlsProxy` terminates TLS (optionally requiring a
client certificate) in front of Tansu's plaintext port, and Tansu advertises the proxy's
address, so every client connection (bootstrap and broker) goes through TLS. A test CA, a
server certificate (127.0.0.1, localhost) and client certificates come from `trustme`.
Tansu started with `--authentication` refuses every SCRAM login (its users cannot be created
once authentication is on), which is what the SASL failure tests need.

A SCRAM *success* needs a real Kafka with a SCRAM user; see `test_scram_login_succeeds_...`:
it runs when `MODERATION_TEST_BROKER_SASL` is set and is skipped otherwise.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization

from adapters import kafka_preflight, kafka_security
from adapters.kafka_preflight import BrokerConnectionError
from adapters.kafka_security import aiokafka_client_kwargs
from adapters.tansu import TansuBroker, free_port
from moderation_worker.settings import CONFIG_FILE_ENV, Settings, SettingsError, load_settings
from tests.fixtures_broker import (
    REPO_ROOT,
    BrokerInfo,
    TopicSet,
    WorkerProcess,
    comment,
    worker_env,
)
from tests.tls_proxy import TlsProxy, server_context

trustme = pytest.importorskip("trustme")

SECRET = "hunter2-Sup3r-s3cret"
SASL_BROKER_ENV = "MODERATION_TEST_BROKER_SASL"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MODERATION_* variables from the outside; whatever a test sets is undone after it."""
    monkeypatch.setenv(CONFIG_FILE_ENV, "placeholder")  # recorded, so teardown removes it
    for name in list(os.environ):
        if name.startswith("MODERATION_") and name != SASL_BROKER_ENV:
            monkeypatch.delenv(name)


# ---------------------------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A test CA, a server certificate, client certificates, and a CA nobody uses."""

    ca: Any
    server: Any
    ca_file: Path
    other_ca_file: Path
    client_cert: Path
    client_key: Path
    encrypted_key: Path
    key_password_file: Path
    foreign_cert: Path  # a client certificate from the other CA
    foreign_key: Path
    combined_pem: Path  # client certificate and key in one file


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("moderation-worker@test")
    foreign = other.issue_cert("intruder@test")
    ca.cert_pem.write_to_path(d / "ca.pem")
    other.cert_pem.write_to_path(d / "other-ca.pem")
    client.cert_chain_pems[0].write_to_path(d / "client.pem")
    client.private_key_pem.write_to_path(d / "client.key")
    foreign.cert_chain_pems[0].write_to_path(d / "foreign.pem")
    foreign.private_key_pem.write_to_path(d / "foreign.key")
    (d / "combined.pem").write_bytes(
        client.cert_chain_pems[0].bytes() + client.private_key_pem.bytes()
    )
    key = serialization.load_pem_private_key(client.private_key_pem.bytes(), password=None)
    (d / "client-encrypted.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"key-pass-123"),
        )
    )
    (d / "key-password").write_text("key-pass-123\n")
    return Pki(
        ca=ca,
        server=server,
        ca_file=d / "ca.pem",
        other_ca_file=d / "other-ca.pem",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        encrypted_key=d / "client-encrypted.key",
        key_password_file=d / "key-password",
        foreign_cert=d / "foreign.pem",
        foreign_key=d / "foreign.key",
        combined_pem=d / "combined.pem",
    )


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "sasl-password"
    path.write_text(SECRET + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Settings rules (fast)
# ---------------------------------------------------------------------------------------------


def _env(monkeypatch: pytest.MonkeyPatch, **values: Any) -> None:
    for name, value in values.items():
        monkeypatch.setenv(f"MODERATION_{name.upper()}", str(value))


def test_default_is_plaintext_without_credentials() -> None:
    s = Settings()
    assert s.security_protocol == "PLAINTEXT"
    assert kafka_security.faust_credentials(s) is None
    assert aiokafka_client_kwargs(s) == {"security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({"security_protocol": "SASL_SSL"}, "requires sasl_mechanism, sasl_username, sasl_pass"),
        (
            {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"},
            "requires sasl_username, sasl_password or sasl_password_file",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u"},
            "requires sasl_password or sasl_password_file",
        ),
        ({"security_protocol": "SSL", "sasl_mechanism": "PLAIN"}, "sasl_mechanism set, but"),
        ({"sasl_password": SECRET}, "sasl_password set, but security_protocol is PLAINTEXT"),
        ({"ssl_check_hostname": "false"}, "ssl_check_hostname set, but security_protocol"),
        ({"security_protocol": "SSL", "sasl_mechanism": "OAUTHBEARER"}, "sasl_mechanism"),
        ({"security_protocol": "TLS"}, "security_protocol"),
    ],
)
def test_inconsistent_security_settings_fail_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, values: dict[str, Any], names: str
) -> None:
    _env(monkeypatch, **values)
    with pytest.raises(SettingsError, match=names) as info:
        load_settings()
    assert SECRET not in str(info.value)


def test_tls_files_under_plaintext_are_an_error_not_ignored(
    monkeypatch: pytest.MonkeyPatch, pki: Pki
) -> None:
    _env(monkeypatch, ssl_cafile=pki.ca_file)
    with pytest.raises(SettingsError, match=r"ssl_cafile set, but security_protocol is PLAINTEXT"):
        load_settings()
    _env(monkeypatch, security_protocol="SASL_PLAINTEXT")
    with pytest.raises(SettingsError, match=r"ssl_cafile set, but .*SASL_PLAINTEXT \(no TLS\)"):
        load_settings()
    _env(monkeypatch, security_protocol="SSL")
    assert load_settings().ssl_cafile == pki.ca_file


def test_certificate_files_must_exist_and_pair_up(
    monkeypatch: pytest.MonkeyPatch, pki: Pki, tmp_path: Path
) -> None:
    _env(monkeypatch, security_protocol="SSL", ssl_cafile=tmp_path / "missing.pem")
    with pytest.raises(SettingsError, match=r"ssl_cafile .*missing.pem does not exist"):
        load_settings()
    _env(monkeypatch, ssl_cafile=tmp_path)
    with pytest.raises(SettingsError, match=r"ssl_cafile .* is not a file"):
        load_settings()
    _env(monkeypatch, ssl_cafile=pki.ca_file, ssl_certfile=pki.client_cert)
    with pytest.raises(SettingsError, match=r"ssl_certfile .* holds no private key; set ssl_key"):
        load_settings()
    monkeypatch.delenv("MODERATION_SSL_CERTFILE")
    _env(monkeypatch, ssl_keyfile=pki.client_key)
    with pytest.raises(SettingsError, match="ssl_keyfile set without ssl_certfile"):
        load_settings()
    monkeypatch.delenv("MODERATION_SSL_KEYFILE")
    _env(monkeypatch, ssl_certfile=pki.combined_pem)  # certificate and key in one PEM is fine
    assert kafka_security.ssl_context(load_settings()) is not None


def test_sasl_password_and_password_file_exclude_each_other(
    monkeypatch: pytest.MonkeyPatch, password_file: Path, tmp_path: Path
) -> None:
    _env(
        monkeypatch,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="alice",
        sasl_password=SECRET,
        sasl_password_file=password_file,
    )
    with pytest.raises(SettingsError, match="sasl_password or sasl_password_file, not both") as e:
        load_settings()
    assert SECRET not in str(e.value)
    monkeypatch.delenv("MODERATION_SASL_PASSWORD")
    s = load_settings()
    assert s.sasl_password_value() == SECRET  # file content, trailing newline stripped
    empty = tmp_path / "empty"
    empty.write_text("\n")
    _env(monkeypatch, sasl_password_file=empty)
    with pytest.raises(SettingsError, match=r"sasl_password_file .*empty is empty"):
        load_settings()


# ---------------------------------------------------------------------------------------------
# Secrets never shown (fast)
# ---------------------------------------------------------------------------------------------


def _sasl_env(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(
        monkeypatch,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="alice",
        sasl_password=SECRET,
    )


def test_secret_is_masked_in_public_dict_repr_and_validation_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _sasl_env(monkeypatch)
    s = load_settings()
    public = s.public_dict()
    assert public["sasl_password"] == "**********" and public["sasl_username"] == "alice"
    assert SECRET not in orjson.dumps(public).decode()
    assert SECRET not in repr(s) and SECRET not in str(s)
    assert s.sasl_password_value() == SECRET  # still usable by the Kafka clients
    # pydantic's own error text echoes the input by default; ours must not.
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        # SASL fields under PLAINTEXT: a model-level error, whose input holds the password
        Settings(security_protocol="PLAINTEXT", sasl_password=SECRET)
    assert "sasl_password set" in str(info.value) and SECRET not in str(info.value)
    # Faust's credentials object is what Faust may print.
    creds = kafka_security.faust_credentials(s)
    assert SECRET not in repr(creds) and "alice" in repr(creds)


def test_config_command_redacts_the_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from moderation_worker.cli import main

    _sasl_env(monkeypatch)
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    printed = orjson.loads(out)
    assert printed["security_protocol"] == "SASL_PLAINTEXT"
    assert printed["sasl_password"] == "**********"
    assert SECRET not in out


# ---------------------------------------------------------------------------------------------
# SSL context and Faust credentials (fast)
# ---------------------------------------------------------------------------------------------


def test_faust_gets_the_same_client_settings_as_aiokafka_kwargs(
    pki: Pki, password_file: Path
) -> None:
    """Faust's consumer, producer and topic-creating client all build their aiokafka auth with
    `credentials_to_aiokafka_auth(conf.broker_credentials, ...)`: it must equal our kwargs."""
    import faust
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from adapters.options import faust_options

    cases = [
        dict(security_protocol="SSL", ssl_cafile=pki.ca_file),
        dict(
            security_protocol="SSL",
            ssl_cafile=pki.ca_file,
            ssl_certfile=pki.client_cert,
            ssl_keyfile=pki.client_key,
        ),
        dict(
            security_protocol="SASL_SSL",
            ssl_cafile=pki.ca_file,
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="alice",
            sasl_password_file=password_file,
        ),
        dict(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="PLAIN",
            sasl_username="alice",
            sasl_password=SECRET,
        ),
    ]
    for values in cases:
        s = Settings(**values)
        app = faust.App("mw-creds-test", **faust_options(s))
        faust_auth = credentials_to_aiokafka_auth(app.conf.broker_credentials, None)
        ours = aiokafka_client_kwargs(s)
        assert faust_auth["security_protocol"] == s.security_protocol
        for key in ("sasl_mechanism", "sasl_plain_username", "sasl_plain_password"):
            assert faust_auth.get(key) == ours.get(key), (values, key)
        if s.security_protocol in ("SSL", "SASL_SSL"):
            context = faust_auth["ssl_context"]
            assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        else:
            assert faust_auth.get("ssl_context") is None
    assert ours["sasl_plain_password"] == SECRET
    plain = faust.App("mw-creds-plain", **faust_options(Settings()))
    assert credentials_to_aiokafka_auth(plain.conf.broker_credentials, None) == {
        "security_protocol": "PLAINTEXT"
    }


def test_ssl_context_files_that_do_not_load_are_named(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(SettingsError, match="ssl_cafile .*garbage.pem does not load"):
        kafka_security.ssl_context(Settings(security_protocol="SSL", ssl_cafile=garbage))
    mtls = dict(security_protocol="SSL", ssl_cafile=pki.ca_file, ssl_certfile=pki.client_cert)
    with pytest.raises(SettingsError, match="encrypted; set ssl_keyfile_password_file"):
        kafka_security.ssl_context(Settings(**mtls, ssl_keyfile=pki.encrypted_key))
    wrong = tmp_path / "wrong-password"
    wrong.write_text("nope")
    with pytest.raises(SettingsError, match="wrong password in ssl_keyfile_password_file"):
        kafka_security.ssl_context(
            Settings(**mtls, ssl_keyfile=pki.encrypted_key, ssl_keyfile_password_file=wrong)
        )
    with pytest.raises(SettingsError, match="ssl_keyfile is not the private key of ssl_certfile"):
        kafka_security.ssl_context(Settings(**mtls, ssl_keyfile=pki.foreign_key))
    context = kafka_security.ssl_context(
        Settings(
            **mtls,
            ssl_keyfile=pki.encrypted_key,
            ssl_keyfile_password_file=pki.key_password_file,
            ssl_check_hostname=False,
        )
    )
    assert context is not None and not context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED  # the chain is still verified


def test_tls_alert_from_a_real_kafka_about_a_missing_client_certificate_names_ssl_certfile(
    pki: Pki,
) -> None:
    """Apache Kafka sends TLS alerts the proxy cannot (asyncio aborts without one)."""
    s = Settings(security_protocol="SSL", ssl_cafile=pki.ca_file)
    alert = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert (_ssl.c:2580)")
    text = kafka_preflight.describe_failure(alert, "kafka-1", 9093, s)
    assert "TLS handshake with kafka-1:9093 failed" in text
    assert "requires a client certificate" in text and "MODERATION_SSL_CERTFILE" in text
    not_tls = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
    assert "does not speak TLS" in kafka_preflight.describe_failure(not_tls, "h", 1, s)


async def test_refused_connection_names_broker_url_after_retrying() -> None:
    port = free_port()
    s = Settings(broker_url=f"kafka://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError) as info:
        await kafka_preflight.check_connection(s, timeout_s=1.5)
    elapsed = time.monotonic() - started
    assert f"connection to 127.0.0.1:{port} refused" in str(info.value)
    assert "broker_url (MODERATION_BROKER_URL)" in str(info.value)
    assert 1.0 <= elapsed < 5, "a refused connection is retried until the timeout, no longer"


# ---------------------------------------------------------------------------------------------
# Secured endpoints: TLS proxy in front of Tansu, and Tansu with --authentication
# ---------------------------------------------------------------------------------------------


@dataclass
class SecureCluster:
    """A Tansu broker reachable only through a TLS proxy (which it advertises)."""

    proxy: TlsProxy
    tansu: TansuBroker

    @property
    def info(self) -> BrokerInfo:
        return BrokerInfo(url=self.proxy.url, bootstrap=self.proxy.bootstrap, embedded=True)


@pytest.fixture(scope="module")
def _secure_clusters(pki: Pki) -> Iterator[dict[str, SecureCluster]]:
    clusters: dict[str, SecureCluster] = {}
    try:
        for name, client_ca in (("tls", None), ("mtls", pki.ca)):
            proxy = TlsProxy(server_context(pki.server, client_ca=client_ca)).start()
            tansu = TansuBroker(advertised_url=f"tcp://127.0.0.1:{proxy.port}")
            clusters[name] = SecureCluster(proxy, tansu)
            tansu.start()
            proxy.upstream = (tansu.host, tansu.port)
        yield clusters
    finally:
        for cluster in clusters.values():
            cluster.tansu.stop()
            cluster.proxy.stop()


@pytest.fixture
def tls_cluster(_secure_clusters: dict[str, SecureCluster]) -> SecureCluster:
    return _secure_clusters["tls"]


@pytest.fixture
def mtls_cluster(_secure_clusters: dict[str, SecureCluster]) -> SecureCluster:
    return _secure_clusters["mtls"]


@pytest.fixture(scope="module")
def sasl_tansu() -> Iterator[TansuBroker]:
    """Tansu requiring SASL: it refuses every SCRAM login (no users can exist)."""
    with TansuBroker(extra_args=("--authentication",)) as tansu:
        yield tansu


def _tls(cluster: SecureCluster, pki: Pki, **extra: Any) -> dict[str, Any]:
    return dict(
        broker_url=cluster.proxy.url, security_protocol="SSL", ssl_cafile=pki.ca_file, **extra
    )


def _mtls(cluster: SecureCluster, pki: Pki) -> dict[str, Any]:
    return _tls(cluster, pki, ssl_certfile=pki.client_cert, ssl_keyfile=pki.client_key)


async def _create_topics(settings: Settings, topics: TopicSet, partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(
        bootstrap_servers=_bootstrap(settings), **aiokafka_client_kwargs(settings)
    )
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, partitions, 1) for n in (topics.input, topics.verdicts, topics.dlq)]
        )
    finally:
        await admin.close()


def _bootstrap(settings: Settings) -> str:
    return ",".join(f"{h}:{p}" for h, p in kafka_security.bootstrap_servers(settings))


async def _produce(settings: Settings, topic: str, n: int) -> list[tuple[int, int]]:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=_bootstrap(settings), linger_ms=5, **aiokafka_client_kwargs(settings)
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, key=b"k%d" % i, value=comment(i)) for i in range(n)]
        return [(m.partition, m.offset) for m in await asyncio.gather(*futures)]
    finally:
        await producer.stop()


async def _read_verdicts(
    settings: Settings, topics: TopicSet, n: int, timeout: float = 30.0
) -> list[dict[str, Any]]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topics.verdicts,
        topics.dlq,
        bootstrap_servers=_bootstrap(settings),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        metadata_max_age_ms=500,
        **aiokafka_client_kwargs(settings),
    )
    await consumer.start()
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            out.extend(orjson.loads(m.value) for ms in batch.values() for m in ms)
    finally:
        await consumer.stop()
    return out


async def _scores_through(
    cluster_info: BrokerInfo, values: dict[str, Any], spawn_worker: Any, n: int = 12
) -> WorkerProcess:
    """Start a worker with `values` as settings, produce `n` comments and read one verdict
    each, all through the same secured endpoint."""
    settings = Settings(**values)
    topics = TopicSet.fresh()
    await _create_topics(settings, topics, partitions=2)
    env = worker_env(
        cluster_info, topics, partitions=2, **{k: v for k, v in values.items() if k != "broker_url"}
    )
    worker: WorkerProcess = spawn_worker(env)
    worker.wait_ready(timeout=90)
    positions = await _produce(settings, topics.input, n)
    outputs = await _read_verdicts(settings, topics, n)
    assert sorted((o["source"]["partition"], o["source"]["offset"]) for o in outputs) == sorted(
        positions
    ), f"one verdict per comment expected:\n{worker.log_tail()}"
    assert {o["id"] for o in outputs} == {f"c{i}" for i in range(n)}
    assert all(isinstance(o["hateful"], bool) and "label" in o for o in outputs), outputs[:2]
    return worker


def _preflight_record(worker: WorkerProcess, msg: str) -> dict[str, Any]:
    records = [r for r in worker.log_lines() if r.get("msg") == msg]
    assert records, f"no {msg!r} log record:\n{worker.log_tail()}"
    return records[0]


def _exits_with(worker: WorkerProcess, *fragments: str, timeout: float = 90) -> str:
    """The worker must exit non-zero on its own, its log naming every fragment, no KeyError."""
    rc = worker.wait(timeout=timeout)
    log = worker.log_path.read_text(encoding="utf-8", errors="replace")
    assert rc != 0, f"worker exited 0:\n{log[-3000:]}"
    for fragment in fragments:
        assert fragment in log, f"{fragment!r} not in the worker log:\n{log[-3000:]}"
    assert "KeyError" not in log
    failed = _preflight_record(worker, "kafka preflight failed")
    assert all(f in failed["error"] for f in fragments)
    return log


# --- (a) TLS ----------------------------------------------------------------------------------


@pytest.mark.broker
async def test_tls_worker_starts_and_scores_through_the_tls_listener(
    tls_cluster: SecureCluster, pki: Pki, spawn_worker: Any
) -> None:
    before = tls_cluster.proxy.connections
    worker = await _scores_through(tls_cluster.info, _tls(tls_cluster, pki), spawn_worker)
    ok = _preflight_record(worker, "kafka preflight ok")
    assert ok["security_protocol"] == "SSL"
    assert ok["brokers"] == [tls_cluster.proxy.bootstrap], "Tansu must advertise the proxy"
    # preflight (2) + worker consumer/producer + our admin, producer and consumer
    assert tls_cluster.proxy.connections - before >= 6
    assert worker.stop() == 0


@pytest.mark.broker
async def test_tls_listener_refuses_plaintext_clients_with_a_clear_message(
    tls_cluster: SecureCluster,
) -> None:
    """The endpoint really is TLS-only, and a PLAINTEXT worker is told what to change."""
    s = Settings(broker_url=tls_cluster.proxy.url)
    with pytest.raises(BrokerConnectionError) as info:
        await kafka_preflight.check_connection(s, timeout_s=10)
    text = str(info.value)
    assert f"the broker at {tls_cluster.proxy.bootstrap} closed the connection" in text
    assert "security_protocol (MODERATION_SECURITY_PROTOCOL)" in text


@pytest.mark.broker
async def test_unreachable_advertised_listener_is_named(tls_cluster: SecureCluster) -> None:
    """Bootstrap answers, but the broker advertises an address this client cannot use (here:
    the TLS proxy, to a PLAINTEXT client): the classic advertised.listeners mistake, which
    otherwise shows as a worker that connects and then hangs."""
    s = Settings(broker_url=tls_cluster.tansu.url)  # Tansu's own plaintext port
    with pytest.raises(BrokerConnectionError) as info:
        await kafka_preflight.check_connection(s, timeout_s=10)
    text = str(info.value)
    assert text.startswith(f"bootstrap server {tls_cluster.tansu.bootstrap} answered")
    assert "the worker cannot connect to the advertised brokers" in text
    assert f"advertises {tls_cluster.proxy.bootstrap}, where the broker at" in text
    assert "advertised.listeners" in text


@pytest.mark.broker
async def test_one_unreachable_broker_of_several_only_warns(
    tls_cluster: SecureCluster, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A rolling restart (one broker down) must not keep workers from starting."""
    s = Settings(**_tls(tls_cluster, pki))
    dead = free_port()
    brokers = [(1, "127.0.0.1", tls_cluster.proxy.port), (2, "127.0.0.1", dead)]
    kwargs = aiokafka_client_kwargs(s)
    with caplog.at_level("WARNING", logger="moderation_worker.kafka_security"):
        await kafka_preflight._check_advertised(
            brokers, ("127.0.0.1", 1), kwargs, s, time.monotonic() + 5
        )
    assert [r.error for r in caplog.records] == [  # type: ignore[attr-defined]
        f"broker 2 advertises 127.0.0.1:{dead}, where connection to 127.0.0.1:{dead} refused "
        "(nothing listens there): check broker_url (MODERATION_BROKER_URL)"
    ]
    with pytest.raises(BrokerConnectionError, match="cannot connect to the advertised brokers"):
        await kafka_preflight._check_advertised(
            brokers[1:], ("127.0.0.1", 1), kwargs, s, time.monotonic() + 5
        )


# --- (b) mutual TLS ---------------------------------------------------------------------------


@pytest.mark.broker
async def test_mtls_worker_with_client_certificate_scores(
    mtls_cluster: SecureCluster, pki: Pki, spawn_worker: Any
) -> None:
    errors_before = len(mtls_cluster.proxy.handshake_errors)
    worker = await _scores_through(mtls_cluster.info, _mtls(mtls_cluster, pki), spawn_worker)
    assert mtls_cluster.proxy.handshake_errors[errors_before:] == []
    assert worker.stop() == 0


@pytest.mark.broker
def test_mtls_worker_without_client_certificate_exits_naming_ssl_certfile(
    mtls_cluster: SecureCluster, pki: Pki, spawn_worker: Any
) -> None:
    errors_before = len(mtls_cluster.proxy.handshake_errors)
    values = _tls(mtls_cluster, pki)
    values.pop("broker_url")
    worker = spawn_worker(worker_env(mtls_cluster.info, TopicSet.fresh(), **values))
    _exits_with(
        worker,
        f"the broker at {mtls_cluster.proxy.bootstrap} closed the connection",
        "requires a client certificate (mutual TLS)",
        "ssl_certfile (MODERATION_SSL_CERTFILE)",
        "ssl_keyfile (MODERATION_SSL_KEYFILE)",
    )
    # ...and that is really why: the broker side saw a client without a certificate.
    seen = mtls_cluster.proxy.handshake_errors[errors_before:]
    assert seen and all("PEER_DID_NOT_RETURN_A_CERTIFICATE" in e for e in seen), seen


@pytest.mark.broker
async def test_mtls_encrypted_key_with_password_file_passes_and_foreign_cert_is_named(
    mtls_cluster: SecureCluster, pki: Pki
) -> None:
    good = Settings(
        **_tls(
            mtls_cluster,
            pki,
            ssl_certfile=pki.client_cert,
            ssl_keyfile=pki.encrypted_key,
            ssl_keyfile_password_file=pki.key_password_file,
        )
    )
    brokers = await kafka_preflight.check_connection(good, timeout_s=10)
    assert [(h, p) for _, h, p in brokers] == [("127.0.0.1", mtls_cluster.proxy.port)]

    foreign = Settings(
        **_tls(mtls_cluster, pki, ssl_certfile=pki.foreign_cert, ssl_keyfile=pki.foreign_key)
    )
    errors_before = len(mtls_cluster.proxy.handshake_errors)
    with pytest.raises(BrokerConnectionError) as info:
        await kafka_preflight.check_connection(foreign, timeout_s=10)
    assert f"rejected the client certificate ssl_certfile {pki.foreign_cert}" in str(info.value)
    # The client can see the rejection a moment before the proxy has recorded its side.
    deadline = time.monotonic() + 5.0
    while not any(
        "CERTIFICATE_VERIFY_FAILED" in e
        for e in mtls_cluster.proxy.handshake_errors[errors_before:]
    ):
        assert time.monotonic() < deadline, mtls_cluster.proxy.handshake_errors[errors_before:]
        await asyncio.sleep(0.05)


# --- (c) untrusted server certificate ---------------------------------------------------------


@pytest.mark.broker
def test_untrusted_broker_certificate_worker_exits_naming_ssl_cafile(
    tls_cluster: SecureCluster, pki: Pki, spawn_worker: Any
) -> None:
    values = _tls(tls_cluster, pki)
    values.pop("broker_url")
    values["ssl_cafile"] = pki.other_ca_file
    worker = spawn_worker(worker_env(tls_cluster.info, TopicSet.fresh(), **values))
    _exits_with(
        worker,
        f"TLS handshake with {tls_cluster.proxy.bootstrap} failed: certificate verify failed",
        f"not signed by a CA in ssl_cafile {pki.other_ca_file}",
        "check ssl_cafile (MODERATION_SSL_CAFILE)",
    )


@pytest.mark.broker
async def test_certificate_for_another_host_names_ssl_check_hostname(
    tls_cluster: SecureCluster, pki: Pki
) -> None:
    """Bootstrap through a listener whose certificate names another host: the hostname check
    fails with its own message; ssl_check_hostname=false gets through (the chain still counts)."""
    wrong_name = pki.ca.issue_cert("broker.example")
    with TlsProxy(
        server_context(wrong_name), (tls_cluster.tansu.host, tls_cluster.tansu.port)
    ) as p:
        s = Settings(**{**_tls(tls_cluster, pki), "broker_url": p.url})
        with pytest.raises(BrokerConnectionError) as info:
            await kafka_preflight.check_connection(s, timeout_s=10)
        text = str(info.value)
        assert "certificate verify failed" in text and "does not name 127.0.0.1" in text
        assert "ssl_check_hostname (MODERATION_SSL_CHECK_HOSTNAME)" in text
        relaxed = Settings(
            **{**_tls(tls_cluster, pki), "broker_url": p.url}, ssl_check_hostname=False
        )
        brokers = await kafka_preflight.check_connection(relaxed, timeout_s=10)
        assert [p_ for _, _, p_ in brokers] == [tls_cluster.proxy.port]


# --- (d) SASL refused -------------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_refused_scram_login_is_a_clear_error_not_a_keyerror(
    sasl_tansu: TansuBroker, mechanism: str, password_file: Path
) -> None:
    s = Settings(
        broker_url=sasl_tansu.url,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=mechanism,
        sasl_username="alice",
        sasl_password_file=password_file,
    )
    with pytest.raises(BrokerConnectionError) as info:
        await kafka_preflight.check_connection(s, timeout_s=10)
    text = str(info.value)
    assert text.startswith(f"SASL {mechanism} login as alice to {sasl_tansu.bootstrap} rejected")
    assert "(broker says: unknown-user)" in text
    assert "sasl_username (MODERATION_SASL_USERNAME)" in text
    assert f"sasl_password_file {password_file}" in text
    assert "KeyError" not in text and SECRET not in text
    assert info.value.__context__ is None and info.value.__cause__ is None


@pytest.mark.broker
async def test_mechanism_the_broker_does_not_offer_names_sasl_mechanism(
    sasl_tansu: TansuBroker,
) -> None:
    s = Settings(
        broker_url=sasl_tansu.url,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="alice",
        sasl_password=SECRET,
    )
    with pytest.raises(BrokerConnectionError) as info:
        await kafka_preflight.check_connection(s, timeout_s=10)
    assert "SASL PLAIN login" in str(info.value) and "sasl_mechanism" in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.broker
def test_refused_scram_login_worker_exits_with_the_message_and_no_secret(
    sasl_tansu: TansuBroker, spawn_worker: Any
) -> None:
    info = BrokerInfo(url=sasl_tansu.url, bootstrap=sasl_tansu.bootstrap, embedded=True)
    env = worker_env(
        info,
        TopicSet.fresh(),
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="alice",
        sasl_password=SECRET,
    )
    worker = spawn_worker(env)
    log = _exits_with(
        worker,
        f"SASL SCRAM-SHA-256 login as alice to {sasl_tansu.bootstrap} rejected by the broker",
        "check sasl_username (MODERATION_SASL_USERNAME) / sasl_password",
    )
    assert SECRET not in log
    starting = _preflight_record(worker, "worker starting")
    assert starting["settings"]["sasl_password"] == "**********"


@pytest.mark.broker
def test_cli_worker_exits_2_with_one_line_instead_of_a_traceback(sasl_tansu: TansuBroker) -> None:
    """`moderation-worker worker` (the production entry point; model factory swapped for the
    trivial scorer) prints the preflight message as one error line and exits 2."""
    code = (
        "import sys, moderation_worker.model.sources as m\n"
        "from moderation_worker.tools.trivial_scorer import TrivialScorer\n"
        "m.build_classifier = lambda *a, **k: TrivialScorer(batch_size=8)\n"
        "from moderation_worker.cli import main\n"
        "sys.exit(main(['worker']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATION_")}
    env.update(
        MODERATION_BROKER_URL=sasl_tansu.url,
        MODERATION_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        MODERATION_SASL_MECHANISM="SCRAM-SHA-512",
        MODERATION_SASL_USERNAME="svc-moderation",
        MODERATION_SASL_PASSWORD=SECRET,
        MODERATION_WEB_PORT=str(free_port()),
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        "moderation-worker worker: error: SASL SCRAM-SHA-512 login as svc-moderation to "
        f"{sasl_tansu.bootstrap} rejected by the broker"
    ) in proc.stderr
    assert "Traceback" not in proc.stderr and "KeyError" not in proc.stderr
    assert SECRET not in proc.stderr + proc.stdout


# --- (e) SCRAM success against a real Kafka ---------------------------------------------------


def _sasl_broker_from_env() -> dict[str, Any]:
    url = os.environ.get(SASL_BROKER_ENV)
    if not url:
        pytest.skip(
            f"set {SASL_BROKER_ENV}=sasl_ssl://USER:PASSWORD@HOST:PORT?mechanism=SCRAM-SHA-512"
            "&cafile=/path/ca.pem (or sasl_plaintext://...) to log in to a real Kafka; "
            "the embedded Tansu cannot have SCRAM users"
        )
    # "_" is not a URL-scheme character, so urlsplit would not see "sasl_ssl" as the scheme.
    scheme, _, rest = url.partition("://")
    parts = urllib.parse.urlsplit("//" + rest)
    query = dict(urllib.parse.parse_qsl(parts.query))
    values: dict[str, Any] = {
        "broker_url": f"kafka://{parts.hostname}:{parts.port or 9092}",
        "security_protocol": scheme.upper(),
        "sasl_mechanism": query.get("mechanism", "SCRAM-SHA-512"),
        "sasl_username": urllib.parse.unquote(parts.username or ""),
        "sasl_password": urllib.parse.unquote(parts.password or ""),
    }
    if "cafile" in query:
        values["ssl_cafile"] = query["cafile"]
    return values


@pytest.mark.broker
async def test_scram_login_succeeds_and_a_worker_scores_on_a_real_kafka(
    spawn_worker: Any,
) -> None:
    """Runs only against a real Kafka with a SCRAM user, named by `MODERATION_TEST_BROKER_SASL`:

        sasl_ssl://USER:PASSWORD@HOST:PORT?mechanism=SCRAM-SHA-512&cafile=/path/ca.pem
        sasl_plaintext://USER:PASSWORD@HOST:PORT?mechanism=SCRAM-SHA-256

    (percent-encode special characters in USER and PASSWORD; `cafile` is optional, the system
    CA store is used without it). The broker must allow the user to create topics and join
    consumer groups. Checks the preflight logs in and a worker scores through that listener.
    """
    values = _sasl_broker_from_env()
    settings = Settings(**values)
    brokers = await kafka_preflight.check_connection(settings, timeout_s=20)
    assert brokers, "a logged-in metadata request lists the brokers"
    info = BrokerInfo(url=settings.broker_url, bootstrap=_bootstrap(settings), embedded=False)
    worker_values = dict(values)
    if "topic_replication_factor" in Settings.model_fields:  # a one-broker test cluster
        worker_values["topic_replication_factor"] = 1
    worker = await _scores_through(info, worker_values, spawn_worker)
    assert values["sasl_password"] not in worker.log_path.read_text(errors="replace")
    assert worker.stop() == 0

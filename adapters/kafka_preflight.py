"""The Kafka preflight: connect as the worker will, or stop with the setting to fix.

`check_connection(settings)` opens one connection per bootstrap server and per advertised
broker (TLS handshake, SASL login, a metadata request) and turns every failure into a
`BrokerConnectionError` whose message names the setting to fix, instead of Faust retrying
forever or a raw traceback (aiokafka reports a refused SCRAM login as a bare `KeyError: 'v'`).
`preflight(settings)` runs it before the model loads. Secrets are never in a message.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from typing import Any

from adapters.kafka_security import (
    SASL_PROTOCOLS,
    TLS_PROTOCOLS,
    _env,
    _reason,
    aiokafka_client_kwargs,
    bootstrap_servers,
)
from moderation_worker.settings import Settings, SettingsError

log = logging.getLogger("moderation_worker.kafka_security")

#: Seconds the worker's preflight keeps retrying a broker that is not reachable yet.
DEFAULT_PREFLIGHT_TIMEOUT_S = 30.0
#: Longest one connection attempt may take, so a silent server leaves time for the next one.
ATTEMPT_TIMEOUT_S = 10.0


class BrokerConnectionError(SettingsError):
    """The broker cannot be reached or refuses us; the message names the setting to fix."""


async def check_connection(
    settings: Settings, timeout_s: float = DEFAULT_PREFLIGHT_TIMEOUT_S
) -> list[tuple[int, str, int]]:
    """Connect to the cluster as the worker will, or raise `BrokerConnectionError`.

    Tries each bootstrap server in turn (connect, TLS handshake, SASL login, metadata), then
    the same against every broker the metadata advertises (clients talk to those, so a wrong
    `advertised.listeners` shows up here, not as a hanging worker). Failures that may be
    passing (connection refused, DNS, timeout) are retried until `timeout_s`; certificate and
    login failures are reported at once. Returns the advertised brokers (node id, host, port).
    """
    kwargs = aiokafka_client_kwargs(settings)  # SettingsError for files that do not load
    deadline = time.monotonic() + timeout_s
    delay = 0.25
    while True:
        failures: list[tuple[BaseException, str]] = []
        for host, port in bootstrap_servers(settings):
            remaining = min(ATTEMPT_TIMEOUT_S, max(0.1, deadline - time.monotonic()))
            try:
                brokers = await _metadata(host, port, kwargs, remaining)
            except Exception as exc:
                failures.append((exc, describe_failure(exc, host, port, settings, remaining)))
                continue
            await _check_advertised(brokers, (host, port), kwargs, settings, deadline)
            return brokers
        remaining = deadline - time.monotonic()
        if remaining <= 0.05 or not all(_transient(exc) for exc, _ in failures):
            break
        log.info("broker not reachable yet; retrying", extra={"error": failures[0][1]})
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, 5.0)
    if len(failures) == 1:
        raise BrokerConnectionError(failures[0][1])
    raise BrokerConnectionError(
        "no bootstrap server answered:\n" + "\n".join(f"  - {text}" for _, text in failures)
    )


async def _metadata(
    host: str, port: int, kwargs: dict[str, Any], timeout_s: float
) -> list[tuple[int, str, int]]:
    from aiokafka.conn import create_conn
    from aiokafka.protocol.metadata import MetadataRequest

    async def _run() -> list[tuple[int, str, int]]:
        conn = await create_conn(
            host, port, request_timeout_ms=int(timeout_s * 1000), client_id="preflight", **kwargs
        )
        try:
            response = await conn.send(MetadataRequest([]))
        finally:
            conn.close()
        return [(int(b[0]), str(b[1]), int(b[2])) for b in response.brokers]

    return await asyncio.wait_for(_run(), timeout_s)


async def _check_advertised(
    brokers: list[tuple[int, str, int]],
    via: tuple[str, int],
    kwargs: dict[str, Any],
    settings: Settings,
    deadline: float,
) -> None:
    """Fail when no advertised broker can be reached; warn about the ones that cannot.

    One broker down (a rolling restart) must not keep the worker from starting; all of them
    unreachable is the misconfigured `advertised.listeners` a worker would otherwise hang on.
    """
    if not brokers:
        return
    timeout_s = min(ATTEMPT_TIMEOUT_S, max(1.0, deadline - time.monotonic()))
    results = await asyncio.gather(
        *(_metadata(host, port, kwargs, timeout_s) for _, host, port in brokers),
        return_exceptions=True,
    )
    failures = []
    for (node, host, port), result in zip(brokers, results, strict=True):
        if isinstance(result, Exception):
            text = describe_failure(result, host, port, settings, timeout_s)
            failures.append(f"broker {node} advertises {host}:{port}, where {text}")
        elif isinstance(result, BaseException):
            raise result
    if len(failures) == len(brokers):
        raise BrokerConnectionError(
            f"bootstrap server {via[0]}:{via[1]} answered, but the worker cannot connect to "
            f"the advertised brokers: {'; '.join(failures)}. Clients talk to the advertised "
            "addresses, so the brokers' advertised.listeners must be reachable from the worker "
            "with the same security settings"
        )
    for failure in failures:
        log.warning("an advertised broker is not reachable", extra={"error": failure})


def _transient(exc: BaseException) -> bool:
    """Failures that may pass (broker starting, DNS not yet up): worth retrying."""
    if isinstance(exc, ssl.SSLError):
        return False
    return isinstance(exc, ConnectionRefusedError | socket.gaierror | TimeoutError) or (
        isinstance(exc, OSError) and not isinstance(exc, ConnectionResetError)
    )


def describe_failure(
    exc: BaseException, host: str, port: int, settings: Settings, timeout_s: float = 0.0
) -> str:
    """One sentence saying what went wrong talking to host:port and which setting to check."""
    from aiokafka import errors

    where = f"{host}:{port}"
    protocol = settings.security_protocol
    tls = protocol in TLS_PROTOCOLS
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _certificate_failure(exc, where, host, settings)
    if isinstance(exc, ssl.SSLError):
        return _tls_failure(exc, where, settings)
    scram = _scram_server_error(exc, settings)
    if scram is not None:
        return _login_rejected(where, settings, scram)
    if isinstance(exc, errors.SaslAuthenticationFailed | errors.AuthenticationFailedError):
        return _login_rejected(where, settings, str(exc.args[0]) if exc.args else "")
    if isinstance(exc, errors.UnsupportedSaslMechanismError):
        return (
            f"the broker at {where} does not accept SASL mechanism {settings.sasl_mechanism}: "
            f"check {_env('sasl_mechanism')}, and whether this listener uses SASL at all "
            f"({_env('security_protocol')} is {protocol})"
        )
    if isinstance(exc, errors.KafkaConnectionError) and "closed" in str(exc):
        return _closed(where, settings)
    if isinstance(exc, ConnectionRefusedError):
        return f"connection to {where} refused (nothing listens there): check {_env('broker_url')}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host {host} ({exc.strerror}): check {_env('broker_url')}"
    if isinstance(exc, TimeoutError):
        hint = f"check {_env('broker_url')} and firewalls"
        if tls:
            hint += (
                f"; a plaintext listener spoken to in TLS also stays silent: check "
                f"{_env('security_protocol')} ({protocol}) and the port"
            )
        return f"no answer from {where} within {timeout_s:.0f} s: {hint}"
    if isinstance(exc, OSError):
        return f"cannot connect to {where} ({exc.strerror or exc}): check {_env('broker_url')}"
    if isinstance(exc, errors.KafkaError):
        return f"the broker at {where} refused the connection ({exc!r}): check the Kafka settings"
    return f"cannot talk to the broker at {where}: {type(exc).__name__}: {exc}"


def _certificate_failure(
    exc: ssl.SSLCertVerificationError, where: str, host: str, settings: Settings
) -> str:
    detail = exc.verify_message or _reason(exc)
    head = f"TLS handshake with {where} failed: certificate verify failed: {detail}"
    if "mismatch" in detail.lower():
        return (
            f"{head}; the broker certificate does not name {host}: connect by a name the "
            f"certificate holds ({_env('broker_url')}) or, on a trusted network only, set "
            f"{_env('ssl_check_hostname')} to false"
        )
    trust = (
        f"ssl_cafile {settings.ssl_cafile}"
        if settings.ssl_cafile
        else "the system CA store (ssl_cafile is not set)"
    )
    return (
        f"{head}; the broker certificate is not signed by a CA in {trust}: "
        f"check {_env('ssl_cafile')}"
    )


#: TLS alerts a broker sends about our client certificate (or its absence).
_CLIENT_CERT_ALERTS = (
    "CERTIFICATE_REQUIRED",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE",
    "BAD_CERTIFICATE",
    "UNKNOWN_CA",
    "CERTIFICATE_UNKNOWN",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "UNSUPPORTED_CERTIFICATE",
    "ACCESS_DENIED",
)
#: What a TLS client reads from a listener that does not speak TLS.
_NOT_TLS = (
    "WRONG_VERSION_NUMBER",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "HTTP_REQUEST",
)


def _client_cert_hint(settings: Settings, certain: bool = True) -> str:
    if settings.ssl_certfile is None:
        return (
            f"the broker {'' if certain else 'probably '}requires a client certificate "
            f"(mutual TLS): set "
            f"{_env('ssl_certfile')} and {_env('ssl_keyfile')}"
        )
    return (
        f"the broker {'' if certain else 'probably '}rejected the client certificate "
        f"ssl_certfile {settings.ssl_certfile}: "
        f"check that {_env('ssl_certfile')} / {_env('ssl_keyfile')} hold a valid certificate "
        "signed by a CA the broker trusts"
    )


def _tls_failure(exc: ssl.SSLError, where: str, settings: Settings) -> str:
    text = f"{getattr(exc, 'reason', None) or ''} {exc}".upper()
    head = f"TLS handshake with {where} failed ({_reason(exc)})"
    if any(alert in text for alert in _CLIENT_CERT_ALERTS):
        return f"{head}: {_client_cert_hint(settings)}"
    if any(marker in text for marker in _NOT_TLS):
        return (
            f"{head}: the listener at {where} does not speak TLS: check "
            f"{_env('security_protocol')} ({settings.security_protocol}) and the port in "
            f"{_env('broker_url')}"
        )
    if "HANDSHAKE_FAILURE" in text and settings.ssl_certfile is None:
        return (
            f"{head}: if the broker requires client certificates (mutual TLS), set "
            f"{_env('ssl_certfile')} and {_env('ssl_keyfile')}; otherwise the broker and this "
            "client share no TLS version or cipher"
        )
    return f"{head}: check ssl_cafile, ssl_certfile and ssl_keyfile"


def _closed(where: str, settings: Settings) -> str:
    protocol = settings.security_protocol
    head = f"the broker at {where} closed the connection before answering"
    if protocol == "PLAINTEXT":
        return (
            f"{head}: the listener probably requires TLS or SASL: check "
            f"{_env('security_protocol')} (PLAINTEXT) and the port in {_env('broker_url')}"
        )
    parts = []
    if protocol in TLS_PROTOCOLS:
        # TLS 1.3 finishes the client side of the handshake before the broker checks the
        # client certificate; a broker that wants one (or rejects ours) then just closes.
        parts.append(_client_cert_hint(settings, certain=False))
    if protocol in SASL_PROTOCOLS:
        parts.append(
            f"{'or ' if parts else ''}it refused the SASL {settings.sasl_mechanism} login or "
            f"does not offer that mechanism: check {_env('sasl_mechanism')}, sasl_username "
            "and sasl_password"
        )
    after = "connecting" if protocol == "SASL_PLAINTEXT" else "the TLS handshake"
    return f"{head} (right after {after}): " + "; ".join(parts)


def _scram_server_error(exc: BaseException, settings: Settings) -> str | None:
    """The server's error when `exc` is aiokafka's `KeyError: 'v'` on a refused SCRAM login.

    A broker that refuses a SCRAM login answers with a server-final message `e=<error>`
    (RFC 5802), which aiokafka parses as if it held the server signature `v=`. Returns the
    broker's error text ("" when not found), or None when `exc` is something else.
    """
    if not isinstance(exc, KeyError) or exc.args != ("v",):
        return None
    if not (settings.sasl_mechanism or "").startswith("SCRAM-"):
        return None
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or tb.tb_frame.f_code.co_name != "process_server_final_message":
        return None
    server_final = tb.tb_frame.f_locals.get("server_final")
    if isinstance(server_final, str) and server_final.startswith("e="):
        return server_final[2:]
    return ""


def _login_rejected(where: str, settings: Settings, server_says: str) -> str:
    said = f" (broker says: {server_says})" if server_says else ""
    source = (
        f"sasl_password_file {settings.sasl_password_file}"
        if settings.sasl_password_file is not None
        else "sasl_password (MODERATION_SASL_PASSWORD)"
    )
    return (
        f"SASL {settings.sasl_mechanism} login as {settings.sasl_username} to {where} rejected "
        f"by the broker{said}; check {_env('sasl_username')} / {source}, and "
        f"{_env('sasl_mechanism')}"
    )


def preflight(settings: Settings, timeout_s: float = DEFAULT_PREFLIGHT_TIMEOUT_S) -> None:
    """`check_connection` on a private event loop, logged; raises `BrokerConnectionError`.

    The loop is not installed as the current loop, so Faust starts afterwards exactly as
    without the preflight.
    """
    loop = asyncio.new_event_loop()
    started = time.perf_counter()
    try:
        brokers = loop.run_until_complete(check_connection(settings, timeout_s))
    except SettingsError as exc:
        log.error("kafka preflight failed", extra={"error": str(exc)})
        raise
    finally:
        loop.close()
    log.info(
        "kafka preflight ok",
        extra={
            "security_protocol": settings.security_protocol,
            "brokers": [f"{host}:{port}" for _, host, port in brokers],
            "seconds": round(time.perf_counter() - started, 3),
        },
    )

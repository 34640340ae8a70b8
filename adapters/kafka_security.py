"""Kafka security from the settings: TLS, mutual TLS and SASL for Faust and aiokafka clients.

`Settings` holds the choices (`security_protocol`, `ssl_*`, `sasl_*`); this module turns them into

* `ssl_context(settings)`: the client `ssl.SSLContext` (CA, client certificate, hostname check);
* `faust_credentials(settings)`: the `broker_credentials` Faust hands to every aiokafka client it
  makes (consumer, producer, the producer's client that creates topics, transaction producers);
* `aiokafka_client_kwargs(settings)`: the same as aiokafka keyword arguments, for our own
  clients (demo, tests, tools);
* `bootstrap_servers(settings)`: (host, port) pairs parsed as Faust parses `broker_url`.

The preflight that checks these against the real cluster is `adapters/kafka_preflight.py`.

Secrets (the SASL password, the key password) are read from the settings or their files here,
at start, and never logged: messages name settings and files, never values.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

from moderation_worker.settings import Settings, SettingsError

log = logging.getLogger("moderation_worker.kafka_security")

TLS_PROTOCOLS = ("SSL", "SASL_SSL")
SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")


def _env(name: str) -> str:
    return f"{name} (MODERATION_{name.upper()})"


# --------------------------------------------------------------------------- building clients
def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The client TLS context for `settings`, or None without TLS.

    Trusts `ssl_cafile` (else the system CA store), presents `ssl_certfile`/`ssl_keyfile` when
    set (mutual TLS), and checks the broker's host name unless `ssl_check_hostname` is false.
    Raises `SettingsError` naming the file that does not load.
    """
    if settings.security_protocol not in TLS_PROTOCOLS:
        return None
    cafile = settings.ssl_cafile
    try:
        # What aiokafka.helpers.create_ssl_context does, step by step so errors name the file.
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(cafile) if cafile else None
        )
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise SettingsError(
            f"ssl_cafile {cafile} does not load as PEM CA certificates: {_reason(exc)}"
        ) from None
    if settings.ssl_certfile is not None:
        _load_client_certificate(context, settings)
    if not settings.ssl_check_hostname:
        context.check_hostname = False  # the chain is still verified (CERT_REQUIRED)
    return context


def _load_client_certificate(context: ssl.SSLContext, settings: Settings) -> None:
    certfile, keyfile = settings.ssl_certfile, settings.ssl_keyfile
    password = settings.ssl_keyfile_password_value()
    key_path = keyfile or certfile
    assert certfile is not None and key_path is not None
    encrypted = "ENCRYPTED" in Path(key_path).read_text(encoding="utf-8", errors="replace")
    if encrypted and password is None:
        raise SettingsError(
            f"ssl_keyfile {key_path} is encrypted; set {_env('ssl_keyfile_password_file')}"
        )
    try:
        # A password callable (never None): OpenSSL would otherwise prompt on the terminal.
        context.load_cert_chain(
            str(certfile), str(keyfile) if keyfile else None, password=lambda: password or ""
        )
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = _reason(exc)
        if "BAD_DECRYPT" in reason.upper() or (encrypted and "PEM" in reason.upper()):
            hint = (
                f"wrong password in ssl_keyfile_password_file {settings.ssl_keyfile_password_file}"
            )
        elif "KEY_VALUES_MISMATCH" in reason.upper():
            hint = "ssl_keyfile is not the private key of ssl_certfile"
        else:
            hint = "both must be PEM; the key must belong to the certificate"
        raise SettingsError(
            f"client certificate ssl_certfile {certfile} with ssl_keyfile {key_path} does not "
            f"load ({reason}): {hint}"
        ) from None


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)  # set by OpenSSL, absent on a hand-made SSLError
    if isinstance(exc, ssl.SSLError) and reason:
        return str(reason)
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def aiokafka_client_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for any aiokafka client (producer, consumer, admin) on these settings.

    Holds the SASL password in clear (aiokafka needs it): pass it on, never log it.
    """
    kwargs: dict[str, Any] = {"security_protocol": settings.security_protocol}
    context = ssl_context(settings)
    if context is not None:
        kwargs["ssl_context"] = context
    if settings.security_protocol in SASL_PROTOCOLS:
        kwargs.update(
            sasl_mechanism=settings.sasl_mechanism,
            sasl_plain_username=settings.sasl_username,
            sasl_plain_password=settings.sasl_password_value(),
        )
    return kwargs


def faust_credentials(settings: Settings) -> Any:
    """Faust `broker_credentials` for `settings`, or None for PLAINTEXT.

    Faust (`credentials_to_aiokafka_auth`) turns these into the `security_protocol`,
    `ssl_context` and `sasl_*` arguments of each aiokafka client it creates.
    """
    import faust

    protocol = settings.security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = ssl_context(settings)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    # SASLCredentials switches to SASL_SSL exactly when it is given an SSL context.
    return faust.SASLCredentials(
        username=settings.sasl_username,
        password=settings.sasl_password_value(),
        ssl_context=context,
        mechanism=settings.sasl_mechanism,
    )


def bootstrap_servers(settings: Settings) -> list[tuple[str, int]]:
    """(host, port) of every bootstrap server in `broker_url`, parsed exactly as Faust does."""
    from faust.utils.urls import urllist

    servers = []
    for url in urllist(settings.broker_url, default_scheme="kafka"):
        servers.append((url.host or "127.0.0.1", url.port or 9092))
    return servers

"""A small TLS-terminating TCP proxy for tests: TLS (optionally mutual TLS) in, plaintext out.

Tansu's own TLS flags do not bring up a TLS listener, so secured-cluster tests put this proxy
in front of a plaintext Tansu port. The proxy runs its own event loop in a daemon thread, so it
keeps forwarding while a test blocks (for example in `WorkerProcess.wait_ready()`).

Kafka clients reconnect to the *advertised* listener from the metadata, so the broker behind
the proxy must advertise the proxy's address. The proxy binds its port (a free one unless
given) at `start()` and resolves its upstream per connection, so the order is: start the proxy,
start the broker advertising `proxy.port`, then set `proxy.upstream`:

    proxy = TlsProxy(server_context).start()
    with TansuBroker(advertised_url=f"tcp://127.0.0.1:{proxy.port}") as tansu:
        proxy.upstream = (tansu.host, tansu.port)
        ...
    proxy.stop()

`server_context()` builds the server-side `ssl.SSLContext` from a `trustme` server certificate,
with `client_ca` set to require client certificates signed by that CA (mutual TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from types import TracebackType
from typing import Any


def server_context(server_cert: Any, client_ca: Any = None) -> ssl.SSLContext:
    """A TLS server context presenting `server_cert` (a `trustme.LeafCert`).

    With `client_ca` (a `trustme.CA`), clients must present a certificate signed by it.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(ctx)
    if client_ca is not None:
        client_ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class TlsProxy:
    """Accept TLS on `host:port` and forward the decrypted bytes to `upstream` (host, port).

    Attributes for assertions: `connections` (handshakes that completed and were forwarded) and
    `handshake_errors` (text of every failed TLS handshake, e.g. a client without a certificate).
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        upstream: tuple[str, int] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        self.context = context
        self.upstream = upstream
        self.host = host
        self.port = port or 0
        self.connections = 0
        self.handshake_errors: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.host}:{self.port}"

    def start(self) -> TlsProxy:
        """Bind the port (a free one unless given) and serve from a background thread."""
        ready = threading.Event()
        failure: list[BaseException] = []
        self._loop = asyncio.new_event_loop()

        def _run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            try:
                self._server = self._loop.run_until_complete(self._listen())
            except BaseException as exc:  # surfaced to start() below
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=_run, name="tls-proxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    async def _listen(self) -> asyncio.Server:
        # Plain TCP first, TLS per connection (`start_tls`), so a failed handshake surfaces in
        # `_handle` (asyncio's own TLS server only logs it at debug level).
        server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = int(server.sockets[0].getsockname()[1])
        return server

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            try:
                await writer.start_tls(self.context, ssl_handshake_timeout=5.0)
            except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                self.handshake_errors.append(repr(exc))
                return
            if self.upstream is None:
                return
            self.connections += 1
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            pumps = [
                asyncio.ensure_future(_pump(reader, up_writer)),
                asyncio.ensure_future(_pump(up_reader, writer)),
            ]
            try:
                # Kafka has no half-closed connections: when one side ends, end both.
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                up_writer.close()
        except OSError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)  # type: ignore[arg-type]

    def stop(self) -> None:
        """Close the listener and every forwarded connection; idempotent."""
        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def _shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            loop.stop()

        loop.call_soon_threadsafe(lambda: loop.create_task(_shutdown()))
        if self._thread is not None:
            self._thread.join(10)
        loop.close()

    def __enter__(self) -> TlsProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes until EOF or a connection error."""
    with contextlib.suppress(OSError, ssl.SSLError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

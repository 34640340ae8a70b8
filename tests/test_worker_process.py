"""`tools.worker_process.WorkerProcess`, the launcher the demo and the broker tests share, driven
with stand-in children (no broker, no model): readiness from `/health` on the port it hands the
child, the log read back, and a dead or silent child turned into an error that quotes the log."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from adapters.tansu import free_port
from moderation_worker.settings import Settings
from moderation_worker.tools.worker_process import (
    WorkerExited,
    WorkerNotReady,
    WorkerProcess,
    worker_environment,
)

#: Serves /health and /metrics on MODERATION_WEB_PORT, as the worker's web server does.
FAKE_WORKER = """
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
print(json.dumps({"msg": "worker starting"}))
print("ZERO-SHOT: no LoRA weights")
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/health": b'{"assigned_partitions": [["t", 0]], "rebalancing": false}',
                "/metrics": b"moderation_events_total 3"}.get(self.path)
        self.send_response(200 if body else 404)
        self.end_headers()
        self.wfile.write(body or b"{}")
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", int(os.environ["MODERATION_WEB_PORT"])), Handler).serve_forever()
"""


def _child(tmp_path: Path, code: str) -> WorkerProcess:
    env = {"PATH": "/usr/bin:/bin"}
    return WorkerProcess(
        env, tmp_path / "logs" / "w.log", free_port(), command=[sys.executable, "-c", code]
    )


def test_ready_when_health_says_so_and_the_log_reads_back(tmp_path: Path) -> None:
    worker = _child(tmp_path, FAKE_WORKER).start()
    try:
        body = worker.wait_ready(timeout=30)
        assert body["assigned_partitions"] == [["t", 0]] and worker.alive()
        assert worker.metrics() == "moderation_events_total 3"
        assert worker.get("/metrics") == "moderation_events_total 3"
        assert worker.http_get("/nope") == (404, b"{}")
        assert [r["msg"] for r in worker.log_records()] == ["worker starting"]
        assert worker.plain_log_lines() == ["ZERO-SHOT: no LoRA weights"]
    finally:
        rc = worker.stop(timeout=5)
    assert rc == -signal.SIGTERM and not worker.alive()
    assert worker.stop() == rc, "stop is idempotent"


def test_a_worker_that_exits_is_an_error_quoting_its_log(tmp_path: Path) -> None:
    worker = _child(tmp_path, "print('model file is corrupt'); raise SystemExit(3)").start()
    assert worker.wait(timeout=30) == 3
    with pytest.raises(WorkerExited, match="status 3(.|\\n)*model file is corrupt") as exc:
        worker.wait_ready(timeout=30)
    assert exc.value.returncode == 3 and isinstance(exc.value, RuntimeError)


def test_a_silent_worker_times_out_with_the_last_health(tmp_path: Path) -> None:
    worker = _child(tmp_path, "import time; print('loading'); time.sleep(60)").start()
    polls = []
    try:
        with pytest.raises(WorkerNotReady, match="not ready after 0.5 s(.|\\n)*loading") as exc:
            worker.wait_ready(timeout=0.5, on_poll=lambda: polls.append(1))
    finally:
        worker.stop(timeout=5)
    assert exc.value.last_health is None and isinstance(exc.value, TimeoutError) and polls


def test_worker_environment_replaces_the_parents_moderation_variables() -> None:
    base = {"PATH": "/bin", "MODERATION_CONFIG_FILE": "prod.toml", "MODERATION_BATCH_SIZE": "99"}
    env = worker_environment(Settings(batch_size=4, web_port=1234), base)
    assert env["PATH"] == "/bin" and "MODERATION_CONFIG_FILE" not in env
    assert env["MODERATION_BATCH_SIZE"] == "4" and env["MODERATION_WEB_PORT"] == "1234"
    assert env["PYTHONUNBUFFERED"] == "1"

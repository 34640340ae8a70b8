"""The whole demo: broker, topics, worker, stream, summary; everything started here is stopped
here, in order, even on Ctrl-C or `kill`."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from adapters.kafka_admin import create_topics, normalize_broker_url
from adapters.tansu import TansuBroker, free_port
from moderation_worker.tools.demo.config import DemoConfig, DemoError, demo_settings
from moderation_worker.tools.demo.inputs import load_demo_input
from moderation_worker.tools.demo.live_change import AppliedChange, apply_live_change
from moderation_worker.tools.demo.progress import Console, wait_for_worker
from moderation_worker.tools.demo.stream import stream_events
from moderation_worker.tools.demo.summary import DemoReport, build_report, write_verdicts
from moderation_worker.tools.demo.table import render_table
from moderation_worker.tools.worker_process import (
    WorkerProcess,
    WorkerProcessError,
    worker_environment,
)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while shutting down, so a second Ctrl-C cannot orphan a child."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_quietly(stop: Callable[[], Any]) -> None:
    with signals_deferred():
        stop()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM takes the Ctrl-C path, so `kill PID` also stops the worker and broker."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(config: DemoConfig, console: Console | None = None) -> DemoReport:
    """Broker, topics, worker, stream, summary; everything started here is stopped here."""
    console = console or Console(config.progress)
    demo_input = load_demo_input(
        config.input_file, config.ethos, config.limit, config.with_bad_events
    )
    if config.rate is not None and config.rate <= 0:
        raise ValueError(f"--rate must be positive, got {config.rate}")
    console.say(f"input: {demo_input.description}")
    log_path = config.out.parent / "worker.log"
    with _sigterm_as_interrupt(), contextlib.ExitStack() as stack:
        embedded = config.broker is None
        if embedded:
            console.say("starting the embedded Kafka-protocol broker (Tansu, in-memory)…")
            tansu = TansuBroker()
            stack.callback(_stop_quietly, tansu.stop)
            tansu.start()
            broker_url = tansu.url
            broker_text = f"embedded Tansu at {tansu.bootstrap} (in-memory, stopped on exit)"
        else:
            broker_url = normalize_broker_url(config.broker)  # type: ignore[arg-type]
            broker_text = broker_url
        console.say(f"broker: {broker_text}")
        settings = demo_settings(config, broker_url, embedded, free_port())
        stack.callback(
            shutil.rmtree,
            Path(tempfile.gettempdir()) / "moderation-worker" / settings.app_id,
            ignore_errors=True,
        )
        topics = (settings.input_topic, settings.verdict_topic, settings.dlq_topic)
        asyncio.run(create_topics(settings, topics))
        console.say(
            f"topics: {settings.input_topic}, {settings.verdict_topic}, {settings.dlq_topic} "
            f"({settings.input_partitions} partitions); control topic {settings.control_topic}"
        )

        worker = WorkerProcess(
            worker_environment(settings), log_path, settings.web_port, own_session=True
        )
        stack.callback(_stop_quietly, worker.stop)
        worker.start()
        pid = worker.proc.pid if worker.proc else None
        console.say(f"worker: moderation-worker worker (pid {pid}, log {log_path})")
        started = time.monotonic()
        health = wait_for_worker(worker, config.ready_timeout_s, console, config.model)
        for line in worker.plain_log_lines():
            if "ZERO-SHOT" in line:
                console.say(f"worker says: {line.strip()}")
        policy = health.get("policy") or {}
        classifiers = ", ".join(
            f"{name} ({c['mode']}, threshold {c['threshold']['value']:.3f})"
            for name, c in (policy.get("classifiers") or {}).items()
        )
        console.say(
            f"worker ready in {time.monotonic() - started:.1f} s: model "
            f"{health['model']['base_model']}, classifiers {classifiers or '?'}, control "
            f"version {policy.get('version')}, partitions {health['assigned_partitions']}"
        )

        applied: list[AppliedChange] = []
        change = config.live_change

        async def midway(after_events: int) -> None:
            assert change is not None
            applied.append(
                await apply_live_change(
                    settings, change, worker, after_events=after_events, console=console
                )
            )

        live = change is not None and len(demo_input.events) >= 2
        result = asyncio.run(
            stream_events(
                settings,
                demo_input,
                rate=config.rate,
                timeout_s=config.stream_timeout(len(demo_input.events)),
                console=console,
                check_worker=worker.check_alive,
                midway=midway if live else None,
            )
        )
        metrics_text = worker.metrics()
        ready_health = health
        latest = worker.health()
        if latest is not None and latest[1].get("model"):
            health = latest[1]
        console.say("stopping the worker and the broker…")
    report = build_report(
        demo_input,
        result,
        health=health,
        ready_health=ready_health,
        live_change=applied[0] if applied else None,
        metrics_text=metrics_text,
        config=config,
        broker=broker_text,
        embedded=embedded,
        worker_log=log_path,
    )
    write_verdicts(config.out, demo_input, result)
    (config.out.parent / "summary.json").write_bytes(
        orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2)
    )
    return report


def run_demo_command(config: DemoConfig) -> int:
    """The `demo` subcommand: 0 when every event is accounted for, 1 when not, 130 on Ctrl-C."""
    console = Console(config.progress)
    started = time.monotonic()
    try:
        report = run_demo(config, console)
    except KeyboardInterrupt:
        console.say("interrupted; the worker and the broker are stopped")
        return 130
    except (DemoError, WorkerProcessError) as exc:  # a dead worker is a message, not a trace
        console.say(f"error: {exc}")
        return 1
    sys.stdout.write(render_table(report) + "\n")
    sys.stdout.flush()
    console.say(f"done in {time.monotonic() - started:.1f} s")
    if not report.complete:
        console.say(f"{report.missing} event(s) were not accounted for; see {report.worker_log}")
        return 1
    return 0

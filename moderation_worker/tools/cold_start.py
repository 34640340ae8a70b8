"""`moderation-worker cold-start`: how long a new worker replica takes to be useful, by phase.

Autoscaling and rebalances start workers all the time; what they wait for is process start →
`/health` ready → first verdict. This starts the real worker process (`moderation-worker
worker`, as a deployment does) against a broker, with one comment already waiting, and times
every phase (`cold_start_report.PHASES`), for several starts on the same machine:

1. `before`: the way the worker started before the cold-start work: the conversion read
   from Keras' h5 file (`MODERATION_FLAT_WEIGHTS=off`) and no persistent compile cache;
2. `first start`: today's worker with an empty compile cache folder (it compiles and fills it);
3. `second start`: the same again; compiled shapes come from the cache.

Each start gets fresh topics and a fresh consumer group. The compile cache folder is a fresh
temporary one unless `--compile-cache DIR` names one (then it is used as it is).

Example:
    moderation-worker cold-start --model gemma3-270m --out runs/cold-start.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from moderation_worker.model import compile_cache
from moderation_worker.settings import Settings, load_settings
from moderation_worker.tools.cold_start_report import (
    ColdStartReport,
    StartRun,
    phases_from_log,
    render,
)

#: Short group timings for the embedded broker (Tansu makes every join wait ~half the session
#: timeout; see tests/fixtures_broker.py); a real Kafka needs at least 6 s sessions.
EMBEDDED_TIMING = {
    "session_timeout_s": 3.0,
    "heartbeat_interval_s": 0.5,
    "rebalance_timeout_s": 3.0,
}
KAFKA_TIMING = {"session_timeout_s": 6.0, "heartbeat_interval_s": 1.0, "rebalance_timeout_s": 6.0}
WAITING_COMMENT = {"id": "cold-start-0", "text": "Thanks for the video, very helpful!"}


@dataclass(frozen=True)
class Start:
    """One start to measure: its column label, compile cache setting and extra environment."""

    label: str
    compile_cache_dir: str | Path
    env: tuple[tuple[str, str], ...] = ()


def default_starts(cache_dir: Path, before: bool = True) -> list[Start]:
    """before (h5, no cache), first start (empty cache), second start (same cache)."""
    starts = [
        Start("before: h5 weights, no compile cache", "off", (("MODERATION_FLAT_WEIGHTS", "off"),))
    ]
    starts = starts if before else []
    starts += [
        Start("first start: empty compile cache", cache_dir),
        Start("second start: same machine, same cache", cache_dir),
    ]
    return starts


def _clean_env(env: dict[str, str]) -> dict[str, str]:
    """The parent's own persistent-cache settings would override each start's: drop them."""
    env = {k: v for k, v in env.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    flags = [f for f in env.get("TF_XLA_FLAGS", "").split() if compile_cache.TF_FLAG not in f]
    env["TF_XLA_FLAGS"] = " ".join(flags)
    return env


def start_settings(base: Settings, broker_url: str, embedded: bool, start: Start) -> Settings:
    """`base` on fresh topics and a fresh group of this broker, with `start`'s cache setting."""
    from adapters.tansu import free_port

    tag = uuid.uuid4().hex[:8]
    speed = base.speed.model_copy(update={"compile_cache_dir": start.compile_cache_dir})
    return base.model_copy(
        update={
            "broker_url": broker_url,
            "app_id": f"{base.app_id}-coldstart-{tag}",
            "input_topic": f"{base.input_topic}-coldstart-{tag}",
            "verdict_topic": f"{base.verdict_topic}-coldstart-{tag}",
            "dlq_topic": f"{base.dlq_topic}-coldstart-{tag}",
            "control_topic": f"{base.control_topic or 'moderation.control'}-coldstart-{tag}",
            "web_port": free_port(),
            "metrics_port": None,
            "log_level": "INFO",
            "speed": speed,
            "topic_replication_factor": 1 if embedded else base.topic_replication_factor,
            **(EMBEDDED_TIMING if embedded else KAFKA_TIMING),
        }
    )


async def _prepare_topics(settings: Settings) -> None:
    from adapters.kafka_admin import create_topics, kafka_producer

    topics = [settings.input_topic, settings.verdict_topic, settings.dlq_topic]
    await create_topics(settings, topics)
    producer = kafka_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(settings.input_topic, orjson.dumps(WAITING_COMMENT))
    finally:
        await producer.stop()


async def _first_verdict_at(settings: Settings, timeout: float) -> float | None:
    """Broker timestamp (epoch s) of the first record on the verdict or dead-letter topic."""
    from adapters.kafka_admin import kafka_consumer

    consumer = kafka_consumer(
        settings,
        settings.verdict_topic,
        settings.dlq_topic,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            stamps = [m.timestamp for records in batch.values() for m in records]
            if stamps:
                return min(stamps) / 1000.0
    finally:
        await consumer.stop()
    return None


def measure_start(
    settings: Settings, start: Start, log_path: Path, timeout: float = 900.0
) -> StartRun:
    """Start the worker once, poll `/health` every 50 ms until ready, wait for its verdict."""
    from moderation_worker.tools.worker_process import WorkerProcess, worker_environment

    folder = compile_cache.resolve(start.compile_cache_dir)
    run = StartRun(start.label, compile_cache="off" if folder is None else str(folder))
    asyncio.run(_prepare_topics(settings))
    env = _clean_env(worker_environment(settings)) | dict(start.env)
    worker = WorkerProcess(env, log_path, settings.web_port, own_session=True)
    spawned = time.time()
    worker.start()
    ready = verdict = None
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            worker.check_alive()
            health = worker.health()
            now = time.time()
            if health is not None and run.health_up_s is None:
                run.health_up_s = round(now - spawned, 3)
            body = health[1] if health else {}
            if health and health[0] == 200 and body.get("assigned_partitions"):
                ready = now
                run.cpu["ready"] = _cpu_seconds(worker.proc.pid if worker.proc else None)
                break
            time.sleep(0.05)
        else:
            raise TimeoutError(f"not ready after {timeout:g} s; see {log_path}")
        verdict = asyncio.run(_first_verdict_at(settings, timeout=120.0))
        run.rss_mib = _memory_mib(worker.proc.pid if worker.proc else None)
    except Exception as exc:  # keep the other starts; the table says which one failed
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        worker.stop()
    phases_from_log(run, worker.log_records(), spawned, ready, verdict)
    run.cache_files_after = compile_cache.cached_files(start.compile_cache_dir)
    return run


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds a running process has used (Linux `/proc`), else None."""
    with contextlib.suppress(OSError, ValueError, IndexError, TypeError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)
    return None


def _memory_mib(pid: int | None) -> dict[str, float | None]:
    """The process's resident memory now and at its peak (Linux `/proc`), in MiB."""
    out: dict[str, float | None] = {"verdict": None, "peak": None}
    with contextlib.suppress(OSError, ValueError, TypeError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            key = {"VmRSS": "verdict", "VmHWM": "peak"}.get(name)
            if key:
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def _backend() -> str:
    return os.environ.get("KERAS_BACKEND") or _keras_json_backend() or "tensorflow"


def _keras_json_backend() -> str | None:
    path = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "keras.json"
    with contextlib.suppress(OSError, ValueError):
        return orjson.loads(path.read_bytes()).get("backend")
    return None


def _load() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return float(Path("/proc/loadavg").read_text().split()[0])
    return None


def _machine() -> str:
    cpu = "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores"


def measure_cold_start(
    base: Settings,
    *,
    model: str | None = None,
    broker_url: str | None = None,
    compile_dir: Path | None = None,
    before: bool = True,
    out_dir: Path | None = None,
    timeout: float = 900.0,
    command: str = "moderation-worker cold-start",
    embedded: bool | None = None,
) -> ColdStartReport:
    """Every start of `default_starts`, on the embedded Tansu broker unless `broker_url`
    (`embedded`: whether that broker is a Tansu too, for its short group timings)."""
    from adapters.tansu import TansuBroker

    if model is not None:
        base = base.model_copy(update={"model": model})
    logs = Path(out_dir or tempfile.mkdtemp(prefix="moderation-worker-coldstart-"))
    logs.mkdir(parents=True, exist_ok=True)
    own_cache = compile_dir is None
    folder = Path(tempfile.mkdtemp(prefix="compile-cache-")) if own_cache else compile_dir
    report = ColdStartReport(
        base.model, command, _machine(), _backend(), cores=os.cpu_count() or 0, load=_load()
    )
    with contextlib.ExitStack() as stack:
        if own_cache:
            stack.callback(shutil.rmtree, folder, ignore_errors=True)
        embedded = broker_url is None if embedded is None else embedded
        if broker_url is None:
            broker_url = stack.enter_context(TansuBroker()).url
        for i, start in enumerate(default_starts(folder, before)):
            settings = start_settings(base, broker_url, embedded, start)
            print(f"cold-start: {start.label} …", file=sys.stderr, flush=True)
            run = measure_start(settings, start, logs / f"worker-{i + 1}.log", timeout)
            if own_cache:
                run.compile_cache = "off" if start.compile_cache_dir == "off" else "temp folder"
            report.starts.append(run)
            print(
                f"cold-start: {start.label}: ready in {run.phases.get('ready')} s"
                + (f" ({run.error})" if run.error else ""),
                file=sys.stderr,
                flush=True,
            )
    report.note = f"Worker logs: `{logs}`."
    return report


# --------------------------------------------------------------------------- CLI
def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cold-start", help="time a worker's start: imports, load, compile, join")
    p.add_argument("--model", default=None, help="model source (default: the settings')")
    p.add_argument("--config", default=None, help="TOML settings file the worker starts with")
    p.add_argument("--broker", default=None, help="a real broker instead of embedded Tansu")
    p.add_argument("--compile-cache", default=None, help="cache folder (default: a temp one)")
    p.add_argument("--no-before", action="store_true", help="skip the 'before' start")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    p.add_argument("--json", default=None, help="also write the figures as JSON")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per start")
    p.set_defaults(func=cmd_cold_start)


def cmd_cold_start(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    from adapters.kafka_admin import normalize_broker_url

    base = load_settings(args.config)
    command = "moderation-worker " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = measure_cold_start(
        base,
        model=args.model,
        broker_url=normalize_broker_url(args.broker) if args.broker else None,
        compile_dir=Path(args.compile_cache) if args.compile_cache else None,
        before=not args.no_before,
        out_dir=Path(args.out).parent / "cold-start-logs" if args.out else None,
        timeout=args.timeout,
        command=command,
    )
    text = "\n".join(render(report)) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2))
    return 1 if any(s.error for s in report.starts) else 0

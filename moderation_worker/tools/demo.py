"""`moderation-worker demo`: the whole pipeline on a laptop, ending with a summary table.

A newcomer has no Kafka cluster, no GPU and no Kaggle account, so the demo brings its own
broker (embedded Tansu, in-memory) and runs the *production* worker (`moderation-worker worker`
as a subprocess, configured only through `MODERATION_*` variables) against it. It then does
what a platform team's services would do: produce comments keyed by id, read the verdict and
dead-letter topics, and account for every event.

Events are matched to outcomes by the input's (partition, offset), which every verdict and dead
letter carries, not by id: an injected invalid-JSON event has no id, a user's file may repeat
ids, and an at-least-once redelivery shows up as a second outcome for the same position.

Everything heavy (aiokafka, tqdm, sklearn) is imported inside functions, so importing this
module costs nothing to the rest of the command line, and the demo process itself never imports
Keras: the model lives only in the worker.

Example:
    config = DemoConfig(model="tiny", out=Path("runs/demo/verdicts.jsonl"))
    report = run_demo(config)
    print(render_table(report))
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from adapters.tansu import TansuBroker, free_port
from moderation_worker.events import EMPTY_TEXT, INVALID_JSON
from moderation_worker.settings import DEFAULT_LORA, DEFAULT_MODEL, Settings, load_settings

SAMPLE_COMMENTS = Path(__file__).resolve().parent.parent / "assets" / "sample_comments.jsonl"
DEFAULT_OUT = Path("runs/demo/verdicts.jsonl")

#: Consumer-group timing for the demo's worker. Tansu 0.6.0 makes every join wait about half
#: the session timeout, so the embedded broker gets short values (as in tests/fixtures_broker);
#: Apache Kafka refuses session timeouts under its group.min.session.timeout.ms (6 s).
EMBEDDED_GROUP_TIMING = {
    "session_timeout_s": 3.0,
    "heartbeat_interval_s": 0.5,
    "rebalance_timeout_s": 3.0,
}
EXTERNAL_GROUP_TIMING = {
    "session_timeout_s": 6.0,
    "heartbeat_interval_s": 1.0,
    "rebalance_timeout_s": 6.0,
}
#: Faust hard-codes its worker consumer's fetch.max.wait; Tansu answers a waiting fetch only
#: when that wait runs out, so on the embedded broker an idle worker sees new records late.
FAUST_FETCH_MAX_WAIT_S = 1.5


class DemoError(RuntimeError):
    """The demo cannot go on (worker died, broker unreachable); the message says why."""


# ---------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoEvent:
    """One record the demo produces. `expected_reason` is set for deliberately bad events."""

    key: bytes
    value: bytes
    id: str | None
    label: int | None = None
    expected_reason: str | None = None


@dataclass(frozen=True)
class DemoInput:
    """The events to produce and a one-line description of where they came from."""

    events: tuple[DemoEvent, ...]
    description: str

    @property
    def comments(self) -> int:
        return sum(e.expected_reason is None for e in self.events)

    @property
    def labelled(self) -> bool:
        return any(e.label is not None for e in self.events)


def bad_events() -> tuple[DemoEvent, ...]:
    """Hostile records a real topic will see sooner or later, so the DLQ path shows up."""
    return (
        DemoEvent(
            b"bad-json",
            b'{"id": "bad-json", "text": "this record was cut off in the mid',
            None,
            expected_reason=INVALID_JSON,
        ),
        DemoEvent(
            b"bad-empty",
            orjson.dumps({"id": "bad-empty", "text": "   "}),
            "bad-empty",
            expected_reason=EMPTY_TEXT,
        ),
    )


def _comment_event(event_id: str, text: str, label: int | None) -> DemoEvent:
    body: dict[str, Any] = {"id": event_id, "text": text}
    if label is not None:
        body["label"] = label  # passes through into the verdict's `meta`, next to the score
    return DemoEvent(event_id.encode("utf-8"), orjson.dumps(body), event_id, label)


def load_demo_input(
    input_file: str | Path | None = None,
    ethos: str | Path | None = None,
    limit: int | None = None,
    with_bad_events: bool = True,
) -> DemoInput:
    """Comments from a CSV/JSONL file, the ETHOS test split, or the built-in samples.

    `limit` counts comments; the bad events (when wanted) are spread through the stream, at a
    third and two thirds of the way, so they arrive inside batches rather than alone.
    """
    from moderation_worker.tools.data import DataError, ethos_splits, load_ethos, load_labelled_file

    if input_file is not None and ethos is not None:
        raise ValueError("give --input or --ethos, not both")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    if ethos is not None:
        test = ethos_splits(load_ethos(ethos)).test
        texts, labels = test.texts, [int(x) for x in test.labels]
        ids: tuple[str | None, ...] = tuple(f"ethos-test-{i:03d}" for i in range(len(texts)))
        description = f"ETHOS test split ({ethos})"
    else:
        path = Path(input_file) if input_file is not None else SAMPLE_COMMENTS
        if not path.is_file():
            raise DataError(f"input file {path} does not exist")
        texts, label_array, ids = load_labelled_file(path)
        labels = [int(x) for x in label_array] if label_array is not None else [None] * len(texts)
        description = "built-in sample comments" if input_file is None else str(path)
    n = len(texts) if limit is None else min(limit, len(texts))
    comments = [_comment_event(ids[i] or f"demo-{i:05d}", texts[i], labels[i]) for i in range(n)]
    description += f", {n} comments" + (" (labelled)" if labels[0] is not None else "")
    if with_bad_events:
        bad = bad_events()
        for position, event in zip((2 * n // 3, n // 3), reversed(bad), strict=True):
            comments.insert(position, event)
        description += f" + {len(bad)} bad events"
    return DemoInput(tuple(comments), description)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """What `moderation-worker demo` was asked to do (the command line, as a value)."""

    input_file: Path | None = None
    ethos: Path | None = None
    limit: int | None = None
    rate: float | None = None
    with_bad_events: bool = True
    broker: str | None = None
    model: str = DEFAULT_MODEL
    lora: str | None = DEFAULT_LORA
    batch_size: int = 8
    max_wait_ms: int = 200
    out: Path = DEFAULT_OUT
    timeout_s: float | None = None
    ready_timeout_s: float = 1200.0
    config_file: str | None = None
    progress: bool | None = None  # None: bars when stderr is a terminal

    def stream_timeout(self, n_events: int) -> float:
        """Seconds from the first produced event until all must be accounted for.

        Generous by default (Gemma 3 270M on a busy laptop CPU scores a few comments a
        second, and a paced stream takes n/rate anyway): it exists to end a stuck demo with
        a message, not to race a slow one.
        """
        if self.timeout_s is not None:
            return self.timeout_s
        paced = n_events / self.rate if self.rate else 0.0
        return 60.0 + 2.0 * n_events + paced


def normalize_broker_url(url: str) -> str:
    """`host:9092` or `kafka://host:9092` (`;`-separated for several) -> Faust's spelling."""
    parts = [u.strip() for u in url.replace(",", ";").split(";") if u.strip()]
    if not parts:
        raise ValueError("--broker needs a URL such as kafka://localhost:9092")
    return ";".join(u if "://" in u else f"kafka://{u}" for u in parts)


def bootstrap_servers(broker_url: str) -> str:
    """Faust broker URL -> aiokafka bootstrap servers (`host:port,host:port`)."""
    return ",".join(u.split("://", 1)[-1] for u in broker_url.split(";"))


def demo_settings(config: DemoConfig, broker_url: str, embedded: bool, web_port: int) -> Settings:
    """The worker's settings: the user's (environment, config file) with the demo's choices.

    On the embedded broker the topic names are the configured ones (the broker is fresh).
    On a real broker they get a per-run suffix, and the consumer group always does, so a demo
    never joins a production group or mixes its records with a real pipeline's.
    """
    base = load_settings(config.config_file)
    tag = uuid.uuid4().hex[:8]
    suffix = "" if embedded else f"-demo-{tag}"
    timing = EMBEDDED_GROUP_TIMING if embedded else EXTERNAL_GROUP_TIMING
    return base.model_copy(
        update={
            "broker_url": broker_url,
            "app_id": f"{base.app_id}-demo-{tag}",
            "input_topic": base.input_topic + suffix,
            "verdict_topic": base.verdict_topic + suffix,
            "dlq_topic": base.dlq_topic + suffix,
            "model": config.model,
            "lora_weights": config.lora,
            "batch_size": config.batch_size,
            "max_wait_ms": config.max_wait_ms,
            "web_port": web_port,
            "metrics_port": None,
            # One embedded broker holds one replica; a real cluster keeps the configured factor.
            "topic_replication_factor": 1 if embedded else base.topic_replication_factor,
            "log_level": "INFO",
            **timing,
        }
    )


def worker_environment(settings: Settings) -> dict[str, str]:
    """The environment of the worker subprocess: every setting spelled out as `MODERATION_*`.

    The parent's own `MODERATION_*` variables and config file are left out, so the worker runs
    with exactly the settings the demo chose and reports.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATION_")}
    for name, value in settings.public_dict().items():
        if value is not None:
            env[f"MODERATION_{name.upper()}"] = str(value)
    if settings.sasl_password is not None:  # masked in public_dict; the child needs the value
        env["MODERATION_SASL_PASSWORD"] = settings.sasl_password.get_secret_value()
    if settings.lora_weights is None:
        env["MODERATION_LORA_WEIGHTS"] = "none"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


# ---------------------------------------------------------------------------------------------
# Status output
# ---------------------------------------------------------------------------------------------


class Console:
    """Status lines and tqdm bars on stderr; stdout is kept for the summary table."""

    def __init__(self, progress: bool | None = None) -> None:
        self.progress = sys.stderr.isatty() if progress is None else progress

    def say(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"demo: {message}", file=sys.stderr)

    def bar(self, **kwargs: Any) -> Any:
        from tqdm import tqdm

        return tqdm(file=sys.stderr, disable=not self.progress, dynamic_ncols=True, **kwargs)


# ---------------------------------------------------------------------------------------------
# The worker subprocess
# ---------------------------------------------------------------------------------------------


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


class WorkerProcess:
    """`moderation-worker worker` as a child process, its log in a file, stopped cleanly.

    The child gets its own session, so a Ctrl-C in the terminal reaches only the demo, which
    then stops the worker in order (SIGTERM, wait, SIGKILL) before it stops the broker.
    """

    def __init__(self, env: dict[str, str], web_port: int, log_path: Path) -> None:
        self.env = env
        self.web_port = web_port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "moderation_worker.cli", "worker"]

    def start(self) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Raise `DemoError` with the log tail if the worker has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoError(
                f"the worker exited with status {self.proc.returncode}; "
                f"its log ({self.log_path}) ends with:\n{self.log_tail()}"
            )

    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes] | None:
        url = f"http://127.0.0.1:{self.web_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return None

    def health(self) -> tuple[int, dict[str, Any]] | None:
        """(HTTP status, body) of `/health`, or None while the web server is not up."""
        got = self._get("/health", timeout=1.0)
        if got is None:
            return None
        try:
            return got[0], orjson.loads(got[1] or b"{}")
        except orjson.JSONDecodeError:
            return None

    def metrics(self) -> str | None:
        """The worker's Prometheus page, or None if it cannot be read."""
        got = self._get("/metrics")
        return got[1].decode("utf-8", errors="replace") if got and got[0] == 200 else None

    def log_records(self) -> list[dict[str, Any]]:
        """The worker's JSON log lines (other lines, e.g. the zero-shot notice, skipped)."""
        records = []
        for line in self._log_lines():
            if line.startswith("{"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    records.append(orjson.loads(line))
        return records

    def _log_lines(self) -> list[str]:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return []
        return data.decode("utf-8", errors="replace").splitlines()

    def plain_log_lines(self) -> list[str]:
        """Log lines that are not JSON: notices printed before logging is configured."""
        return [ln for ln in self._log_lines() if ln.strip() and not ln.startswith("{")]

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self._log_lines()[-lines:])

    def wait_ready(self, timeout: float, console: Console, model: str) -> dict[str, Any]:
        """Block until `/health` is ready with partitions assigned; show which step is slow.

        The worker loads its model before it starts Faust, so `/health` answers only after
        the model is in memory; the log says when loading starts and ends.
        """
        phases = {
            "start": "starting the worker process",
            "load": f"loading model {model}…",
            "join": "model loaded; joining the consumer group…",
        }
        phase = "start"
        console.say(phases[phase])
        spinner = console.bar(total=None, desc=phases[phase], bar_format="{desc} [{elapsed}]")
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.check_alive()
                messages = {r.get("msg") for r in self.log_records()}
                new = "join" if "model loaded" in messages else phase
                if new == "start" and "worker starting" in messages:
                    new = "load"
                if new != phase:
                    phase = new
                    spinner.set_description_str(phases[phase])
                    console.say(phases[phase])
                health = self.health()
                if health is not None and health[0] == 200:
                    body = health[1]
                    if body.get("assigned_partitions") and not body.get("rebalancing"):
                        return body
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"the worker was not ready after {timeout:.0f} s ({phases[phase]}); "
                        f"last /health {health}; log ({self.log_path}):\n{self.log_tail()}"
                    )
                spinner.refresh()
                time.sleep(0.2)
        finally:
            spinner.close()

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


# ---------------------------------------------------------------------------------------------
# Producing and reading back
# ---------------------------------------------------------------------------------------------


Position = tuple[int, int]  # (partition, offset) of an input record


@dataclass
class Outcome:
    """The first verdict or dead letter read for one input record."""

    kind: str  # "verdict" | "dead_letter"
    value: dict[str, Any]
    received_at: float


@dataclass
class StreamResult:
    """What happened to every produced event (indexes follow `DemoInput.events`)."""

    sent_at: dict[int, float] = field(default_factory=dict)
    positions: dict[int, Position] = field(default_factory=dict)
    outcomes: dict[Position, Outcome] = field(default_factory=dict)
    duplicates: int = 0
    timed_out: bool = False

    def outcome(self, index: int) -> Outcome | None:
        position = self.positions.get(index)
        return None if position is None else self.outcomes.get(position)

    def missing(self, n_events: int) -> list[int]:
        return [i for i in range(n_events) if self.outcome(i) is None]


async def create_topics(bootstrap: str, settings: Settings) -> None:
    """Input, verdict and dead-letter topics; ones that already exist are left as they are."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    names = (settings.input_topic, settings.verdict_topic, settings.dlq_topic)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(n, settings.input_partitions, settings.topic_replication_factor)
            for n in names
            if n not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
    finally:
        await admin.close()


async def stream_events(
    bootstrap: str,
    settings: Settings,
    demo_input: DemoInput,
    *,
    rate: float | None,
    timeout_s: float,
    console: Console,
    check_worker: Callable[[], None] = lambda: None,
) -> StreamResult:
    """Produce every event and read outcomes until each one has one, or `timeout_s` passes.

    The reader assigns all partitions of both output topics and seeks to the beginning before
    the first event is sent: Tansu 0.6.0 answers ListOffsets LATEST wrongly, so "latest" could
    skip outcomes, and on the fresh (or per-run) topics the beginning is exactly where ours start.
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    events = demo_input.events
    result = StreamResult()
    index_of: dict[Position, int] = {}
    settled: set[int] = set()
    counts: Counter[str] = Counter()

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=20,  # our own wait must not count as pipeline latency
        metadata_max_age_ms=1000,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    await consumer.start()
    await producer.start()
    produce_bar = console.bar(total=len(events), desc="producing", unit="ev", position=0)
    outcome_bar = console.bar(
        total=len(events), desc="verdicts+dead letters", unit="ev", position=1
    )
    try:
        await consumer.topics()  # metadata for every topic, so partitions_for_topic answers
        partitions = []
        for topic in (settings.verdict_topic, settings.dlq_topic):
            ids = consumer.partitions_for_topic(topic)
            if not ids:
                raise DemoError(f"topic {topic!r} does not exist on the broker")
            partitions += [TopicPartition(topic, p) for p in sorted(ids)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)

        def settle(index: int) -> None:
            if index not in settled and result.outcome(index) is not None:
                settled.add(index)
                outcome_bar.update(1)

        def placed(index: int, future: asyncio.Future[Any]) -> None:
            if future.cancelled() or future.exception() is not None:
                return
            metadata = future.result()
            position = (metadata.partition, metadata.offset)
            result.positions[index] = position
            index_of[position] = index
            produce_bar.update(1)
            settle(index)

        async def produce() -> None:
            started = time.monotonic()
            pending = []
            for i, event in enumerate(events):
                if rate:
                    delay = started + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                result.sent_at[i] = time.time()
                future = await producer.send(settings.input_topic, event.value, key=event.key)
                future.add_done_callback(lambda f, i=i: placed(i, f))
                pending.append(future)
            await asyncio.gather(*pending)

        console.say(
            f"producing {len(events)} events to {settings.input_topic!r}"
            + (f" at {rate:g}/s" if rate else "")
            + f"; reading {settings.verdict_topic!r} and {settings.dlq_topic!r}"
        )
        producing = asyncio.ensure_future(produce())
        deadline = time.monotonic() + timeout_s
        try:
            while not (producing.done() and len(settled) == len(events)):
                if producing.done() and producing.exception() is not None:
                    raise DemoError(f"producing failed: {producing.exception()!r}")
                if time.monotonic() > deadline:
                    result.timed_out = True
                    break
                check_worker()
                batch = await consumer.getmany(timeout_ms=100)
                now = time.time()
                for tp, messages in batch.items():
                    kind = "verdict" if tp.topic == settings.verdict_topic else "dead_letter"
                    for message in messages:
                        value = orjson.loads(message.value)
                        source = value.get("source") or {}
                        if source.get("topic") != settings.input_topic:
                            continue
                        position = (int(source["partition"]), int(source["offset"]))
                        if position in result.outcomes:
                            result.duplicates += 1
                            continue
                        result.outcomes[position] = Outcome(kind, value, now)
                        counts[kind] += 1
                        if position in index_of:
                            settle(index_of[position])
                outcome_bar.set_postfix(
                    verdicts=counts["verdict"], dead_letters=counts["dead_letter"], refresh=False
                )
        finally:
            if not producing.done():
                producing.cancel()
            await asyncio.gather(producing, return_exceptions=True)
    finally:
        produce_bar.close()
        outcome_bar.close()
        await producer.stop()
        await consumer.stop()
    return result


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


@dataclass
class DemoReport:
    """The demo's figures; `render_table` prints them, `summary.json` stores them."""

    input: str
    broker: str
    model: str
    base_model: str | None
    lora_sha256: str | None
    threshold: float | None
    events: int
    verdicts: int
    dead_letters: dict[str, int]
    expected_dead_letters: dict[str, int]
    duplicates: int
    missing: int
    missing_ids: list[str]
    timed_out: bool
    events_per_s: float | None
    window_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    batch_fill_ratio: float | None
    batch_fill_source: str
    model_batches: int | None
    hateful: int
    hateful_rate: float | None
    labelled: int
    f1: float | None
    roc_auc: float | None
    verdicts_file: str
    worker_log: str
    notes: list[str] = field(default_factory=list)

    @property
    def accounted(self) -> int:
        return self.verdicts + sum(self.dead_letters.values())

    @property
    def complete(self) -> bool:
        return self.missing == 0 and self.accounted == self.events

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accounted": self.accounted, "complete": self.complete}


def model_description(
    health_model: dict[str, Any] | None, model: str, lora: str | None
) -> tuple[str, str | None, str | None]:
    """(text, base model, LoRA sha) for the summary, saying plainly when it is zero-shot.

    The worker's `/health` reports what it actually loaded. With `--lora default` and no
    sha, `shipped_lora(model)` found nothing (the worker also printed a ZERO-SHOT notice).
    """
    base = (health_model or {}).get("base_model") or model
    sha = (health_model or {}).get("lora_sha256")
    if sha:
        source = "shipped" if lora == DEFAULT_LORA else str(lora)
        return f"{base} + LoRA sha256 {sha[:12]} ({source})", base, sha
    if lora is None or str(lora).lower() in ("none", ""):
        return f"{base}, zero-shot (--lora none)", base, None
    if lora == DEFAULT_LORA:
        return f"{base}, zero-shot (no shipped LoRA weights)", base, None
    return f"{base}, zero-shot", base, None


def batch_fill_from_metrics(text: str | None) -> tuple[float | None, int | None]:
    """Mean batch fill ratio and number of model batches from the worker's `/metrics` page.

    `moderation_batch_fill_ratio` is observed once per batch that called the model (real rows
    over the fixed batch size), so sum/count is the mean fill over those batches.
    """
    if not text:
        return None, None
    from prometheus_client.parser import text_string_to_metric_families

    total = count = None
    for family in text_string_to_metric_families(text):
        if family.name != "moderation_batch_fill_ratio":
            continue
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
    if not count:
        return None, 0
    return float(total or 0.0) / float(count), int(count)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def build_report(
    demo_input: DemoInput,
    result: StreamResult,
    *,
    health: dict[str, Any] | None,
    metrics_text: str | None,
    config: DemoConfig,
    broker: str,
    embedded: bool,
    worker_log: Path,
) -> DemoReport:
    """Every figure of the summary from what was produced, read back and scraped."""
    events = demo_input.events
    n = len(events)
    outcomes = [(i, result.outcome(i)) for i in range(n)]
    found = [(i, o) for i, o in outcomes if o is not None]
    verdicts = [(i, o) for i, o in found if o.kind == "verdict"]
    dead = Counter(o.value.get("reason", "unknown") for _, o in found if o.kind == "dead_letter")
    expected = Counter(e.expected_reason for e in events if e.expected_reason is not None)
    missing = [i for i, o in outcomes if o is None]
    missing_ids = [events[i].id or events[i].key.decode("utf-8", "replace") for i in missing]

    latencies = [o.received_at - result.sent_at[i] for i, o in found if i in result.sent_at]
    window = None
    if found and result.sent_at:
        window = max(o.received_at for _, o in found) - min(result.sent_at.values())
    hateful = sum(bool(o.value.get("hateful")) for _, o in verdicts)

    labelled = [(events[i].label, o.value) for i, o in verdicts if events[i].label is not None]
    f1 = auc = None
    if labelled:
        from sklearn.metrics import f1_score, roc_auc_score

        y = [int(label) for label, _ in labelled]
        f1 = float(f1_score(y, [int(bool(v.get("hateful"))) for _, v in labelled], zero_division=0))
        if len(set(y)) == 2:
            auc = float(roc_auc_score(y, [float(v["p_hateful"]) for _, v in labelled]))

    fill, batches = batch_fill_from_metrics(metrics_text)
    fill_source = (
        f"worker /metrics: mean of moderation_batch_fill_ratio over {batches} model batches"
        if fill is not None
        else "not available (worker /metrics could not be read)"
    )
    description, base, sha = model_description(
        (health or {}).get("model"), config.model, config.lora
    )
    notes = []
    if embedded:
        notes.append(
            "embedded Tansu answers a waiting fetch only when the wait expires, so the idle "
            f"worker picks up new records up to {FAUST_FETCH_MAX_WAIT_S:g} s late (Faust's "
            "fixed fetch wait); Apache Kafka answers at once"
        )
    if not config.rate:
        notes.append(
            "unthrottled: all events were produced at once, so latency includes time queued "
            "behind earlier comments; use --rate N for latency at a steady load"
        )
    return DemoReport(
        input=demo_input.description,
        broker=broker,
        model=description,
        base_model=base,
        lora_sha256=sha,
        threshold=(health or {}).get("threshold"),
        events=n,
        verdicts=len(verdicts),
        dead_letters=dict(sorted(dead.items())),
        expected_dead_letters=dict(sorted(expected.items())),
        duplicates=result.duplicates,
        missing=len(missing),
        missing_ids=missing_ids[:20],
        timed_out=result.timed_out,
        events_per_s=(len(found) / window) if window else None,
        window_s=window,
        latency_p50_s=_percentile(latencies, 50),
        latency_p99_s=_percentile(latencies, 99),
        batch_fill_ratio=fill,
        batch_fill_source=fill_source,
        model_batches=batches,
        hateful=hateful,
        hateful_rate=(hateful / len(verdicts)) if verdicts else None,
        labelled=len(labelled),
        f1=f1,
        roc_auc=auc,
        verdicts_file=str(config.out),
        worker_log=str(worker_log),
        notes=notes,
    )


def _num(value: float | None, fmt: str = "{:.3f}", none: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return fmt.format(value)


def render_table(report: DemoReport) -> str:
    """The summary as an aligned two-column text table (what the newcomer reads last)."""
    dead = ", ".join(f"{reason} {n}" for reason, n in report.dead_letters.items()) or "none"
    rows: list[tuple[str, str]] = [
        ("input", report.input),
        ("broker", report.broker),
        ("model", report.model),
        ("threshold", _num(report.threshold)),
        ("events produced", str(report.events)),
        ("verdicts", str(report.verdicts)),
        ("dead letters", f"{sum(report.dead_letters.values())} ({dead})"),
        (
            "accounted for",
            f"{report.accounted}/{report.events}"
            + (f", {report.duplicates} duplicate(s) ignored" if report.duplicates else "")
            + (f", {report.missing} MISSING" if report.missing else ""),
        ),
        (
            "events/s",
            _num(report.events_per_s, "{:.1f}")
            + (f" ({report.accounted} in {report.window_s:.1f} s)" if report.window_s else ""),
        ),
        (
            "latency p50 / p99",
            f"{_num(report.latency_p50_s, '{:.2f} s')} / {_num(report.latency_p99_s, '{:.2f} s')}"
            " (produce -> outcome read)",
        ),
        (
            "batch fill",
            _num(report.batch_fill_ratio, "{:.2f}")
            + (
                f" (mean over {report.model_batches} model batches, worker /metrics)"
                if report.batch_fill_ratio is not None
                else f" ({report.batch_fill_source})"
            ),
        ),
        (
            "hateful rate",
            _num(report.hateful_rate, "{:.1%}") + f" ({report.hateful} of {report.verdicts})",
        ),
    ]
    if report.labelled:
        rows.append(
            (
                "F1 / ROC-AUC",
                f"{_num(report.f1)} / {_num(report.roc_auc)} "
                f"({report.labelled} labelled comments, at the threshold above)",
            )
        )
    else:
        rows.append(("F1 / ROC-AUC", "n/a (input has no labels)"))
    rows += [("verdicts file", report.verdicts_file), ("worker log", report.worker_log)]
    width = max(len(k) for k, _ in rows)
    title = "moderation-worker demo: summary"
    lines = [title, "=" * len(title)]
    lines += [f"{key.ljust(width)}  {value}" for key, value in rows]
    if report.missing:
        lines.append(
            f"MISSING: {report.missing} event(s) had no verdict or dead letter"
            + (" when the demo timed out" if report.timed_out else "")
            + f": {', '.join(report.missing_ids)}"
        )
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def write_verdicts(path: Path, demo_input: DemoInput, result: StreamResult) -> int:
    """One line per event that got a verdict (duplicates dropped), in the order produced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "wb") as out:
        for i in range(len(demo_input.events)):
            outcome = result.outcome(i)
            if outcome is not None and outcome.kind == "verdict":
                out.write(orjson.dumps(outcome.value) + b"\n")
                n += 1
    return n


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------


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
        bootstrap = bootstrap_servers(broker_url)
        settings = demo_settings(config, broker_url, embedded, free_port())
        stack.callback(
            shutil.rmtree,
            Path(tempfile.gettempdir()) / "moderation-worker" / settings.app_id,
            ignore_errors=True,
        )
        asyncio.run(create_topics(bootstrap, settings))
        console.say(
            f"topics: {settings.input_topic}, {settings.verdict_topic}, {settings.dlq_topic} "
            f"({settings.input_partitions} partitions)"
        )

        worker = WorkerProcess(worker_environment(settings), settings.web_port, log_path)
        stack.callback(_stop_quietly, worker.stop)
        worker.start()
        pid = worker.proc.pid if worker.proc else None
        console.say(f"worker: moderation-worker worker (pid {pid}, log {log_path})")
        started = time.monotonic()
        health = worker.wait_ready(config.ready_timeout_s, console, config.model)
        for line in worker.plain_log_lines():
            if "ZERO-SHOT" in line:
                console.say(f"worker says: {line.strip()}")
        console.say(
            f"worker ready in {time.monotonic() - started:.1f} s: model "
            f"{health['model']['base_model']}, LoRA {health['model']['lora_sha256'] or 'none'}, "
            f"threshold {health['threshold']}, partitions {health['assigned_partitions']}"
        )

        result = asyncio.run(
            stream_events(
                bootstrap,
                settings,
                demo_input,
                rate=config.rate,
                timeout_s=config.stream_timeout(len(demo_input.events)),
                console=console,
                check_worker=worker.check_alive,
            )
        )
        metrics_text = worker.metrics()
        latest = worker.health()
        if latest is not None and latest[1].get("model"):
            health = latest[1]
        console.say("stopping the worker and the broker…")
    report = build_report(
        demo_input,
        result,
        health=health,
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
    except DemoError as exc:
        console.say(f"error: {exc}")
        return 1
    sys.stdout.write(render_table(report) + "\n")
    sys.stdout.flush()
    console.say(f"done in {time.monotonic() - started:.1f} s")
    if not report.complete:
        console.say(f"{report.missing} event(s) were not accounted for; see {report.worker_log}")
        return 1
    return 0

"""The Faust app: comment topic in, verdicts and dead letters out, offsets acknowledged by us.

Faust provides the consumer group, the web server and the worker lifecycle; the batching and
the at-least-once rules are the core's `BatchPipeline`. We deliberately do not use
`stream.take()`: it acks its whole buffer in a `finally:` once the batch is handed over, even
when processing raised or the task was cancelled. Instead the agent iterates a `noack()` stream,
hands each event to the pipeline, and the pipeline acks an event only after the broker accepted
its verdict or dead letter, in arrival order (Faust commits a partition's contiguous run of acked
offsets, so an ack that overtakes an earlier event would let the commit skip it).

Any failure the pipeline cannot turn into a dead letter crashes the whole app rather than
restarting the agent: a restarted agent would go on acking later events while the failed ones
stay unacknowledged, and Faust's commit would then skip them.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faust
from faust.types import TP

from adapters import codecs, fetch_guard, kafka_security
from adapters.delivery_guard import check_delivery_config
from adapters.delivery_guard import preflight as delivery_preflight
from adapters.jsonlog import logging_config
from adapters.metrics import PipelineMetrics
from moderation_worker.batching import InputEvent, Outcome, admit
from moderation_worker.events import SourcePosition
from moderation_worker.pipeline import BatchPipeline, PipelineFailure
from moderation_worker.processor import BatchProcessor
from moderation_worker.settings import Settings, SettingsError
from moderation_worker.threshold_source import ThresholdSource
from moderation_worker.verdicts import ProbabilityModel

log = logging.getLogger("moderation_worker.worker")

AGENT_NAME = "moderate"
#: Seconds `/health` shows a failure (503 and its reason) before the worker stops.
CRASH_HEALTH_GRACE_S = 3.0


class FaustSink:
    """Publishes outcomes through Faust's producer and returns once the broker accepted all.

    Each outcome becomes one record that fits the producer's request limit, with the input's
    headers passed on (`codecs.build_record`). A record the producer or broker still refuses
    for its size is replaced by a minimal one (id, outcome, reason, no `meta`, no copied
    headers): one event's output must never stop the worker.

    Under `exactly_once` each record goes into the transaction of its *input* partition (the
    transaction Faust commits that partition's offsets with), so a verdict and the offset of
    its comment commit or abort together.
    """

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.app = app
        self.verdict_topic = settings.verdict_topic
        self.dlq_topic = settings.dlq_topic
        self.input_topic = settings.input_topic
        self.exactly_once = settings.processing_guarantee == "exactly_once"
        self._max_request_bytes = int(app.conf.producer_max_request_size)

    def _transactional_id(self, source: SourcePosition) -> str | None:
        if not self.exactly_once:
            return None
        group = self.app.assignor.group_for_topic(source.topic)
        return f"{self.app.conf.id}-{group}-{source.partition}"

    def _topic(self, outcome: Outcome[Any]) -> str:
        return self.verdict_topic if outcome.verdict is not None else self.dlq_topic

    async def _send(self, outcome: Outcome[Any], record: codecs.OutputRecord) -> Any:
        return await self.app.producer.send(
            self._topic(outcome),
            record.key,
            record.value,
            None,  # partition from the key, so per-key order and affinity hold
            None,
            record.headers,
            transactional_id=self._transactional_id(outcome.event.source),
        )

    async def publish(self, outcomes: Sequence[Outcome[Any]]) -> None:
        pending: list[tuple[Outcome[Any], Any]] = []
        for outcome in outcomes:
            try:
                record = codecs.build_record(outcome, self._max_request_bytes)
                pending.append((outcome, await self._send(outcome, record)))
            except Exception as exc:
                if not _too_large(exc):
                    raise
                pending.append((outcome, await self._send_minimal(outcome, exc)))
        results = await asyncio.gather(*(fut for _, fut in pending), return_exceptions=True)
        for (outcome, _), result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                if not _too_large(result):
                    raise result
                await (await self._send_minimal(outcome, result))

    async def _send_minimal(self, outcome: Outcome[Any], error: BaseException) -> Any:
        """Send the smallest record that still says what became of the event."""
        log.warning(
            "output refused for its size; sending a minimal record",
            extra={"source": outcome.event.source.to_dict(), "error": str(error)[:300]},
        )
        return await self._send(outcome, codecs.minimal_record(outcome))


def _too_large(exc: BaseException) -> bool:
    """A producer or broker refusal of one record for its size (not a broker outage)."""
    from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (MessageSizeTooLargeError, RecordListTooLargeError)):
            return True
        seen = seen.__cause__
    return False


class WorkerState:
    """What one worker process holds: the model, the threshold, metrics, and readiness."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        model: ProbabilityModel | Callable[[], ProbabilityModel],
        threshold: ThresholdSource,
    ) -> None:
        self.app = app
        self.settings = settings
        self.threshold = threshold
        self.metrics = PipelineMetrics()
        self.metrics.threshold.set(threshold.value)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._model_factory: Callable[[], ProbabilityModel] | None = None
        self.model: ProbabilityModel | None = None
        if _is_model(model):
            self._set_model(model)  # type: ignore[arg-type]
        else:
            self._model_factory = model  # type: ignore[assignment]
        self.model_ready = asyncio.Event()
        self.pipeline: BatchPipeline[faust.EventT] | None = None
        self.failure: BaseException | None = None
        self.stopping = False
        self.positions: dict[TP, int] = {}

    def _set_model(self, model: ProbabilityModel) -> None:
        self.model = model
        self.threshold.bind_model(model)
        self.metrics.threshold.set(self.threshold.value)
        self.metrics.set_model(model.identity.base_model, model.identity.lora_sha256)
        if model.batch_size != self.settings.batch_size:
            log.warning(
                "model batch size differs from settings.batch_size; the worker pads to the "
                "settings value",
                extra={
                    "model_batch_size": model.batch_size,
                    "batch_size": self.settings.batch_size,
                },
            )

    async def load_model(self) -> None:
        """Load the model once per process, off the event loop, so the worker keeps heartbeating."""
        if self.model is None and self._model_factory is not None:
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            model = await loop.run_in_executor(self.executor, self._model_factory)
            self._set_model(model)
            log.info("model loaded", extra={"seconds": round(time.perf_counter() - started, 3)})
        self.model_ready.set()

    @property
    def ready(self) -> bool:
        return (
            self.model_ready.is_set()
            and self.pipeline is not None
            and self.failure is None
            and self.pipeline.failure is None  # 503 the moment a batch fails, before the crash
            and not self.stopping
            and not self.app.should_stop
        )

    def new_pipeline(self, ack: Callable[[faust.EventT], Any]) -> BatchPipeline[faust.EventT]:
        assert self.model is not None
        processor = BatchProcessor(self.model, self.threshold, batch_size=self.settings.batch_size)

        async def ack_and_track(event: InputEvent[faust.EventT]) -> None:
            await ack(event.handle)
            message = event.handle.message
            self.positions[message.tp] = message.offset + 1

        self.pipeline = BatchPipeline(
            processor,
            FaustSink(self.app, self.settings),
            ack_and_track,
            max_wait_s=self.settings.max_wait_ms / 1000.0,
            executor=self.executor,
            observer=self.metrics,
            model_retries=self.settings.model_retries,
            retry_backoff_s=self.settings.model_retry_backoff_s,
            model_timeout_s=self.settings.model_timeout_s,
            publish_timeout_s=self.settings.publish_timeout_s,
        )
        return self.pipeline

    def to_input_event(self, event: faust.EventT) -> InputEvent[faust.EventT]:
        message = event.message
        return admit(
            event.value,
            key=message.key,
            source=SourcePosition(message.topic, message.partition, message.offset),
            handle=event,
            received_at=time.monotonic(),
            produced_at=message.timestamp or None,
            max_text_chars=self.settings.max_text_chars,
            max_depth=self.settings.max_event_depth,
            headers=_headers(message.headers),
        )

    async def crash(self, exc: BaseException) -> None:
        """Stop the worker with an error: unacked events are rescored after the restart.

        `/health` answers 503 with the reason for a few seconds before the stop begins, so a
        probe or a person sees why; nothing is acknowledged meanwhile. A model call that timed
        out still runs in its thread, and the interpreter would wait for it at exit: the
        watchdog ends the process if the stop takes too long.
        """
        if self.failure is None:
            self.failure = exc
            log.error(
                "pipeline failed; stopping the worker",
                exc_info=exc,
                extra={"reason": failure_reason(exc)},
            )
            arm_exit_watchdog(self.settings.shutdown_timeout_s, 1, "crash")
            await asyncio.sleep(min(CRASH_HEALTH_GRACE_S, self.settings.shutdown_timeout_s / 4))
            await self.app.crash(exc)

    def begin_stop(self) -> None:
        """SIGTERM/SIGINT: stop taking new work, finish and ack what is in flight, then leave.

        Faust stops fetching and waits (`stream_wait_empty`) until every event it handed us
        is acknowledged, commits, and only then leaves the group, so a batch in the model is
        scored, published and committed instead of being scored again by the next owner.
        """
        if not self.stopping:
            self.stopping = True
            log.info(
                "stopping: finishing the batch in flight",
                extra={"shutdown_timeout_s": self.settings.shutdown_timeout_s},
            )
            arm_exit_watchdog(self.settings.shutdown_timeout_s, 1, "graceful stop")

    def reload_threshold(self) -> None:
        try:
            value = self.threshold.reload().value
        except SettingsError as exc:
            self.metrics.threshold_reloads.labels("error").inc()
            log.error("threshold reload failed; keeping %s", self.threshold.value, exc_info=exc)
            return
        self.metrics.threshold.set(value)
        self.metrics.threshold_reloads.labels("ok").inc()

    def update_lag(self) -> None:
        consumer = self.app.consumer
        for tp in consumer.assignment():
            if tp.topic != self.settings.input_topic:
                continue
            try:
                highwater = consumer.highwater(tp)
            except Exception:  # not yet fetched; lag is unknown, not zero
                continue
            if highwater is None or tp not in self.positions:
                continue
            lag = max(0, highwater - self.positions[tp])
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)

    def health(self) -> tuple[dict[str, Any], int]:
        body: dict[str, Any] = {
            "status": "ready" if self.ready else ("failed" if self.failure else "starting"),
            "model_loaded": self.model_ready.is_set(),
            "model": self.model.identity.to_dict() if self.model is not None else None,
            "threshold": self.threshold.value,
            "threshold_source": self.threshold.in_force.source,
            "rebalancing": bool(self.app.rebalancing),
            "assigned_partitions": sorted(
                tp.partition
                for tp in (self.app.consumer.assignment() if self.pipeline else ())
                if tp.topic == self.settings.input_topic
            ),
        }
        if self.failure is not None or self._pipeline_failure() is not None:
            # A code, never the exception text: /health may be reachable by more people than
            # the logs, and error text can carry hostnames, paths or comment text.
            body["status"] = "failed"
            body["reason"] = failure_reason(self.failure or self._pipeline_failure())
        return body, 200 if self.ready else 503

    def _pipeline_failure(self) -> BaseException | None:
        return self.pipeline.failure if self.pipeline is not None else None


def _headers(headers: Any) -> list[tuple[str, bytes | None]]:
    """A record's headers as (name, value) pairs, whatever shape the client gave them in."""
    if not headers:
        return []
    items = headers.items() if hasattr(headers, "items") else headers
    out: list[tuple[str, bytes | None]] = []
    for name, value in items:
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        out.append((str(name), value if isinstance(value, bytes | None) else str(value).encode()))
    return out


def arm_exit_watchdog(seconds: float, code: int, why: str) -> threading.Timer:
    """End the process after `seconds` if it is still alive (a hung model thread, a stuck
    broker): unacknowledged events are redelivered, a worker that never exits is not."""

    def _exit() -> None:
        log.error("%s did not finish in %.0fs; exiting now", why, seconds)
        logging.shutdown()
        os._exit(code)

    timer = threading.Timer(seconds, _exit)
    timer.daemon = True
    timer.start()
    return timer


class ModerationWorker(faust.Worker):
    """Faust's worker, telling our state when a stop signal arrives (see `begin_stop`)."""

    def __init__(self, app: faust.App, state: WorkerState, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._moderation = state

    def _schedule_shutdown(self, signal: signal.Signals) -> None:
        self._moderation.begin_stop()
        super()._schedule_shutdown(signal)


def failure_reason(exc: BaseException | None) -> str:
    """A short code for why the worker failed, for `/health` and the failure metric."""
    reason = getattr(exc, "reason", None) or getattr(exc, "health_reason", None)
    if isinstance(reason, str) and reason.isidentifier():
        return reason
    return "internal_error"


def _is_model(obj: object) -> bool:
    return hasattr(obj, "predict_proba") and hasattr(obj, "labels")


def faust_options(settings: Settings) -> dict[str, Any]:
    """Faust app configuration derived from the settings."""
    return {
        "broker": settings.broker_url,
        "broker_credentials": kafka_security.faust_credentials(settings),  # None: PLAINTEXT
        "processing_guarantee": settings.processing_guarantee,
        "topic_partitions": settings.input_partitions,
        "consumer_auto_offset_reset": "earliest",  # a new group must not skip comments
        "broker_session_timeout": settings.session_timeout_s,
        "broker_heartbeat_interval": settings.heartbeat_interval_s,
        "broker_rebalance_timeout": settings.rebalance_timeout_s,
        "broker_commit_interval": settings.commit_interval_s,
        "stream_wait_empty": True,  # on rebalance, wait for in-flight batches to be acked
        "producer_acks": -1,
        # A stalled broker must fail the publish within our limit, not Faust's 20 minutes.
        "producer_request_timeout": settings.publish_timeout_s,
        "topic_replication_factor": settings.topic_replication_factor,
        "web_enabled": True,
        "web_port": settings.web_port,
        "web_bind": settings.web_bind,
        "web_host": "127.0.0.1" if settings.web_bind in ("0.0.0.0", "::") else settings.web_bind,
        # Faust's own pages show topology, routing and table contents: not for a worker
        # that only needs /health and /metrics.
        "web_router_enabled": False,
        "web_tables_enabled": False,
        "web_graph_enabled": False,
        "web_stats_enabled": False,
        "web_metrics_enabled": False,
        # No tables, so no state worth keeping; Faust still insists on a data directory.
        "datadir": str(_data_dir(settings.app_id)),
    }


def _data_dir(app_id: str) -> Path:
    path = Path(tempfile.gettempdir()) / "moderation-worker" / app_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_app(
    settings: Settings,
    model: ProbabilityModel | Callable[[], ProbabilityModel],
    *,
    reload_settings: Callable[[], Settings] | None = None,
) -> faust.App:
    """A Faust app for `settings` scoring with `model` (an instance, or a factory loaded at start).

    The app exposes `/health` (200 when ready, 503 while starting or after a failure) and
    `/metrics` on Faust's web server; `app.moderation` is the `WorkerState`.
    """
    codecs.register()
    app = faust.App(settings.app_id, **faust_options(settings))
    check_delivery_config(app, settings)  # Faust's env vars must not weaken at-least-once
    fetch_guard.install(app)  # an undecodable record batch: named in the log, /health, a stop
    state = WorkerState(app, settings, model, ThresholdSource(settings, None, reload_settings))
    app.moderation = state  # type: ignore[attr-defined]

    source = app.topic(
        settings.input_topic,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.input_partitions,
        replicas=settings.topic_replication_factor,
    )
    outputs = [
        app.topic(
            name,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.input_partitions,
            replicas=settings.topic_replication_factor,
        )
        for name in (settings.verdict_topic, settings.dlq_topic)
    ]

    @app.task
    async def _prepare() -> None:
        for topic in outputs:
            await topic.maybe_declare()
        await app.producer.maybe_start()
        try:
            await state.load_model()
        except Exception as exc:
            await state.crash(exc)

    @app.agent(source, name=AGENT_NAME, concurrency=1)
    async def moderate(stream: faust.StreamT) -> None:
        await state.model_ready.wait()
        events = stream.noack()
        pipeline = state.new_pipeline(events.ack)
        runner = asyncio.ensure_future(pipeline.run())

        def _runner_done(task: asyncio.Future[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                asyncio.ensure_future(state.crash(task.exception()))  # type: ignore[arg-type]

        runner.add_done_callback(_runner_done)
        try:
            async for event in events.events():
                await pipeline.submit(state.to_input_event(event))
        except PipelineFailure as exc:
            await state.crash(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not restart the agent past unacked events
            await state.crash(exc)
            raise
        finally:
            runner.cancel()

    @app.timer(interval=5.0)
    async def _lag() -> None:
        state.update_lag()

    @app.page("/health")
    async def health(self: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        body, status = state.health()
        return self.json(body, status=status)

    from faust.sensors.prometheus import setup_prometheus_sensors

    setup_prometheus_sensors(app, registry=state.metrics.registry, name_prefix="faust")
    return app


def worker_state(app: faust.App) -> WorkerState:
    """The `WorkerState` of an app made by `build_app`."""
    return app.moderation  # type: ignore[attr-defined,no-any-return]


def run_worker(
    settings: Settings,
    model_factory: Callable[[], ProbabilityModel],
    *,
    reload_settings: Callable[[], Settings] | None = None,
) -> None:
    """Run one worker until SIGTERM/SIGINT (blocking); SIGHUP reloads the threshold.

    The model is loaded before the worker joins the consumer group, so a slow load does not
    hold partitions hostage or trigger a rebalance. The threshold in force comes from
    `threshold_source.threshold_for` (setting, threshold file, the model's calibrated one, 0.5).
    """
    logging.config.dictConfig(logging_config(settings.log_level))
    log.info("worker starting", extra={"settings": settings.public_dict()})
    # Configuration mistakes fail in seconds, before the model load that can take a minute.
    delivery_preflight(settings)  # Faust variables weakening delivery or overriding options
    kafka_security.preflight(settings)  # TLS/SASL/address mistakes: a clear error, not a hang
    started = time.perf_counter()
    model = model_factory()
    log.info("model loaded", extra={"seconds": round(time.perf_counter() - started, 3)})
    started = time.perf_counter()
    shapes = BatchProcessor(model, 0.5, batch_size=settings.batch_size).warm_up()
    log.info(
        "model warmed up",
        extra={"shapes": shapes, "seconds": round(time.perf_counter() - started, 3)},
    )
    app = build_app(settings, model, reload_settings=reload_settings)
    state = worker_state(app)

    @app.task
    async def _install_sighup() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, state.reload_threshold)

    if settings.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(
            settings.metrics_port, addr=settings.web_bind, registry=state.metrics.registry
        )

    worker = ModerationWorker(
        app,
        state,
        loglevel=settings.log_level,
        logging_config=logging_config(settings.log_level),
        quiet=True,
    )
    worker.spinner = None  # terminal escapes have no place in structured logs
    worker.execute_from_commandline()

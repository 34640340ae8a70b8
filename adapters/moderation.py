"""`Moderation`: the one object a user holds, as a worker of its own or inside any Faust app.

It owns the model, the threshold, the metrics and the pipeline; `install(app)` adds the topics,
the agent, `/health` and `/metrics`, the lag timer, the model-loading task and the fetch guard to
a `faust.App`, after checking that the app's effective configuration keeps at-least-once
delivery. The standalone worker is nothing more than `standalone_app()` (an app built from the
settings) with the same plugin installed, and `run()` (preflights, model load, warm-up, signals).

Faust provides the consumer group, the web server and the worker lifecycle; the batching and
the at-least-once rules are the core's `BatchPipeline`. We deliberately do not use
`stream.take()`: it acks its whole buffer in a `finally:` once the batch is handed over, even
when processing raised or the task was cancelled. Instead the agent iterates a `noack()` stream,
hands each event to the pipeline, and the pipeline acks an event only after the broker accepted
its verdict or dead letter, in arrival order (Faust commits a partition's contiguous run of acked
offsets, so an ack that overtakes an earlier event would let the commit skip it).

Any failure the pipeline cannot turn into a dead letter crashes the whole app rather than
restarting the agent: a restarted agent would go on acking later events while the failed ones
stay unacknowledged, and Faust's commit would then skip them. Inside a host app this stops the
host app too, for the same reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
from faust.types import TP

from adapters import codecs, fetch_guard, lifecycle
from adapters.delivery_guard import check_delivery_config
from adapters.faust_events import to_input_event
from adapters.fleet_policy import FleetPolicy, model_identity
from adapters.health import (
    HealthReport,
    add_views,
    attach_faust_sensor,
    consumer_lag,
    failure_reason,
    normalise_prefix,
    require_free_paths,
)
from adapters.metrics import PipelineMetrics
from adapters.model_loading import ModelLoader, ModelOrFactory
from adapters.options import faust_options
from adapters.sink import FaustSink
from moderation_worker.batching import InputEvent
from moderation_worker.pipeline import BatchPipeline, PipelineFailure
from moderation_worker.processor import BatchProcessor
from moderation_worker.settings import Settings, SettingsError
from moderation_worker.threshold_source import ThresholdSource
from moderation_worker.verdicts import ProbabilityModel

log = logging.getLogger("moderation_worker.worker")

AGENT_NAME = "moderate"
#: Seconds `/health` shows a failure (503 and its reason) before the worker stops.
CRASH_HEALTH_GRACE_S = 3.0
#: How often the consumer-lag gauge is refreshed.
LAG_INTERVAL_S = 5.0


class Moderation:
    """Comment moderation for a Faust app: comments in, verdicts and dead letters out.

    Args:
        settings: topics, model, batching and time limits; for the standalone app also the
            broker, consumer group (`app_id`) and web server. In a host app, the app's own
            configuration decides broker, group and web server.
        model: a loaded `ProbabilityModel`, or a factory that loads one. A factory is called
            once, off the event loop, when the app starts (`run()` calls it earlier, before
            the worker joins the consumer group).
        reload_settings: rebuilds the settings when the threshold is reloaded (SIGHUP); by
            default the same settings, which re-reads `threshold_file`.
        web_prefix: path prefix of `/health` and `/metrics`, for an app that already serves
            those paths (`"/moderation"` gives `/moderation/health`).

    Example:
        app = faust.App("my-app", broker="kafka://localhost:9092")
        moderation = Moderation(load_settings(), model_factory, web_prefix="/moderation")
        moderation.install(app)
    """

    def __init__(
        self,
        settings: Settings,
        model: ModelOrFactory,
        *,
        reload_settings: Callable[[], Settings] | None = None,
        web_prefix: str = "",
    ) -> None:
        self.settings = settings
        self.web_prefix = normalise_prefix(web_prefix)
        self.threshold = ThresholdSource(settings, None, reload_settings)
        self.metrics = PipelineMetrics()
        # Routes, thresholds and modes: the settings, then the control topic's overrides.
        self.policy = FleetPolicy(settings, self.metrics.control_record)
        self.metrics.threshold.set(self.threshold.value)
        # One model call at a time: a model is not assumed to be thread-safe.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._model = ModelLoader(model, settings.batch_size, self._set_model)
        self.model_ready = asyncio.Event()
        self.pipeline: BatchPipeline[faust.EventT] | None = None
        self.failure: BaseException | None = None
        self.stopping = False
        self.positions: dict[TP, int] = {}  # next offset after the last acked event
        self.health_path = f"{self.web_prefix}/health"
        self.metrics_path = f"{self.web_prefix}/metrics"
        self._app: faust.App | None = None

    # ------------------------------------------------------------------ finding and installing

    @classmethod
    def of(cls, app: faust.App) -> Moderation:
        """The `Moderation` installed in `app` (`LookupError` if none is)."""
        target = lifecycle.registered(app)
        if not isinstance(target, cls):
            raise LookupError(f"no moderation is installed in app {app.conf.id!r}")
        return target

    @property
    def installed(self) -> bool:
        return self._app is not None

    @property
    def app(self) -> faust.App:
        """The app this moderation is installed in."""
        if self._app is None:
            raise RuntimeError("not installed yet: call install(app) or standalone_app()")
        return self._app

    def install(self, app: faust.App) -> Moderation:
        """Add moderation to `app` (call once, before the app starts); returns `self`.

        Raises `DeliveryConfigError` (a `SettingsError`) naming each setting of `app`'s
        effective configuration that breaks at-least-once delivery (`producer_acks` other than
        -1, `consumer_auto_offset_reset` other than 'earliest', `stream_wait_empty` off, a
        `processing_guarantee` that differs from the settings); the app is then left as it was.
        """
        return self._install(app, standalone=False)

    def standalone_app(self) -> faust.App:
        """A Faust app configured from the settings (`faust_options`), with moderation in it."""
        app = faust.App(self.settings.app_id, **faust_options(self.settings))
        self._install(app, standalone=True)
        return app

    def run(self) -> None:
        """Run a worker until SIGTERM/SIGINT (blocking); see `adapters.lifecycle.run`."""
        lifecycle.run(self)

    def _install(self, app: faust.App, *, standalone: bool) -> Moderation:
        if self._app is not None:
            raise RuntimeError(
                f"this Moderation is already installed in app {self._app.conf.id!r}; "
                "create one Moderation per app"
            )
        if lifecycle.registered(app) is not None or AGENT_NAME in app.agents:
            raise RuntimeError(f"moderation is already installed in app {app.conf.id!r}")
        # Every refusal comes before the first change to `app`.
        # Faust's env vars (or the host's own options) must not weaken at-least-once.
        check_delivery_config(app, self.settings, host_app=not standalone)
        require_free_paths(app, self.web_prefix)
        codecs.register()
        # An undecodable record batch: named in the log, on /health, and a stop.
        fetch_guard.install(app, self.crash)
        lifecycle.register(app, self)
        self._app = app
        source, outputs = self._declare_topics(app)

        async def prepare() -> None:
            await self._prepare(outputs)

        app.task(prepare)
        app.agent(source, name=AGENT_NAME, concurrency=1)(self._moderate)
        app.timer(interval=LAG_INTERVAL_S, name="moderation_lag")(self._refresh_lag)
        add_views(app, self.web_prefix, self.health, self.metrics.registry)
        attach_faust_sensor(app, self.metrics.registry)
        return self

    def _declare_topics(self, app: faust.App) -> tuple[faust.TopicT, list[faust.TopicT]]:
        """Input, verdict and dead-letter topics, raw bytes, created with these partitions."""
        s = self.settings

        def topic(name: str) -> faust.TopicT:
            return app.topic(
                name,
                key_serializer="raw",
                value_serializer="raw",
                partitions=s.input_partitions,
                replicas=s.topic_replication_factor,
            )

        return topic(s.input_topic), [topic(s.verdict_topic), topic(s.dlq_topic)]

    # ------------------------------------------------------------------ the agent

    async def _prepare(self, outputs: list[faust.TopicT]) -> None:
        """Declare the output topics, start the producer and load the model (a crash if not)."""
        if not self.app.conf.web_enabled:  # read now: Faust's CLI sets it after install()
            log.warning("the app's web server is off: %s is not served", self.health_path)
        for topic in outputs:
            await topic.maybe_declare()
        await self.app.producer.maybe_start()
        try:
            await self.policy.start()  # the fleet's latest state before the first batch
            await self.load_model()
        except Exception as exc:
            await self.crash(exc)

    async def _moderate(self, stream: faust.StreamT) -> None:
        """The agent: every event into the pipeline; the pipeline acks, in arrival order.
        The control-topic reader stops with it (the agent is cancelled when the app stops)."""
        try:
            await self.model_ready.wait()
            await self._moderate_events(stream)
        finally:
            await self.policy.stop()

    async def _moderate_events(self, stream: faust.StreamT) -> None:
        events = stream.noack()
        pipeline = self._new_pipeline(events.ack)
        runner = asyncio.ensure_future(pipeline.run())

        def _runner_done(task: asyncio.Future[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                asyncio.ensure_future(self.crash(task.exception()))  # type: ignore[arg-type]

        runner.add_done_callback(_runner_done)
        try:
            async for event in events.events():
                await pipeline.submit(to_input_event(event, self.settings))
        except PipelineFailure as exc:
            await self.crash(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not restart the agent past unacked events
            await self.crash(exc)
            raise
        finally:
            runner.cancel()

    def _new_pipeline(self, ack: Callable[[faust.EventT], Any]) -> BatchPipeline[faust.EventT]:
        assert self.model is not None
        s = self.settings
        processor = BatchProcessor(self.model, policy=self.policy.snapshot, batch_size=s.batch_size)

        async def ack_and_track(event: InputEvent[faust.EventT]) -> None:
            await ack(event.handle)
            message = event.handle.message
            self.positions[message.tp] = message.offset + 1

        self.pipeline = BatchPipeline(
            processor,
            FaustSink(self.app, s),
            ack_and_track,
            max_wait_s=s.max_wait_ms / 1000.0,
            executor=self.executor,
            observer=self.metrics,
            model_retries=s.model_retries,
            retry_backoff_s=s.model_retry_backoff_s,
            model_timeout_s=s.model_timeout_s,
            publish_timeout_s=s.publish_timeout_s,
            batch_by_length=s.speed.batch_by_length,
        )
        return self.pipeline

    # ------------------------------------------------------------------ the model

    def _set_model(self, model: ProbabilityModel) -> None:
        if not hasattr(model, "predict_rows"):
            self.threshold.bind_model(model)
        self.policy.bind_model(model)
        self.metrics.threshold.set(self.policy.primary_threshold()[0])
        identity = model_identity(model)
        self.metrics.set_model(identity.base_model, identity.lora_sha256)
        batch_size = self.settings.batch_size
        if model.batch_size != batch_size:
            log.warning(
                "model batch size differs from settings.batch_size; the worker pads to the "
                "settings value",
                extra={"model_batch_size": model.batch_size, "batch_size": batch_size},
            )

    @property
    def model(self) -> ProbabilityModel | None:
        return self._model.model

    def prepare_model(self) -> ProbabilityModel:
        """Load the model and warm it up (each once), in this thread: `run()` does it before
        the worker joins the consumer group, so a slow load holds no partitions."""
        return self._model.prepare()

    async def load_model(self) -> None:
        """`prepare_model` off the event loop, so the app keeps heartbeating meanwhile; the
        agent takes its first event only after it (`model_ready`)."""
        await self._model.prepare_in(self.executor)
        self.model_ready.set()

    # ------------------------------------------------------------------ health and control

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

    def health(self) -> HealthReport:
        """The `/health` body and status: 200 when ready, 503 while starting or failed."""
        app = self.app
        threshold, source = self.policy.primary_threshold()
        identity = model_identity(self.model)
        body: dict[str, Any] = {
            "status": "ready" if self.ready else ("failed" if self.failure else "starting"),
            "model_loaded": self.model_ready.is_set(),
            "model": identity.to_dict() if identity is not None else None,
            "threshold": threshold,
            "threshold_source": source,
            "policy": self.policy.snapshot().to_dict(),
            "rebalancing": bool(app.rebalancing),
            "assigned_partitions": sorted(
                tp.partition
                for tp in (app.consumer.assignment() if self.pipeline else ())
                if tp.topic == self.settings.input_topic
            ),
        }
        failure = self.failure or (self.pipeline.failure if self.pipeline is not None else None)
        if failure is not None:
            body["status"] = "failed"
            body["reason"] = failure_reason(failure)
        return body, 200 if self.ready else 503

    async def crash(self, exc: BaseException) -> None:
        """Stop the app with an error: unacked events are rescored after the restart.

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
            lifecycle.arm_exit_watchdog(self.settings.shutdown_timeout_s, 1, "crash")
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
            lifecycle.arm_exit_watchdog(self.settings.shutdown_timeout_s, 1, "graceful stop")

    def reload_threshold(self) -> None:
        """SIGHUP: re-read thresholds, modes and routes from the settings; a bad file or
        setting keeps the old ones (logged, counted). Control-topic overrides stay on top."""
        try:
            self.threshold.reload()
            self.policy.rebase(self.threshold.settings, self.model)
            self.metrics.threshold.set(self.policy.primary_threshold()[0])
        except SettingsError as exc:
            self.metrics.threshold_reloads.labels("error").inc()
            log.error("threshold reload failed; keeping the old policy", exc_info=exc)
            return
        self.metrics.threshold_reloads.labels("ok").inc()

    async def _refresh_lag(self) -> None:  # the timer
        self.update_lag()

    def update_lag(self) -> None:
        """Set the lag gauge of each assigned input partition (highwater - next position)."""
        lags = consumer_lag(self.app.consumer, self.settings.input_topic, self.positions)
        for tp, lag in lags.items():
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)

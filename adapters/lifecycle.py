"""Process lifecycle: which moderation runs in which app, signals, the exit watchdog, `run`.

A Faust app holds no moderation attribute; `register()` keeps a weak map from the app to its
`Moderation`, so `Moderation.of(app)`, the stop and reload signals and the fetch guard find it
without anything hung on the app (weak both ways: a test that builds many apps frees them).

`ModerationWorker` is Faust's worker plus two hooks: SIGTERM/SIGINT first tell the moderation
to stop taking work and arm the exit watchdog, and SIGHUP reloads the threshold. `register()`
makes it the app's `Worker` class, so `app.main()` / `faust -A app worker` get it too.
"""

from __future__ import annotations

import logging
import logging.config
import os
import signal
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Protocol

import faust
from faust.exceptions import AlreadyConfiguredWarning

from adapters import kafka_preflight
from adapters.delivery_guard import preflight as delivery_preflight
from adapters.jsonlog import logging_config
from moderation_worker.model import compile_cache

if TYPE_CHECKING:
    from adapters.moderation import Moderation

log = logging.getLogger("moderation_worker.worker")


class SignalTarget(Protocol):
    """What the worker's signal handlers call (a `Moderation`)."""

    def begin_stop(self) -> None: ...

    def reload_threshold(self) -> None: ...


_installed: weakref.WeakKeyDictionary[faust.App, weakref.ref[SignalTarget]] = (
    weakref.WeakKeyDictionary()
)


def register(app: faust.App, target: SignalTarget) -> None:
    """Remember `target` as `app`'s moderation and run `app` with `ModerationWorker`."""
    if registered(app) is not None:
        raise RuntimeError(f"moderation is already installed in app {app.conf.id!r}")
    _installed[app] = weakref.ref(target)
    _use_moderation_worker(app)


def registered(app: faust.App) -> SignalTarget | None:
    """The moderation installed in `app`, or None."""
    ref = _installed.get(app)
    return ref() if ref is not None else None


def _use_moderation_worker(app: faust.App) -> None:
    current = app.conf.Worker
    if isinstance(current, type) and issubclass(current, ModerationWorker):
        return
    if current is faust.Worker:
        with warnings.catch_warnings():  # read just above, used only when a worker starts
            warnings.simplefilter("ignore", AlreadyConfiguredWarning)
            app.conf.Worker = ModerationWorker
        return
    log.warning(
        "the app has its own Worker class; subclass adapters.lifecycle.ModerationWorker so "
        "that SIGTERM bounds the graceful stop and SIGHUP reloads the threshold",
        extra={"worker_class": getattr(current, "__qualname__", str(current))},
    )


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
    """Faust's worker, telling the app's moderation when a stop or reload signal arrives."""

    def _install_signal_handlers_unix(self) -> None:
        super()._install_signal_handlers_unix()
        self.loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        target = registered(self.app)
        if target is not None:
            target.reload_threshold()

    def _schedule_shutdown(self, signal: signal.Signals) -> None:
        target = registered(self.app)
        if target is not None:
            target.begin_stop()
        super()._schedule_shutdown(signal)


def run(moderation: Moderation) -> None:
    """Run one worker until SIGTERM/SIGINT (blocking); SIGHUP reloads the threshold.

    The model is loaded and warmed up (every compiled shape built) before the worker joins the
    consumer group and before its web server, `/health` included, starts, so a slow load does
    not hold partitions hostage or trigger a rebalance, and a probe never sees a worker ready
    that would still compile on its first batches; configuration mistakes fail in seconds,
    before that load. Compiled shapes persist across restarts (`[speed] compile_cache_dir`).
    Runs the app `moderation` is installed in, or else its standalone app.
    """
    settings = moderation.settings
    standalone = not moderation.installed
    if standalone:  # Faust variables weakening delivery or overriding options: nothing started
        delivery_preflight(settings)
    logging.config.dictConfig(logging_config(settings.log_level))
    # Before the model is built: TensorFlow reads its XLA flags when its runtime starts. The
    # CLI did this before importing anything; here it covers `Moderation.run()` in a program.
    compile_cache.enable(settings.speed.compile_cache_dir)
    log.info("worker starting", extra={"settings": settings.public_dict()})
    if standalone:
        kafka_preflight.preflight(settings)  # TLS/SASL/address mistakes: a clear error, not a hang
    moderation.prepare_model()
    app = moderation.standalone_app() if standalone else moderation.app
    if settings.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(
            settings.metrics_port, addr=settings.web_bind, registry=moderation.metrics.registry
        )
    worker = ModerationWorker(
        app,
        loglevel=settings.log_level,
        logging_config=logging_config(settings.log_level),
        quiet=True,
    )
    worker.spinner = None  # terminal escapes have no place in structured logs
    worker.execute_from_commandline()

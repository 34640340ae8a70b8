"""What the worker shows the outside: `/health`, `/metrics`, and why it failed.

Both pages live on the Faust app's own web server, under a path prefix so that an app which
already serves `/health` or `/metrics` keeps them (`Moderation(..., web_prefix="/moderation")`).
Faust's Prometheus sensor writes into the same registry as the pipeline's metrics, so one page
shows both; an app that already has a Prometheus sensor keeps its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import faust
from faust.sensors.prometheus import FaustMetrics, PrometheusMonitor
from faust.types import TP
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("moderation_worker.worker")

HealthReport = tuple[dict[str, Any], int]


def failure_reason(exc: BaseException | None) -> str:
    """A short code for why the worker failed, for `/health` and the failure metric.

    A code, never the exception text: `/health` may be reachable by more people than the logs,
    and error text can carry hostnames, paths or comment text.
    """
    reason = getattr(exc, "reason", None) or getattr(exc, "health_reason", None)
    if isinstance(reason, str) and reason.isidentifier():
        return reason
    return "internal_error"


def normalise_prefix(prefix: str) -> str:
    """`prefix` as a path prefix: '' or '/a/b' (leading slash, no trailing one)."""
    cleaned = "/" + prefix.strip("/") if prefix.strip("/") else ""
    if any(c.isspace() or c in "?#{}" for c in cleaned):
        raise ValueError(f"web_prefix {prefix!r} is not a plain URL path")
    return cleaned


def require_free_paths(app: faust.App, prefix: str) -> None:
    """Refuse (`ValueError`) when `app` already serves `{prefix}/health` or `{prefix}/metrics`."""
    taken = [p for p in (f"{prefix}/health", f"{prefix}/metrics") if p in app.web.views]
    if taken:
        raise ValueError(
            f"app {app.conf.id!r} already serves {', '.join(taken)}: "
            "pass Moderation(..., web_prefix='/moderation') to serve ours elsewhere"
        )


def add_views(
    app: faust.App,
    prefix: str,
    health: Callable[[], HealthReport],
    registry: CollectorRegistry,
) -> tuple[str, str]:
    """Register `{prefix}/health` and `{prefix}/metrics` on `app`; return their paths."""
    health_path, metrics_path = f"{prefix}/health", f"{prefix}/metrics"
    require_free_paths(app, prefix)

    async def health_view(view: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        body, status = health()
        return view.json(body, status=status)

    async def metrics_view(view: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        from aiohttp.web import Response

        headers = {"Content-Type": CONTENT_TYPE_LATEST}
        return Response(body=generate_latest(registry), headers=headers)  # type: ignore[return-value]

    app.page(health_path, name="moderation_health")(health_view)
    app.page(metrics_path, name="moderation_metrics")(metrics_view)
    return health_path, metrics_path


def attach_faust_sensor(app: faust.App, registry: CollectorRegistry) -> bool:
    """Feed Faust's own stream, consumer and producer metrics into `registry`.

    An app that already has a Prometheus monitor keeps it (replacing it would empty the
    owner's dashboards); returns whether ours was attached.
    """
    if isinstance(app.monitor, PrometheusMonitor):
        log.info("the app already has a Prometheus sensor; keeping it")
        return False
    app.monitor = PrometheusMonitor(metrics=FaustMetrics.create(registry, "faust"))
    return True


def consumer_lag(consumer: Any, topic: str, positions: dict[TP, int]) -> dict[TP, int]:
    """Records after the last acknowledged one, per assigned partition of `topic`.

    A partition not yet fetched, or with nothing acknowledged yet, has an unknown lag and is
    left out rather than shown as zero.
    """
    lags: dict[TP, int] = {}
    for tp in consumer.assignment():
        if tp.topic != topic or tp not in positions:
            continue
        try:
            highwater = consumer.highwater(tp)
        except Exception:  # not yet fetched
            continue
        if highwater is not None:
            lags[tp] = max(0, highwater - positions[tp])
    return lags

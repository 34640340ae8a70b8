"""The Faust configuration of the standalone worker, derived from `Settings`.

Only the standalone app (`Moderation.standalone_app()`) is built from these options; an app
that moderation is installed into keeps its owner's configuration, and the delivery check
(`adapters.delivery_guard`) refuses it if that configuration breaks at-least-once.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from adapters import kafka_security
from moderation_worker.settings import Settings


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

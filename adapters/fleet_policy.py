"""The policy a worker decides under: its settings, its model's calibrated thresholds, and the
fleet's control topic on top.

`FleetPolicy` owns the `ControlState` and its `ControlTopicReader`: it reads the control topic
to its end before the first batch (so a worker started late decides under the latest state),
follows it while the worker runs, and rebuilds the configured base when the model is loaded
(calibrated thresholds) or the settings are reloaded (SIGHUP), keeping the control overrides.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from adapters.control_topic import ControlTopicReader
from moderation_worker.events import ModelIdentity
from moderation_worker.policy import ControlState, PolicyState, policy_from_settings
from moderation_worker.settings import Settings, SettingsError
from moderation_worker.verdicts import as_row_model

log = logging.getLogger("moderation_worker.worker")


class FleetPolicy:
    """Routes, thresholds and modes in force for one worker.

    Args:
        settings: the worker's settings (classifiers, routes, control topic).
        on_record: per control record, ("applied" | "rejected", reason), for metrics.
    """

    def __init__(
        self, settings: Settings, on_record: Callable[[str, str | None], None] | None = None
    ) -> None:
        self.settings = settings
        self.state = ControlState(
            policy_from_settings(settings), version=0 if settings.control_topic else None
        )
        self.on_record = on_record
        self.reader: ControlTopicReader | None = None

    def snapshot(self) -> PolicyState:
        """The state now; the processor reads it once per batch."""
        return self.state.snapshot()

    async def start(self) -> None:
        """Read the control topic to its end (outside the consumer group), then follow it."""
        topic = self.settings.control_topic
        if not topic or self.reader is not None:
            return
        self.reader = ControlTopicReader(self.settings, topic, self.state, self.on_record)
        await self.reader.start()

    async def stop(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            await reader.stop()

    def bind_model(self, model: Any) -> PolicyState:
        """The model is there: check it has every configured classifier, then take its
        calibrated thresholds as the fallback. Raises `SettingsError` naming the missing ones."""
        names = as_row_model(model).names
        missing = sorted(set(self.snapshot().classifiers) - set(names))
        if missing:
            raise SettingsError(
                f"classifiers {missing} are configured but the model has only {list(names)}"
            )
        return self.rebase(self.settings, model)

    def rebase(self, settings: Settings, model: Any) -> PolicyState:
        """The settings' policy with each classifier's calibrated threshold, under the
        control-topic overrides; overrides the new base no longer admits are dropped (logged)."""
        calibrated = as_row_model(model).calibrated_thresholds() if model is not None else {}
        for key, reason in self.state.rebase(policy_from_settings(settings, calibrated)):
            log.warning("control override dropped", extra={"key": key, "reason": reason})
        self.settings = settings
        return self.snapshot()

    def primary_threshold(self) -> tuple[float, str]:
        """The first default-route classifier's threshold and its source (health, metrics)."""
        state = self.snapshot()
        in_force = state.threshold(state.default_route[0])
        return in_force.value, in_force.source


def model_identity(model: Any) -> ModelIdentity | None:
    """The identity of a model's first classifier (metrics and /health), None before loading."""
    if model is None:
        return None
    rows = as_row_model(model)
    return rows.identity_of(rows.names[0])

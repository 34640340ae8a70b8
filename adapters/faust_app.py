"""Conveniences over `adapters.moderation.Moderation` for callers written before it.

`build_app(settings, model)` is `Moderation(settings, model).standalone_app()`,
`worker_state(app)` is `Moderation.of(app)` and `run_worker(settings, factory)` is
`Moderation(settings, factory).run()`. New code uses `Moderation` directly.
"""

from __future__ import annotations

from collections.abc import Callable

import faust

from adapters.model_loading import ModelOrFactory
from adapters.moderation import Moderation
from moderation_worker.settings import Settings
from moderation_worker.verdicts import ProbabilityModel


def build_app(
    settings: Settings,
    model: ModelOrFactory,
    *,
    reload_settings: Callable[[], Settings] | None = None,
) -> faust.App:
    """The standalone app, with moderation installed (see `Moderation.standalone_app`)."""
    return Moderation(settings, model, reload_settings=reload_settings).standalone_app()


def worker_state(app: faust.App) -> Moderation:
    """The `Moderation` installed in `app` (see `Moderation.of`)."""
    return Moderation.of(app)


def run_worker(
    settings: Settings,
    model_factory: Callable[[], ProbabilityModel],
    *,
    reload_settings: Callable[[], Settings] | None = None,
) -> None:
    """Run the standalone worker until SIGTERM/SIGINT (see `Moderation.run`)."""
    Moderation(settings, model_factory, reload_settings=reload_settings).run()

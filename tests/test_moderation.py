"""`Moderation.install` into a user's own `faust.App`, without a broker: what it adds, what it
refuses (before changing anything), and how the app finds its moderation again.

tests/test_user_app_broker.py runs such an app through a real broker.
"""

from __future__ import annotations

import gc
import logging
import weakref

import faust
import pytest
from faust.sensors.prometheus import PrometheusMonitor, setup_prometheus_sensors
from prometheus_client import CollectorRegistry

from adapters.delivery_guard import DeliveryConfigError
from adapters.lifecycle import ModerationWorker
from adapters.moderation import AGENT_NAME, Moderation
from moderation_worker.settings import Settings, SettingsError
from moderation_worker.tools.trivial_scorer import TrivialScorer

BROKER = "kafka://127.0.0.1:1"  # nothing listens: nothing here connects


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PRODUCER_ACKS", "STREAM_WAIT_EMPTY", "WEB_BIND", "APP_ENV_PREFIX", "NO_CYTHON"):
        monkeypatch.delenv(name, raising=False)


def settings(**kw: object) -> Settings:
    return Settings(broker_url=BROKER, input_topic="comments", **kw)  # type: ignore[arg-type]


def moderation(**kw: object) -> Moderation:
    return Moderation(settings(), TrivialScorer(batch_size=8), **kw)  # type: ignore[arg-type]


def user_app(name: str = "user-app", **options: object) -> faust.App:
    """A team's app with an agent and a `/health` page of its own."""
    app = faust.App(name, broker=BROKER, **options)
    clicks = app.topic("clicks")

    @app.agent(clicks)
    async def count_clicks(stream: faust.StreamT) -> None:
        async for _ in stream:
            pass

    @app.page("/health")
    async def health(self: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return self.json({"app": name})

    return app


@pytest.mark.parametrize(
    ("option", "value", "shown"),
    [
        ("producer_acks", 1, "producer_acks=1"),
        ("producer_acks", 0, "producer_acks=0"),
        ("consumer_auto_offset_reset", "latest", "consumer_auto_offset_reset=latest"),
        ("stream_wait_empty", False, "stream_wait_empty=False"),
        ("processing_guarantee", "exactly_once", "processing_guarantee=exactly_once"),
    ],
)
def test_an_app_whose_own_options_weaken_delivery_is_refused_by_name_and_left_untouched(
    option: str, value: object, shown: str
) -> None:
    app = user_app(**{option: value})
    agents_before, views_before = set(app.agents), set(app.web.views)
    with pytest.raises(DeliveryConfigError) as err:
        moderation().install(app)
    message = str(err.value)
    assert "refusing to install moderation into app 'user-app'" in message
    assert f"{shown} (passed to faust.App) breaks at-least-once delivery" in message
    assert "set it where the faust.App is created" in message
    assert isinstance(err.value, SettingsError)
    assert set(app.agents) == agents_before and set(app.web.views) == views_before
    with pytest.raises(LookupError):
        Moderation.of(app)


def test_a_faust_variable_weakening_the_host_app_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRODUCER_ACKS", "0")
    with pytest.raises(DeliveryConfigError, match="set by environment variable PRODUCER_ACKS"):
        moderation().install(user_app())


def test_the_host_apps_other_options_are_its_owners_business(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The standalone worker refuses `WEB_BIND` overriding its loopback bind; a host app's web
    server, replication factor or timeouts are not moderation's to police."""
    monkeypatch.setenv("WEB_BIND", "0.0.0.0")
    app = user_app(topic_replication_factor=1, web_port=7100)
    moderation(web_prefix="/moderation").install(app)


def test_install_adds_moderation_beside_the_apps_own_agent_and_pages() -> None:
    app = user_app()
    installed = moderation(web_prefix="/moderation/").install(app)
    assert Moderation.of(app) is installed and installed.app is app
    assert {AGENT_NAME, *(a for a in app.agents if a != AGENT_NAME)} == set(app.agents)
    assert len(app.agents) == 2
    assert app.agents[AGENT_NAME].channel.get_topic_name() == "comments"
    assert {"/health", "/moderation/health", "/moderation/metrics"} <= set(app.web.views)
    assert (installed.health_path, installed.metrics_path) == (
        "/moderation/health",
        "/moderation/metrics",
    )
    assert isinstance(app.monitor, PrometheusMonitor)  # Faust's sensor feeds our registry
    assert app.conf.Worker is ModerationWorker  # `app.main()` gets SIGTERM grace and SIGHUP
    body, status = installed.health()
    assert status == 503 and body["status"] == "starting"


def test_paths_the_app_already_serves_are_refused_with_the_way_out() -> None:
    app = user_app()
    with pytest.raises(ValueError, match=r"already serves /health: pass .*web_prefix"):
        moderation().install(app)
    assert AGENT_NAME not in app.agents
    moderation(web_prefix="/moderation").install(app)  # the fix the message names


def test_one_moderation_per_app_and_one_app_per_moderation() -> None:
    app = user_app()
    first = moderation(web_prefix="/m").install(app)
    with pytest.raises(RuntimeError, match="already installed in app 'user-app'"):
        moderation(web_prefix="/other").install(app)
    with pytest.raises(RuntimeError, match="one Moderation per app"):
        first.install(user_app("another-app"))


def test_an_apps_own_prometheus_sensor_is_kept() -> None:
    app = user_app()
    setup_prometheus_sensors(app, pattern="/app-metrics", registry=CollectorRegistry())
    theirs = app.monitor
    moderation(web_prefix="/moderation").install(app)
    assert app.monitor is theirs and "/moderation/metrics" in app.web.views


def test_an_apps_own_worker_class_is_kept_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    class TheirWorker(faust.Worker):
        pass

    app = user_app(Worker=TheirWorker)
    with caplog.at_level(logging.WARNING, logger="moderation_worker.worker"):
        moderation(web_prefix="/moderation").install(app)
    assert app.conf.Worker is TheirWorker
    assert any("subclass adapters.lifecycle.ModerationWorker" in r.message for r in caplog.records)


def test_sighup_through_the_worker_reloads_the_installed_threshold(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "threshold.toml"
    path.write_text("threshold = 0.3\n")
    app = user_app()
    installed = Moderation(
        settings(threshold_file=path), TrivialScorer(), web_prefix="/moderation"
    ).install(app)
    path.write_text("threshold = 0.7\n")
    ModerationWorker(app, quiet=True)._on_sighup()
    assert installed.threshold() == 0.7


def test_the_registry_does_not_keep_an_app_alive() -> None:
    app = Moderation(settings(app_id="mw-freed"), TrivialScorer()).standalone_app()
    gone = weakref.ref(app)
    del app
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("prefix", ["/a?b", "/a b"])
def test_a_prefix_that_is_not_a_plain_path_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="not a plain URL path"):
        moderation(web_prefix=prefix)

"""Refuse to start with a Faust configuration that silently weakens at-least-once delivery.

Faust reads its own environment variables (`PRODUCER_ACKS`, `STREAM_WAIT_EMPTY`, ...) and they
win over the values `Moderation.standalone_app()` passes to `faust.App`, without a word; an app
that moderation is installed into (`Moderation.install`) carries its owner's options too. So,
before anything is added to the app, `check_delivery_config()` reads back the *effective*
`app.conf` and refuses values that break the worker's promise (every comment ends as a verdict
or a dead letter before its offset commits), naming the setting, its value and where it came
from.

What is checked, and why:

* `producer_acks` must be -1 (all): with 0 or 1 the broker can acknowledge a verdict it then
  loses (0: never stored at all), and the pipeline acks the comment because "published";
* `consumer_auto_offset_reset` must be 'earliest': a new group (or one whose offsets expired)
  would otherwise start at the end of the topic and never score what was already there;
* `stream_wait_empty` must be true: rebalances and shutdowns wait for in-flight batches to be
  acknowledged before committing and handing partitions over (the design relies on it);
* `processing_guarantee` must equal the settings' value: the sink picks transactional ids from
  the settings, so an override leaves producer and consumer disagreeing about transactions;
* Faust's compiled stream iterator must be in use (`faust._cython.streams` importable, `NO_CYTHON`
  unset): the pure-Python iterator acks events it skips (those of an older consumer generation
  after a rebalance) even on a `noack()` stream, so an offset could commit unscored.

Not checked, on purpose: `broker_commit_every` / `broker_commit_interval` (acks leave in arrival
order, so committing more or less often moves no commit past an unpublished event);
`stream_buffer_maxsize` (flow control only); `consumer_max_fetch_size` (a batch larger than it
stops the fetcher, which stops the worker: loud, nothing skipped); auto-commit (Faust exposes no
setting: it always passes `enable_auto_commit=False` to a worker's aiokafka consumer).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import faust

from adapters.options import faust_options
from moderation_worker.settings import Settings, SettingsError

AT_LEAST_ONCE = "at-least-once delivery"


class DeliveryConfigError(SettingsError):
    """The effective Faust configuration would break at-least-once delivery; the message names
    each offending value and where it came from."""


@dataclass(frozen=True)
class _Rule:
    setting: str
    ok: Callable[[Any, Settings], bool]
    want: Callable[[Settings], str]
    why: str


def _guarantee(value: Any) -> str:
    return str(getattr(value, "value", value))


RULES: tuple[_Rule, ...] = (
    _Rule(
        "producer_acks",
        lambda v, s: v == -1,
        lambda s: "-1 (all)",
        "the broker may acknowledge a verdict it does not keep, and the comment is then "
        "acknowledged as published",
    ),
    _Rule(
        "consumer_auto_offset_reset",
        lambda v, s: v == "earliest",
        lambda s: "'earliest'",
        "a new consumer group would start at the end of the topic and skip unscored comments",
    ),
    _Rule(
        "stream_wait_empty",
        lambda v, s: v is True,
        lambda s: "true",
        "rebalances and shutdowns would stop waiting for in-flight batches to be acknowledged",
    ),
    _Rule(
        "processing_guarantee",
        lambda v, s: _guarantee(v) == s.processing_guarantee,
        lambda s: f"{s.processing_guarantee!r} (MODERATION_PROCESSING_GUARANTEE)",
        "the verdict producer and the consumer would disagree about transactions",
    ),
)


def env_variable(conf: Any, setting: str) -> str | None:
    """The environment variable Faust took `setting` from, or None when the value came from code.

    Honours Faust's `APP_ENV_PREFIX` / `env_prefix`, as `Settings.getenv` does.
    """
    param = type(conf).SETTINGS.get(setting)
    env_name = getattr(param, "env_name", None)
    if not env_name:
        return None
    prefix = getattr(conf, "_env_prefix", None)
    name = f"{prefix.rstrip('_')}_{env_name}" if prefix else env_name
    return name if conf.env.get(name) is not None else None


def _problem(
    setting: str, value: Any, source: str | None, want: str, why: str, host_app: bool
) -> str:
    where = f"set by environment variable {source}" if source else "passed to faust.App"
    if source:
        fix = f"unset {source}"
    else:
        fix = "set it where the faust.App is created" if host_app else "fix faust_options()"
    return f"{setting}={value} ({where}) breaks {AT_LEAST_ONCE}: {why}; it must be {want}: {fix}"


def delivery_problems(conf: Any, settings: Settings, *, host_app: bool = False) -> list[str]:
    """Every reason the effective configuration `conf` (an `app.conf`) breaks the promise.

    `host_app`: `conf` is a user's app that moderation is installed into, not the app built
    from `faust_options()`: its other options are its owner's business, so only the delivery
    rules apply.
    """
    problems = []
    for rule in RULES:
        value = getattr(conf, rule.setting)
        if not rule.ok(value, settings):
            shown = _guarantee(value) if rule.setting == "processing_guarantee" else value
            problems.append(
                _problem(
                    rule.setting,
                    shown,
                    env_variable(conf, rule.setting),
                    rule.want(settings),
                    rule.why,
                    host_app,
                )
            )
    if not host_app:
        problems.extend(_override_problems(conf, settings, {r.setting for r in RULES}))
    problems.extend(_stream_iterator_problems())
    return problems


#: Options whose effective value legitimately differs from what was passed (normalised objects).
_NOT_COMPARED = frozenset({"broker_credentials", "datadir"})


def _override_problems(conf: Any, settings: Settings, covered: set[str]) -> list[str]:
    """Any other option `faust_options()` sets that one of Faust's environment variables
    replaced: `WEB_BIND=0.0.0.0` would open the web server that `web_bind` keeps on loopback,
    `TOPIC_REPLICATION_FACTOR=1` would undo `topic_replication_factor`. Settings belong in
    `MODERATION_*`, where they are validated and shown by `moderation-worker config`."""
    problems = []
    for setting, passed in faust_options(settings).items():
        if setting in covered or setting in _NOT_COMPARED:
            continue
        source = env_variable(conf, setting)
        if source is None:
            continue
        param = type(conf).SETTINGS.get(setting)
        try:
            wanted = param.to_python(conf, passed) if param is not None else passed
        except Exception:  # a value Faust cannot normalise: compare as given
            wanted = passed
        value = getattr(conf, setting)
        if value != wanted:
            problems.append(
                f"{setting}={value} (set by environment variable {source}) overrides the "
                f"worker's {wanted}; configure it with the MODERATION_* setting and unset {source}"
            )
    return problems


def _stream_iterator_problems() -> list[str]:
    import faust.streams as streams

    why = (
        "Faust's pure-Python stream iterator acks the events it skips (an older consumer "
        "generation's, after a rebalance) even on a noack stream, so their offsets can commit "
        "unscored"
    )
    if os.environ.get("NO_CYTHON") or streams.NO_CYTHON:
        return [
            f"NO_CYTHON is set (environment variable NO_CYTHON) and breaks {AT_LEAST_ONCE}: "
            f"{why}; unset NO_CYTHON"
        ]
    if streams._CStreamIterator is None:
        return [
            f"faust._cython.streams cannot be imported, which breaks {AT_LEAST_ONCE}: {why}; "
            "install a faust-streaming wheel with its compiled extensions"
        ]
    return []


def check_delivery_config(app: faust.App, settings: Settings, *, host_app: bool = False) -> None:
    """Raise `DeliveryConfigError` if `app`'s effective configuration breaks at-least-once."""
    check_delivery_conf(app.conf, settings, host_app=host_app)


def check_delivery_conf(conf: Any, settings: Settings, *, host_app: bool = False) -> None:
    """`check_delivery_config` for a bare `faust.Settings` (no app needed)."""
    problems = delivery_problems(conf, settings, host_app=host_app)
    if problems:
        what = f"to install moderation into app {conf.id!r}" if host_app else "to start the worker"
        raise DeliveryConfigError(f"refusing {what}:\n  " + "\n  ".join(problems))


def preflight(settings: Settings) -> None:
    """The same check before anything slow happens (the CLI runs it before loading the model)."""
    check_delivery_conf(faust.Settings(settings.app_id, **faust_options(settings)), settings)

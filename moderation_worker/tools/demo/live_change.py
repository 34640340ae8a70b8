"""The live change halfway through the demo: one control record published while the stream runs,
and the worker's own word (`/health`) that it decides under it before the rest is produced.

The worker reads the control topic outside its consumer group and swaps in the new state at
the next batch boundary; `/health` shows the version in force. Waiting for it before producing
the second half makes the split exact: the first half decided under the old version, the second
under the new one, with nothing in between (a real operator does not wait, and the verdicts
still name the version each one was decided under).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from adapters.control_topic import publish_control
from moderation_worker.settings import Settings
from moderation_worker.tools.demo.config import DemoError, LiveChange
from moderation_worker.tools.demo.progress import Console
from moderation_worker.tools.worker_process import WorkerProcess


@dataclass
class AppliedChange:
    """What the demo published, when, and the worker's policy before and after it."""

    key: str
    classifier: str
    community: str | None
    threshold: float
    topic: str
    offset: int
    version_before: int | None
    version_after: int
    after_events: int  # events produced (and accounted for) before it was published
    seconds_to_apply: float  # from publishing until the worker's /health showed it
    policy_before: dict[str, Any] = field(default_factory=dict)
    policy_after: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _policy(worker: WorkerProcess) -> dict[str, Any]:
    worker.check_alive()
    got = await asyncio.to_thread(worker.health)
    return (got[1].get("policy") if got else None) or {}


async def apply_live_change(
    settings: Settings,
    change: LiveChange,
    worker: WorkerProcess,
    *,
    after_events: int,
    console: Console,
    timeout_s: float = 30.0,
) -> AppliedChange:
    """Publish `change` to the worker's control topic and wait until the worker applied it.

    Raises `DemoError` when publishing fails or the worker does not show the new version in
    `timeout_s` (e.g. it rejected the record: its log says why), `WorkerExited` if it died.
    """
    from aiokafka.errors import KafkaError

    topic = settings.control_topic
    if topic is None:
        raise DemoError("the worker has no control topic; the live change needs one")
    before = await _policy(worker)
    key, value = change.record()
    console.say(
        f"{after_events} events accounted for: publishing {change.key} = {change.threshold:g} "
        f"to {topic!r} (control version now {before.get('version')})"
    )
    started = time.monotonic()
    try:
        offset = await publish_control(settings, topic, key, value)
    except (KafkaError, TimeoutError) as exc:
        raise DemoError(f"publishing the live change to {topic!r} failed: {exc!r}") from exc
    want = offset + 1
    after = await _policy(worker)
    while (after.get("version") or 0) < want:
        if time.monotonic() - started > timeout_s:
            raise DemoError(
                f"the worker did not apply control record {change.key} (offset {offset}) within "
                f"{timeout_s:g} s; its control version is {after.get('version')}; see its log"
            )
        await asyncio.sleep(0.05)
        after = await _policy(worker)
    seconds = time.monotonic() - started
    console.say(f"worker decides under control version {after['version']} ({seconds:.2f} s)")
    return AppliedChange(
        key=change.key,
        classifier=change.classifier,
        community=change.community,
        threshold=change.threshold,
        topic=topic,
        offset=offset,
        version_before=before.get("version"),
        version_after=int(after["version"]),
        after_events=after_events,
        seconds_to_apply=seconds,
        policy_before=before,
        policy_after=after,
    )

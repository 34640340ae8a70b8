"""Acknowledgements in arrival order per partition, whatever order batches finish in.

Kafka commits one offset per partition: acknowledging an event while an earlier one of its
partition is still being scored would let the commit skip the earlier one if the worker died.
With one queue per length bucket (`batching.BucketedBatcher`), a batch of short comments can
finish before a batch holding an older long comment, so the pipeline hands finished events
here and acknowledges only what this ledger releases: for each partition, the longest run of
finished events from its oldest unfinished one on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

from moderation_worker.batching import InputEvent

H = TypeVar("H")

PartitionKey = tuple[str, int]


class AckLedger(Generic[H]):
    """Tracks every admitted event until it may be acknowledged.

    Example:
        ledger.admit(event)                 # when the event enters the pipeline
        for ready in ledger.finish(batch):  # once its batch's outcomes are published
            ack(ready)                      # in arrival order within each partition
    """

    def __init__(self) -> None:
        self._pending: dict[PartitionKey, deque[InputEvent[H]]] = {}
        self._finished: set[int] = set()  # id() of finished events still held back

    def __len__(self) -> int:
        """Events admitted and not yet released."""
        return sum(len(q) for q in self._pending.values())

    @property
    def held_back(self) -> int:
        """Events already finished but waiting for an older event of their partition."""
        return len(self._finished)

    def admit(self, event: InputEvent[H]) -> None:
        key = (event.source.topic, event.source.partition)
        self._pending.setdefault(key, deque()).append(event)

    def finish(self, events: Iterable[InputEvent[H]]) -> list[InputEvent[H]]:
        """Mark `events` finished; return every event that may now be acknowledged, each
        partition's in arrival order."""
        touched: list[PartitionKey] = []
        for event in events:
            key = (event.source.topic, event.source.partition)
            if key not in self._pending:
                raise KeyError(f"event at {event.source} was never admitted")
            self._finished.add(id(event))
            if key not in touched:
                touched.append(key)
        ready: list[InputEvent[H]] = []
        for key in touched:
            queue = self._pending[key]
            while queue and id(queue[0]) in self._finished:
                event = queue.popleft()
                self._finished.discard(id(event))
                ready.append(event)
            if not queue:
                del self._pending[key]
        return ready

"""A record batch the worker cannot decode stops it, naming the batch, with nothing of it acked.

Where the error surfaces: aiokafka decodes a fetched record batch lazily, in the consumer
thread, when `Fetcher.fetched_records()` iterates its `PartitionRecords`; a batch whose codec
library is missing raises `UnsupportedCodecError` there (the compiled and the pure-Python record
batches both ask `aiokafka.codec.has_<codec>()` first), and a corrupt batch raises
`CorruptRecordException` or the decompressor's own error. The exception carries no topic,
partition or offset. It reaches Faust's `Consumer._getmany()` in the app's loop, then
`_drain_messages`, whose fetcher task crashes and takes the worker down: the right outcome (no
record of that batch, or fetched behind it, is ever delivered, so none is acked and no commit
can pass it), but with a log line that does not say which batch, and a `/health` that never says
why.

So, two small hooks:

* `PartitionRecords._unpack_records` (aiokafka, once per process) re-raises any decode error as
  `UndecodableBatch`, which names topic, partition, offset and codec;
* the app's consumer `_getmany` (per app) sees `UndecodableBatch`, logs it with those fields,
  and calls the `crash` it was installed with (`Moderation.crash`), so `/health` answers 503
  with the short reason (for a few seconds, before the stop begins); Faust's own shutdown then
  stops the worker (exit code 1).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import faust
from aiokafka.consumer import fetcher as _aiokafka_fetcher
from aiokafka.errors import KafkaError, UnsupportedCodecError

log = logging.getLogger("moderation_worker.worker")

#: What stops the app with an error (`Moderation.crash`): `/health` shows the reason first.
Crash = Callable[[BaseException], Awaitable[None]]

#: The codec in the low three bits of a record batch's attributes.
CODECS = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}


class UndecodableBatch(KafkaError):
    """A fetched record batch could not be decoded; `offset` is the first record not delivered.

    `reason` is the short code `/health` shows (`unsupported_codec` when the codec's library is
    missing, else `undecodable_batch`); `detail` is the underlying error, for the log.
    """

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        codec: str,
        cause: BaseException,
        batch_offsets: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(topic, partition, offset, codec)
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.codec = codec
        self.batch_offsets = batch_offsets
        self.detail = _short_detail(cause)
        missing_codec = isinstance(cause, UnsupportedCodecError)
        self.reason = "unsupported_codec" if missing_codec else "undecodable_batch"

    def __str__(self) -> str:
        return (
            f"cannot decode the record batch at topic {self.topic} partition {self.partition} "
            f"offset {self.offset} (codec {self.codec}): {self.detail}"
        )


def _short_detail(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    name = type(exc).__name__
    if text.startswith(f"{name}: "):  # aiokafka's KafkaError already prefixes its class name
        text = text[len(name) + 2 :]
    return f"{name}: {text}"[:300] if text else name


class _LastBatch:
    """Wraps aiokafka's `MemoryRecords`, remembering the batch it handed out last."""

    __slots__ = ("_records", "batch")

    def __init__(self, records: Any) -> None:
        self._records = records
        self.batch: Any = None

    def has_next(self) -> bool:
        return bool(self._records.has_next())

    def next_batch(self) -> Any:
        self.batch = self._records.next_batch()
        return self.batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._records, name)


_original_unpack_records = _aiokafka_fetcher.PartitionRecords._unpack_records


def _guarded_unpack_records(self: Any) -> Iterator[Any]:
    # Runs on the first next(), before the original body reads `self._records`.
    spy = _LastBatch(self._records)
    self._records = spy
    try:
        yield from _original_unpack_records(self)
    except Exception as exc:
        raise _undecodable(self, spy.batch, exc) from exc


def _undecodable(records: Any, batch: Any, exc: Exception) -> UndecodableBatch:
    tp = records._tp
    position = int(records.next_fetch_offset)
    if batch is None:
        return UndecodableBatch(tp.topic, tp.partition, position, "unknown", exc)
    compression = getattr(batch, "compression_type", None)
    codec = CODECS.get(compression, f"{compression!r}") if compression is not None else "unknown"
    first, end = int(batch.base_offset), int(batch.next_offset)
    return UndecodableBatch(
        tp.topic, tp.partition, max(first, position), codec, exc, batch_offsets=(first, end - 1)
    )


def install_decode_hook() -> None:
    """Make aiokafka raise `UndecodableBatch` (with topic/partition/offset/codec); idempotent."""
    records_cls = _aiokafka_fetcher.PartitionRecords
    if records_cls._unpack_records is not _guarded_unpack_records:
        records_cls._unpack_records = _guarded_unpack_records


def install(app: faust.App, crash: Crash) -> None:
    """Stop `app`'s worker through `crash` on an undecodable batch (call once, before it starts).

    The guard covers the app's whole consumer, so a bad batch of any of its topics is named.
    """
    install_decode_hook()
    new_consumer = app._new_consumer

    def _new_guarded_consumer() -> Any:
        consumer = new_consumer()
        _guard_consumer(consumer, crash)
        return consumer

    app._new_consumer = _new_guarded_consumer  # type: ignore[method-assign]
    if app._consumer is not None:  # already built: guard it in place
        _guard_consumer(app._consumer, crash)


def _guard_consumer(consumer: Any, crash: Crash) -> None:
    getmany = consumer._getmany

    async def _getmany(*args: Any, **kwargs: Any) -> Any:
        try:
            return await getmany(*args, **kwargs)
        except UndecodableBatch as exc:
            await on_undecodable(exc, crash)
            raise

    consumer._getmany = _getmany


async def on_undecodable(exc: UndecodableBatch, crash: Crash) -> None:
    """Log the batch and crash the worker (health: 503 with the reason, then the stop)."""
    log.error(
        "record batch cannot be decoded; stopping the worker, nothing of it is acknowledged",
        extra={
            "topic": exc.topic,
            "partition": exc.partition,
            "offset": exc.offset,
            "codec": exc.codec,
            "batch_offsets": list(exc.batch_offsets) if exc.batch_offsets else None,
            "reason": exc.reason,
            "error": exc.detail,
        },
    )
    await crash(exc)

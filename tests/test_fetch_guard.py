"""The decode hook without a broker: aiokafka's own record batches, decoded as the fetcher does.

tests/test_compression_broker.py runs the whole path (worker process, broker, `/health`, commits);
this pins down what the hook reports for a batch, in milliseconds.
"""

from __future__ import annotations

import aiokafka.codec
import pytest
from aiokafka.consumer.fetcher import READ_UNCOMMITTED, PartitionRecords
from aiokafka.errors import UnsupportedCodecError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition

from adapters.fetch_guard import UndecodableBatch, install_decode_hook

CODEC_ID = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


def batch(codec: str, base_offset: int, n: int) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=CODEC_ID[codec],
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for i in range(n):
        builder.append(i, timestamp=None, key=b"k", value=b"v%d" % (base_offset + i), headers=[])
    data = bytearray(builder.build())
    data[0:8] = base_offset.to_bytes(8, "big")  # the broker assigns the batch's base offset
    return bytes(data)


def records(data: bytes, fetch_offset: int) -> PartitionRecords:
    tp = TopicPartition("comments", 3)
    return PartitionRecords(
        tp, MemoryRecords(data), [], fetch_offset, None, None, False, READ_UNCOMMITTED
    )


@pytest.mark.parametrize("codec", sorted(CODEC_ID))
def test_every_codec_decodes(codec: str) -> None:
    install_decode_hook()
    values = [r.value for r in records(batch(codec, 0, 3), 0)]
    assert values == [b"v0", b"v1", b"v2"]


def test_a_batch_without_its_codec_library_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    install_decode_hook()
    data = batch("gzip", 40, 2) + batch("snappy", 42, 5)
    monkeypatch.setattr(aiokafka.codec, "has_snappy", lambda: False)
    it = records(data, 41)  # a fetch from inside the first batch
    assert next(it).offset == 41
    with pytest.raises(UndecodableBatch) as err:
        list(it)
    exc = err.value
    assert (exc.topic, exc.partition, exc.offset, exc.codec) == ("comments", 3, 42, "snappy")
    assert exc.batch_offsets == (42, 46) and exc.reason == "unsupported_codec"
    assert isinstance(exc.__cause__, UnsupportedCodecError)
    assert str(exc) == (
        "cannot decode the record batch at topic comments partition 3 offset 42 (codec snappy): "
        "UnsupportedCodecError: Libraries for snappy compression codec not found"
    )


def test_a_fetch_starting_inside_the_bad_batch_names_the_first_undelivered_offset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install_decode_hook()
    data = batch("zstd", 10, 5)
    monkeypatch.setattr(aiokafka.codec, "has_zstd", lambda: False)
    with pytest.raises(UndecodableBatch) as err:
        list(records(data, 12))
    assert (err.value.offset, err.value.batch_offsets, err.value.codec) == (12, (10, 14), "zstd")


def test_a_corrupt_compressed_batch_is_named_too() -> None:
    install_decode_hook()
    data = bytearray(batch("lz4", 7, 3))
    data[-8:] = b"\x00" * 8  # damage the compressed payload (CRCs are not checked here)
    with pytest.raises(UndecodableBatch) as err:
        list(records(bytes(data), 7))
    assert (err.value.offset, err.value.codec, err.value.reason) == (7, "lz4", "undecodable_batch")

"""Records the Kafka client cannot parse, read from their bytes.

aiokafka decodes every header name as UTF-8 while it iterates a record batch, always from the
batch's first record (a broker serves whole batches, whatever offset is asked for). Kafka does
not check header names, and producers other than Java's write any bytes: one name that is not
UTF-8 raises UnicodeDecodeError out of `getmany`, and no record of its batch from there on can
ever come through the client. `read_past_undecodable` fetches such a partition's batches raw:
those the client parses are taken as it gives them, and the first one it cannot is read here by
the record format (v2), header names decoded with replacement, the records whose names are not
UTF-8 set apart.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer
from aiokafka.codec import gzip_decode, lz4_decode, snappy_decode, zstd_decode
from aiokafka.errors import CorruptRecordException, NoError, for_code
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.default_records import DefaultRecordBase
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import decode_varint
from aiokafka.structs import ConsumerRecord, TopicPartition

Record: TypeAlias = ConsumerRecord[bytes, bytes]  # shared.bus.consumer's, which imports this
Found: TypeAlias = tuple[Record, UnicodeDecodeError | None]  # with its names' error, if any

READ_UNCOMMITTED = 0  # the isolation the consumers read with (aiokafka's default)
# At most, for the records to come: a broker answers as soon as it has them. Not 0: Tansu then
# answers at once with no partition at all.
FETCH_WAIT_MS = 500
_BATCH_HEAD = struct.Struct(">qi")  # any batch: base offset, then the length of the rest
_COUNT = struct.Struct(">i")  # a v2 batch's record count, at byte 57; its records from byte 61
_COUNT_AT, _RECORDS_AT = 57, 61
_DECOMPRESS: dict[int, Callable[[bytes], bytes]] = {
    DefaultRecordBase.CODEC_GZIP: gzip_decode,
    DefaultRecordBase.CODEC_SNAPPY: snappy_decode,
    DefaultRecordBase.CODEC_LZ4: lz4_decode,
    DefaultRecordBase.CODEC_ZSTD: zstd_decode,
}


@dataclass
class Read:
    """A partition's records from an offset on: those that can be handled, in order; those
    whose header names are not UTF-8, with the error; the offset after all of them."""

    next_offset: int
    records: list[Record] = field(default_factory=list)
    undecodable: list[tuple[Record, UnicodeDecodeError]] = field(default_factory=list)


async def read_past_undecodable(
    consumer: AIOKafkaConsumer, partition: TopicPartition, offset: int, max_bytes: int
) -> Read:
    """The partition's records from `offset` through the first batch the client cannot parse
    (through all that one fetch brings, if none)."""
    return parse_past_undecodable(
        partition, await _fetch(consumer, partition, offset, max_bytes), offset
    )


def parse_past_undecodable(partition: TopicPartition, raw: bytes, offset: int) -> Read:
    """`read_past_undecodable` of a fetch's bytes (a partition's record batches)."""
    read = Read(next_offset=offset)
    for whole in _batches(raw):
        batch = MemoryRecords(whole).next_batch()
        if batch is None or not batch.validate_crc():  # the consumer's restart fetches again
            raise CorruptRecordException(f"{partition}: a corrupt batch at offset {offset}")
        try:
            found = _parsed(partition, batch)
            undecodable = False
        except UnicodeDecodeError:
            found, undecodable = list(_leniently(partition, batch, whole)), True
        for record, error in found:
            if record.offset < offset:
                continue  # before the offset asked for, in the same batch
            if error is None:
                read.records.append(record)
            else:
                read.undecodable.append((record, error))
        read.next_offset = max(offset, batch.next_offset)
        if undecodable:
            break
    return read


def _parsed(partition: TopicPartition, batch: Any) -> list[Found]:
    """A batch's records as the client parses them (UnicodeDecodeError if it cannot)."""
    if getattr(batch, "is_control_batch", False):
        return []  # transaction markers, never given to the client's user either
    return [
        (_record(partition, r.offset, r.timestamp, r.timestamp_type, r.key, r.value,
                 r.headers, r.checksum), None)
        for r in batch
    ]  # fmt: skip


def _leniently(partition: TopicPartition, batch: Any, whole: bytes) -> Iterator[Found]:
    """A v2 batch's records read by the format (Kafka's DefaultRecordBatch), header names
    decoded with replacement."""
    body = whole[_RECORDS_AT:]
    if batch.compression_type:
        body = _DECOMPRESS[batch.compression_type](body)
    buffer = bytearray(body)
    (count,) = _COUNT.unpack_from(whole, _COUNT_AT)
    pos = 0
    for _ in range(count):
        length, pos = decode_varint(buffer, pos)
        end = pos + length
        pos += 1  # attributes: none defined for a record
        timestamp_delta, pos = decode_varint(buffer, pos)
        offset_delta, pos = decode_varint(buffer, pos)
        key, pos = _bytes(buffer, pos)
        value, pos = _bytes(buffer, pos)
        header_count, pos = decode_varint(buffer, pos)
        headers: list[tuple[str, bytes | None]] = []
        error = None
        for _ in range(header_count):
            name, pos = _bytes(buffer, pos)
            header_value, pos = _bytes(buffer, pos)
            try:
                text = (name or b"").decode()
            except UnicodeDecodeError as exc:
                text, error = (name or b"").decode("utf-8", "replace"), exc
            headers.append((text, header_value))
        pos = end
        timestamp = (
            batch.max_timestamp
            if batch.timestamp_type == DefaultRecordBase.LOG_APPEND_TIME
            else batch.first_timestamp + timestamp_delta
        )
        offset = batch.base_offset + offset_delta
        yield (
            _record(partition, offset, timestamp, batch.timestamp_type, key, value, headers),
            error,
        )


def _record(
    partition: TopicPartition,
    offset: int,
    timestamp: int,
    timestamp_type: int,
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes | None]],
    checksum: int | None = None,
) -> Record:
    """A consumer record as aiokafka's fetcher makes one."""
    return ConsumerRecord(
        partition.topic,
        partition.partition,
        offset,
        timestamp,
        timestamp_type,
        key,
        value,
        checksum,
        len(key) if key is not None else -1,
        len(value) if value is not None else -1,
        tuple(headers),
    )


def _bytes(buffer: bytearray, pos: int) -> tuple[bytes | None, int]:
    """A varint length and that many bytes; a negative length is null."""
    length, pos = decode_varint(buffer, pos)
    if length < 0:
        return None, pos
    return bytes(buffer[pos : pos + length]), pos + length


def _batches(raw: bytes) -> Iterator[bytes]:
    """The whole batches in a fetched partition's bytes (a fetch may end in part of one)."""
    pos = 0
    while pos + _BATCH_HEAD.size <= len(raw):
        _, length = _BATCH_HEAD.unpack_from(raw, pos)
        end = pos + _BATCH_HEAD.size + length
        if end > len(raw):
            return
        yield raw[pos:end]
        pos = end


async def _fetch(
    consumer: AIOKafkaConsumer, partition: TopicPartition, offset: int, max_bytes: int
) -> bytes:
    """The partition's record batches from `offset`, as its leader serves them: asked on the
    consumer's own connections (aiokafka has no public raw read). Nothing if the leader had
    nothing to give; the consumer's next fetch comes back here."""
    client = consumer._client
    leader = client.cluster.leader_for_partition(partition)
    request = FetchRequest(
        FETCH_WAIT_MS,
        1,
        max_bytes,
        READ_UNCOMMITTED,
        [(partition.topic, [(partition.partition, offset, max_bytes)])],
    )
    response = await client.send(leader, request)
    for _, partitions in response.topics:
        for _, code, _, *data in partitions:
            error = for_code(code)
            if error is not NoError:
                raise error(f"fetching {partition} at {offset}")
            return bytes(data[-1] or b"")
    return b""

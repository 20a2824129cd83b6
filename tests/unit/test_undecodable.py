"""Reading a partition's bytes past a record the client cannot parse: the records the client
parses come as it gives them, those of the batch it cannot are read by the format (compressed
too) to the same records, and only the one whose header name is not UTF-8 is set apart."""

from __future__ import annotations

from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition

from shared.bus.undecodable import Record, parse_past_undecodable
from tests.support import NOT_UTF8, record_batch

PARTITION = TopicPartition("partner.leads.v1", 3)


def as_the_client_reads(raw: bytes) -> list[tuple[int, int, int, bytes | None, bytes | None]]:
    batch = MemoryRecords(raw).next_batch()
    assert batch is not None
    return [(r.offset, r.timestamp, r.timestamp_type, r.key, r.value) for r in batch]


def fields(records: list[Record]) -> list[tuple[int, int, int, bytes | None, bytes | None]]:
    return [(r.offset, r.timestamp, r.timestamp_type, r.key, r.value) for r in records]


def test_a_fetch_is_read_through_the_batch_the_client_cannot_parse() -> None:
    first = record_batch([b"a", b"b", b"c"], None, compression=1, base_offset=10)
    bad = record_batch([b"before", b"bad", b"after"], 1, compression=1, base_offset=13)
    twin = record_batch([b"before", b"bad", b"after"], None, compression=1, base_offset=13)
    later = record_batch([b"d"], None, base_offset=16)
    raw = first + bad + later + later[:20]  # a fetch may end in part of a batch

    read = parse_past_undecodable(PARTITION, raw, 11)

    # From the offset asked for, through the bad batch: not the one after it.
    assert [r.value for r in read.records] == [b"b", b"c", b"before", b"after"]
    assert read.next_offset == 16
    # The records read by the format are what the client gives for the same batch unbroken.
    whole = as_the_client_reads(first)[1:] + [
        f for f in as_the_client_reads(twin) if f[4] != b"bad"
    ]
    assert fields(read.records) == whole
    assert all(r.topic == PARTITION.topic and r.partition == 3 for r in read.records)
    assert read.records[-1].headers == (("x-trace", b"v"),)
    assert read.records[-1].serialized_value_size == len(b"after")
    [(undecodable, error)] = read.undecodable
    assert (undecodable.offset, undecodable.value) == (14, b"bad")
    assert undecodable.headers == ((NOT_UTF8.decode("utf-8", "replace"), b"v"),)
    assert isinstance(error, UnicodeDecodeError)


def test_from_the_undecodable_record_on() -> None:
    bad = record_batch([b"before", b"bad", b"after"], 1, base_offset=4)
    read = parse_past_undecodable(PARTITION, bad, 5)
    assert [r.value for r in read.records] == [b"after"]
    assert [r.offset for r, _ in read.undecodable] == [5]
    assert read.next_offset == 7


def test_nothing_fetched_moves_nothing() -> None:
    assert parse_past_undecodable(PARTITION, b"", 8).next_offset == 8

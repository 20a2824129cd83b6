"""A fetch of several partitions in the order the broker took its records
(`shared.bus.consumer.in_arrival_order`): capture judges partner messages in it, so the partner
whose message came first holds a company's registration, whatever the partitions. Only the
broker's own timestamps (LogAppendTime) order them: a producer's could be backdated."""

from __future__ import annotations

from aiokafka.record.default_records import DefaultRecordBase
from aiokafka.structs import ConsumerRecord, TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from shared.bus.consumer import Record, in_arrival_order

CREATE_TIME, LOG_APPEND_TIME = DefaultRecordBase.CREATE_TIME, DefaultRecordBase.LOG_APPEND_TIME


def record(partition: int, offset: int, timestamp: int, stamped: int = LOG_APPEND_TIME) -> Record:
    return ConsumerRecord("t", partition, offset, timestamp, stamped, None, b"", None, 0, 0, [])


def test_records_of_several_partitions_come_in_the_order_they_were_taken() -> None:
    batch = {
        TopicPartition("t", 0): [record(0, 10, 105), record(0, 11, 130)],
        TopicPartition("t", 3): [record(3, 4, 100), record(3, 5, 120), record(3, 6, 140)],
    }
    assert [(r.partition, r.offset) for r in in_arrival_order(batch)] == [
        (3, 4), (0, 10), (3, 5), (0, 11), (3, 6),
    ]  # fmt: skip


@given(st.lists(st.lists(st.integers(0, 50), max_size=8), min_size=1, max_size=6))
def test_each_partition_keeps_its_own_order_even_when_its_clock_steps_back(
    stamps: list[list[int]],
) -> None:
    batch = {
        TopicPartition("t", p): [record(p, n, t) for n, t in enumerate(times)]
        for p, times in enumerate(stamps)
    }
    merged = in_arrival_order(batch)
    assert sorted((r.partition, r.offset) for r in merged) == sorted(
        (r.partition, r.offset) for records in batch.values() for r in records
    )
    for p in batch:
        offsets = [r.offset for r in merged if r.partition == p.partition]
        assert offsets == sorted(offsets)


def test_a_producer_s_own_timestamps_leave_the_fetch_in_its_order() -> None:
    batch = {
        TopicPartition("t", 0): [record(0, 10, 105, CREATE_TIME)],
        TopicPartition("t", 3): [record(3, 4, 1, CREATE_TIME)],  # backdated by its producer
    }
    assert [(r.partition, r.offset) for r in in_arrival_order(batch)] == [(0, 10), (3, 4)]

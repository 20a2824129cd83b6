"""The relays' and producers' partitioner: the partition any Kafka client gives a key."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from shared.bus.kafka import murmur2, partition_for


@given(st.binary(max_size=200))
def test_murmur2_is_aiokafkas(key: bytes) -> None:
    assert murmur2(key) == aiokafka_murmur2(key)


@given(st.binary(max_size=80), st.integers(min_value=1, max_value=64))
def test_a_key_gets_the_partition_aiokafka_would_give_it(key: bytes, count: int) -> None:
    partitions = list(range(count))
    assert partition_for(key, partitions, partitions) == DefaultPartitioner()(
        key, partitions, partitions
    )


def test_known_values_of_the_java_client() -> None:
    # From the Java client's tests (org.apache.kafka.common.utils.UtilsTest.testMurmur2),
    # as signed 32-bit integers.
    cases = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
             b"a-little-bit-longer-string": -1486304829,
             b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
             b"abc": 479470107}  # fmt: skip
    for key, signed in cases.items():
        assert murmur2(key) == signed & 0xFFFFFFFF


def test_a_key_of_none_goes_to_an_available_partition() -> None:
    assert partition_for(None, [0, 1, 2], [2]) == 2
    assert partition_for(None, [0, 1, 2], []) in (0, 1, 2)

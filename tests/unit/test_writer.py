"""The batch writer: what waits while the writer is busy goes in its next batch, the same key
never twice in one batch, and each caller gets its own outcome."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from shared.writer import BatchWriter


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.release = threading.Event()

    def run(self, items: Sequence[tuple[str, int]]) -> list[int | Exception]:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.release.wait(5)  # the first batch is slow: the others queue behind it
        return [ValueError(key) if n < 0 else n * 10 for key, n in items]


async def test_what_waits_goes_together_and_a_key_never_twice() -> None:
    recorder = Recorder()
    writer = BatchWriter(recorder.run, lambda item: item[0], "test-writer")
    first = asyncio.create_task(writer.submit(("a", 1)))
    await asyncio.sleep(0.05)  # the writer is now busy with ("a", 1)
    later = [("b", 2), ("c", 3), ("b", 4), ("d", -1)]
    tasks = [asyncio.create_task(writer.submit(item)) for item in later]
    await asyncio.sleep(0.05)
    recorder.release.set()
    assert await first == 10
    assert [await t for t in tasks[:3]] == [20, 30, 40]
    with pytest.raises(ValueError, match="d"):
        await tasks[3]
    # ("b", 4) waited for ("b", 2) to be done: a batch never holds one key twice.
    assert recorder.batches == [[("a", 1)], [("b", 2), ("c", 3)], [("b", 4), ("d", -1)]]
    assert (writer.batches, writer.items) == (3, 5)
    writer.close()


async def test_a_failed_batch_fails_each_of_its_callers_and_the_writer_goes_on() -> None:
    database_up = False

    def run(items: Sequence[int]) -> list[int | Exception]:
        if not database_up:
            raise ConnectionError("database gone")
        return list(items)

    writer = BatchWriter(run, lambda item: item, "test-failing")
    results = await asyncio.gather(*(writer.submit(n) for n in range(3)), return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError] * 3
    database_up = True
    assert await writer.submit(7) == 7
    writer.close()

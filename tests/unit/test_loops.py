"""The bus's loops stay up (shared.bus.loops.retrying): a failed session runs again, a
CancelledError a library raised of its own included; the loop's own cancellation ends it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shared.bus import loops
from shared.bus.loops import retrying

log = logging.getLogger("test_loops")


async def test_a_failed_session_runs_again_a_foreign_cancelled_error_included(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loops, "FIRST_BACKOFF", 0.01)
    stop = asyncio.Event()
    sessions: list[str] = []
    failures: list[None] = []

    async def session() -> None:
        sessions.append("run")
        if len(sessions) == 1:
            raise ConnectionError("the broker is away")
        if len(sessions) == 2:
            raise asyncio.CancelledError  # as aiokafka's consumer.stop() raises one
        stop.set()

    await asyncio.wait_for(
        retrying(session, stop, log, "test", failed=lambda: failures.append(None)), 5
    )
    assert len(sessions) == 3 and len(failures) == 2


async def test_the_loops_own_cancellation_ends_it() -> None:
    started = asyncio.Event()

    async def session() -> None:
        started.set()
        await asyncio.sleep(60)

    task = asyncio.create_task(retrying(session, asyncio.Event(), log, "test"))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

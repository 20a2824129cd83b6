"""How the bus's long-running loops (the consumers, the relays) stay up: each session is tried
again after a failure, with a backoff, until the loop is stopped.

A failure is any exception, and also a CancelledError that is not this task being cancelled:
aiokafka raises some of its own (its consumer's `stop()`, aio-libs/aiokafka#647, see
shared.bus.kafka.stop_quietly). Taken for a cancellation, it would end the loop for good while
the service runs on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

FIRST_BACKOFF, LAST_BACKOFF = 0.2, 5.0  # seconds before the next session, doubling


def being_cancelled() -> bool:
    """Whether the running task is being cancelled (`Task.cancel`), as opposed to meeting a
    CancelledError that a library raised of its own."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def retrying(
    session: Callable[[], Awaitable[None]],
    stop: asyncio.Event,
    log: logging.Logger,
    what: str,
    again: str = "retrying",
    failed: Callable[[], None] | None = None,
) -> None:
    """Run `session` until `stop` is set; after a failure, log `<what> failed; <again> in …s` on
    the loop's own logger (the handbook's alert lines), call `failed`, and run it again after
    the backoff."""
    backoff = FIRST_BACKOFF
    while not stop.is_set():
        try:
            await session()
            backoff = FIRST_BACKOFF
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and being_cancelled():
                raise  # the loop is being stopped
            if failed is not None:
                failed()
            log.exception("%s failed; %s in %.1fs", what, again, backoff)
            await sleep_or_stop(stop, backoff)
            backoff = min(backoff * 2, LAST_BACKOFF)

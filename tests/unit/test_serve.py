"""A service's loops and its HTTP server (shared.runtime.serve): a loop that ends while the
service runs stops the service (LoopEnded; the process exits with LOOP_ENDED), so that whatever
runs it starts it afresh."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI

from shared.devstack import free_port
from shared.runtime import LOOP_ENDED, LoopEnded, serve


async def test_a_loop_that_ends_while_the_service_runs_ends_the_service() -> None:
    stopped: list[str] = []

    async def fails(_: asyncio.Event) -> None:
        await asyncio.sleep(0.3)
        raise asyncio.CancelledError  # as a library might raise of its own

    async def waits(stop: asyncio.Event) -> None:
        await stop.wait()
        stopped.append("waits")

    with pytest.raises(LoopEnded, match="fails: cancelled"):
        await asyncio.wait_for(serve(FastAPI(), free_port(), [fails, waits]), 20)
    assert stopped == ["waits"]  # the other loops were stopped as at any shutdown


async def test_a_service_stopped_stops_its_loops_without_the_loop_ended_exit() -> None:
    ran: list[str] = []

    async def runs(stop: asyncio.Event) -> None:
        ran.append("started")
        await stop.wait()
        ran.append("stopped")

    server = asyncio.create_task(serve(FastAPI(), free_port(), [runs]))
    await asyncio.sleep(1.0)
    server.cancel()  # stopped from outside: its loops end after it, which is no failure
    with pytest.raises(asyncio.CancelledError):
        await server
    assert ran == ["started", "stopped"]


def test_the_service_process_exits_with_loop_ended() -> None:
    program = (
        "import asyncio\n"
        "from fastapi import FastAPI\n"
        "from shared.devstack import free_port\n"
        "from shared.runtime import run_service, serve\n"
        "async def fails(stop):\n"
        "    await asyncio.sleep(0.3)\n"
        "    raise RuntimeError('a loop that ended')\n"
        "run_service(serve(FastAPI(), free_port(), [fails]))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60,
                          cwd=Path(__file__).parents[2])  # fmt: skip
    assert done.returncode == LOOP_ENDED, done.stderr.decode()[-2000:]

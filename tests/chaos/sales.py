"""The sales side of the load: reps moving opened opportunities A → B, some on to C, over
pipeline's HTTP API with the version they last saw; and an operator running `dealstream notify
tick --now` four days ahead, so reminders fire and are delivered while the faults go on."""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx

from services.pipeline.domain import opportunity_id_for
from shared.auth import Principal, Role, issue_token

log = logging.getLogger("chaos")
NEXT_STAGE = {"A": "B", "B": "C"}
AHEAD = timedelta(days=4)  # follow-ups of stage A (3 days) are due, escalations of majors too
TICK_WITHIN = 90.0  # seconds a tick may take before it is killed


class StageMover:
    """`rate` commands a second on opportunities of accepted leads. A command pipeline did not
    answer (killed, or the database away) is not repeated blindly: the opportunity is read
    again, and the next command carries the version read; a stale version is read again too."""

    def __init__(self, url: str, token_secret: str, rng: random.Random,
                 leads: Callable[[], list[uuid.UUID]], rate: float = 8.0) -> None:  # fmt: skip
        token = issue_token(Principal(role=Role.admin, user="chaos"), token_secret,
                            datetime.now(UTC), timedelta(hours=6))  # fmt: skip
        self.http = httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=5.0
        )
        self.rng = rng
        self.leads = leads
        self.rate = rate
        self.known: dict[uuid.UUID, tuple[int, str]] = {}  # opportunity -> (version, stage)
        self.acknowledged: list[tuple[uuid.UUID, int, str]] = []  # (opportunity, version, to)
        self.unanswered = 0  # commands without an answer (pipeline down): read again
        self.stale = 0

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                leads = self.leads()[-3000:]
                if leads:
                    await self.move(opportunity_id_for(self.rng.choice(leads)))
                await asyncio.sleep(1 / self.rate)
        finally:
            await self.http.aclose()

    async def move(self, opportunity: uuid.UUID) -> None:
        try:
            if opportunity not in self.known:
                seen = await self.http.get(f"/v1/opportunities/{opportunity}")
                if seen.status_code != 200:
                    return  # not opened yet (or pipeline away): another time
                self.known[opportunity] = (seen.json()["version"], seen.json()["stage"])
            version, stage = self.known[opportunity]
            if stage not in NEXT_STAGE:
                return
            answer = await self.http.post(
                f"/v1/opportunities/{opportunity}/stage",
                json={"expected_version": version, "to_stage": NEXT_STAGE[stage]},
            )
        except httpx.HTTPError:
            self.unanswered += 1
            self.known.pop(opportunity, None)
            return
        if answer.status_code == 200:
            body = answer.json()
            self.known[opportunity] = (body["version"], body["stage"])
            self.acknowledged.append((opportunity, body["version"], body["stage"]))
        else:
            self.stale += answer.status_code == 409
            self.known.pop(opportunity, None)


async def notify_tick(env: dict[str, str], now: datetime | None = None) -> str | None:
    """`dealstream notify tick --now <now, or four days ahead>` as a subprocess; its output, or
    None if it failed (the database or broker away: the next tick does the work)."""
    at = (now or datetime.now(UTC) + AHEAD).isoformat()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "notify", "tick", "--now", at, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), TICK_WITHIN)
    except TimeoutError:
        process.kill()
        await process.wait()
        return None
    if process.returncode != 0:
        log.info("notify tick failed: %s", err.decode()[-300:])
        return None
    return out.decode().strip()


class Ticker:
    """`notify_tick` every `every` seconds until stopped."""

    def __init__(self, env: dict[str, str], every: float = 8.0) -> None:
        self.env = env
        self.every = every
        self.done: list[str] = []
        self.failed = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with_output = await notify_tick(self.env)
            if with_output is None:
                self.failed += 1
            else:
                self.done.append(with_output)
            try:
                await asyncio.wait_for(stop.wait(), self.every)
            except TimeoutError:
                pass

"""A pipeline API on its own schema with a directory of two teams, driven by a clock the test
moves, with opportunities opened through the real lead-event path."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

from services.pipeline.api import create_api
from services.pipeline.app import MIGRATIONS, PipelineApp
from services.pipeline.domain import opportunity_id_for
from shared.auth import Principal, Role, issue_token
from shared.clock import FixedClock
from shared.runtime import open_schema
from shared.settings import Settings
from tests.factories import lead_captured

START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)

DIRECTORY = """
[routing]
load_cap = 100
[[routing.rules]]
team = "xian"
region = "CN-SN"
[[routing.rules]]
team = "beijing"
region = "CN-BJ"

[[directory.teams]]
id = "xian"
manager = "mgr_xian"
branch_manager = "boss"
[[directory.teams]]
id = "beijing"
manager = "mgr_bj"

[[directory.users]]
id = "rep1"
team = "xian"
[[directory.users]]
id = "rep2"
team = "xian"
[[directory.users]]
id = "rep3"
team = "beijing"
[[directory.users]]
id = "mgr_xian"
team = "xian"
role = "manager"
"""

PRINCIPALS = {
    "rep1": Principal(role=Role.rep, user="rep1", team="xian"),
    "rep2": Principal(role=Role.rep, user="rep2", team="xian"),
    "mgr_xian": Principal(role=Role.manager, user="mgr_xian", team="xian"),
    "mgr_bj": Principal(role=Role.manager, user="mgr_bj", team="beijing"),
    "ops": Principal(role=Role.ops, user="ops1"),
    "admin": Principal(role=Role.admin, user="root"),
    "partner": Principal(role=Role.partner, user="acme"),  # a channel partner sees no deal
}


@dataclass
class Pipeline:
    app: PipelineApp
    pool: asyncpg.Pool
    clock: FixedClock
    http: httpx.AsyncClient
    settings: Settings
    next_position: int = 1

    def auth(self, who: str) -> dict[str, str]:
        token = issue_token(PRINCIPALS[who], self.settings.secret_for_tokens(), self.clock.now(),
                            timedelta(days=3650))  # fmt: skip
        return {"Authorization": f"Bearer {token}"}

    async def open(self, region: str = "CN-SN", **data: object) -> uuid.UUID:
        """Open one opportunity through the lead-event path; returns its id."""
        lead = uuid.uuid4()
        envelope = lead_captured(lead)
        body = {**envelope.data, "company": {"name": f"Co {lead.hex[:6]}", "region": region},
                "authority": "decision_maker", "need": "links", "timeline": "this_quarter",
                "captured_at": self.clock.now().isoformat(), **data}  # fmt: skip
        envelope = envelope.model_copy(update={"data": body})
        position, self.next_position = self.next_position, self.next_position + 1
        await asyncio.to_thread(self.app.apply_lead_events, "capture:p0", [(position, envelope)],
                                self.settings.rules())  # fmt: skip
        return opportunity_id_for(lead)

    async def post(
        self, who: str, opportunity: uuid.UUID, route: str, **body: object
    ) -> httpx.Response:
        return await self.http.post(f"/v1/opportunities/{opportunity}/{route}", json=body,
                                    headers=self.auth(who))  # fmt: skip

    async def app_lead(self, opportunity: uuid.UUID) -> uuid.UUID:
        return (await asyncio.to_thread(self.app.get, opportunity)).lead_id

    async def version(self, opportunity: uuid.UUID) -> int:
        got = await self.http.get(f"/v1/opportunities/{opportunity}", headers=self.auth("admin"))
        return int(got.json()["version"])


@pytest.fixture
async def pipeline(settings: Settings, schema: str, tmp_path: Path) -> AsyncIterator[Pipeline]:
    config = tmp_path / "dealstream.toml"
    config.write_text(DIRECTORY)
    mine = settings.model_copy(update={"config_file": config})
    pool = await open_schema(mine, schema, MIGRATIONS)
    app = await asyncio.to_thread(PipelineApp, mine.dsn(), schema)
    clock = FixedClock(START)
    api = create_api(app, mine, pool, clock, lambda: None)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(api), base_url="http://pipeline"
    ) as http:
        yield Pipeline(app, pool, clock, http, mine)
    app.close()
    await pool.close()

"""Unmerge (SPEC §3: the merge "can be undone (`unmerge`, another event)"): an admin undoes
dedupe's merge of a lead at capture; `LeadUnmerged` takes the lead out of the deal it had joined
(`LeadDetached`) and opens a deal of its own, once however often it is delivered."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from psycopg.sql import SQL

from services.capture.api import create_api as capture_api
from services.capture.app import MIGRATIONS as CAPTURE_MIGRATIONS
from services.capture.app import CaptureApp
from services.capture.intake_limits import RateLimiter
from services.capture.normalize import match_keys
from services.pipeline.domain import opportunity_id_for
from shared.auth import Principal, Role, issue_token
from shared.bus.envelopes import envelope_of
from shared.clock import SystemClock
from shared.contracts.envelope import Envelope
from shared.settings import Settings
from tests.integration.pipeline_fixtures import Pipeline, pipeline  # noqa: F401


@pytest.fixture
async def capture(
    settings: Settings, schema: str, open_pool: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, CaptureApp]]:
    await open_pool(f"{schema}_capture", CAPTURE_MIGRATIONS)
    app = await asyncio.to_thread(CaptureApp, settings.dsn(), f"{schema}_capture")
    api = capture_api(app, settings, SystemClock(), lambda: None, RateLimiter(60, 8))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api),
                                 base_url="http://capture") as http:  # fmt: skip
        yield http, app
    app.close()


async def test_an_unmerged_lead_leaves_the_deal_it_joined_for_one_of_its_own(
    capture: tuple[httpx.AsyncClient, CaptureApp],
    pipeline: Pipeline,  # noqa: F811
    settings: Settings,
) -> None:
    http, app = capture
    p = pipeline

    def auth(role: Role, user: str) -> dict[str, str]:
        token = issue_token(Principal(role=role, user=user, team="xian"),
                            settings.secret_for_tokens(), datetime.now(UTC),
                            timedelta(hours=1))  # fmt: skip
        return {"Authorization": f"Bearer {token}"}

    email = f"twin.{uuid.uuid4().hex[:8]}@example.cn"
    leads = []
    for company in ("Same Person Co", "Another Co Entirely"):
        form = {"company": {"name": company, "region": "CN-SN"}, "need": f"{company} links",
                "contact": {"name": "Li Wei", "email": email}}  # fmt: skip
        posted = await http.post("/v1/leads", json=form)
        assert posted.status_code == 202, posted.text
        leads.append(uuid.UUID(posted.json()["lead_id"]))
    first, twin = leads
    assert (await asyncio.to_thread(app.repository.get, twin)).merged_into == first

    positions = iter(range(1, 100))

    async def deliver(lead: uuid.UUID, since: int = 0) -> None:
        """The lead's events from `since` on, delivered to pipeline as the relay publishes them
        (its LeadCaptured with the contact opened)."""
        events = (await asyncio.to_thread(app.events_of, [lead]))[lead]
        envelopes: list[Envelope] = [envelope_of(e) for e in events][since:]
        items = [(next(positions), e) for e in envelopes]
        await asyncio.to_thread(p.app.apply_lead_events, "capture:p0", items, p.settings.rules())

    await deliver(first)
    await deliver(twin)  # merged: it joins the first lead's deal
    joined = opportunity_id_for(first)
    assert (await asyncio.to_thread(p.app.get, joined)).lead_ids == [first, twin]

    url = f"/v1/leads/{twin}/unmerge"
    assert (await http.post(url)).status_code == 401
    for role in (Role.rep, Role.manager, Role.ops):  # a lead leaves a deal of whichever team
        assert (await http.post(url, headers=auth(role, "someone"))).status_code == 403
    missing = await http.post(f"/v1/leads/{uuid.uuid4()}/unmerge", headers=auth(Role.admin, "a"))
    assert missing.status_code == 404
    not_merged = await http.post(f"/v1/leads/{first}/unmerge", headers=auth(Role.admin, "a"))
    assert (not_merged.status_code, not_merged.json()["code"]) == (409, "not_merged")
    done = await http.post(url, json={"note": "two people, one address"},
                           headers=auth(Role.admin, "root"))  # fmt: skip
    assert done.status_code == 200, done.text
    assert done.json() == {"lead_id": str(twin), "unmerged_from": str(first)}
    again = await http.post(url, headers=auth(Role.admin, "root"))
    assert (again.status_code, again.json()["code"]) == (409, "not_merged")

    events = (await asyncio.to_thread(app.events_of, [twin]))[twin]
    unmerged = envelope_of(events[-1])
    assert unmerged.event_type == "LeadUnmerged"
    assert (unmerged.data["from_lead_id"], unmerged.data["actor"], unmerged.data["rule"]) == (
        str(first),
        "root",
        "email",
    )
    assert unmerged.data["lead"]["contact"] is None  # the contact stays in its LeadCaptured
    assert unmerged.data["lead"]["company"]["name"] == "Another Co Entirely"

    for _ in range(2):  # delivered twice: detached once, one deal of its own
        await deliver(twin, since=2)
    before = await asyncio.to_thread(p.app.get, joined)
    assert before.lead_ids == [first]
    detached = (await asyncio.to_thread(p.app.history, joined))[-1]
    assert detached.public_name == "LeadDetached"  # type: ignore[attr-defined]
    own = await asyncio.to_thread(p.app.get, opportunity_id_for(twin))
    assert (own.lead_id, own.company, own.status, own.stage) == (
        twin,
        "Another Co Entirely",
        "open",
        "A",
    )
    assert own.opened_at == unmerged.occurred_at  # opened when unmerged, not backdated
    assert own.owner is not None  # routed like any new lead
    page = await p.http.get("/v1/opportunities", params={"lead_id": str(twin)},
                            headers=p.auth("admin"))  # fmt: skip
    assert [i["opportunity_id"] for i in page.json()["items"]] == [str(own.id)]
    assert await p.pool.fetchval("SELECT count(*) FROM opportunity_index") == 2

    # The keys the twin brought (its company) lead to it now; the shared e-mail stays the first
    # customer's, who had it first.
    brought = dict(match_keys(None, None, "Another Co Entirely", "CN-SN"))["company_region"]
    rows = await asyncio.to_thread(app.query, SQL("SELECT lead_id FROM {} WHERE rule ="
                                   " 'company_region' AND key = %s").format(app.table("lead_key")),
                                   [brought])  # fmt: skip
    assert [r["lead_id"] for r in rows] == [twin]
    for company, mailbox, into in (("Another Co Entirely", "someone.else", twin),
                                   ("Same Person Co", "a.third", first),
                                   ("Unrelated Co", email.split("@")[0], first)):  # fmt: skip
        form = {"company": {"name": company, "region": "CN-SN"},
                "contact": {"name": "Wang", "email": f"{mailbox}@example.cn"}}  # fmt: skip
        posted = await http.post("/v1/leads", json=form)
        later = uuid.UUID(posted.json()["lead_id"])
        assert (await asyncio.to_thread(app.repository.get, later)).merged_into == into, company

"""A customer comes back (SPEC §3: "a lead matching an existing open lead or opportunity … is
merged"): while the customer's deal is open a new lead of theirs is merged into it; once it is
won or lost, their next lead is a new one (a new deal, registrable anew), and leads after that
merge into it; a reopened deal merges again. Capture learns which deals are open from pipeline's
`opportunity.events.v1`, on the real broker."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

from services.capture.app import MIGRATIONS as CAPTURE_MIGRATIONS
from services.capture.app import CaptureApp
from services.capture.bus import customer_deals
from services.pipeline.bus import route
from services.pipeline.domain import opportunity_id_for
from shared.bus.relay import OutboxRelay
from shared.contracts.partner import WebFormLead
from shared.settings import Settings
from tests.integration.pipeline_fixtures import START, Pipeline, pipeline  # noqa: F401
from tests.support import eventually


async def test_a_customer_whose_deal_closed_comes_back_as_a_new_lead(
    pipeline: Pipeline,  # noqa: F811
    settings: Settings,
    schema: str,
    open_pool: Any,
    background: Any,
) -> None:
    p = pipeline
    pool = await open_pool(f"{schema}_capture", CAPTURE_MIGRATIONS)
    capture = await asyncio.to_thread(CaptureApp, settings.dsn(), f"{schema}_capture")
    deals = customer_deals(pool, settings)
    deals.group_id = f"capture-deals-{schema}"
    background(deals.run)
    background(OutboxRelay("pipeline", p.app, route, p.settings, p.pool).run)
    email = f"back.{uuid.uuid4().hex[:8]}@example.cn"
    form = WebFormLead.model_validate({"company": {"name": "Returning Co", "region": "CN-SN"},
                                       "contact": {"name": "Li Wei", "email": email}})  # fmt: skip

    captured = iter(range(100))

    async def lead() -> tuple[uuid.UUID, Any]:
        """A lead of the customer, an hour after the last: its id and whom it merged into."""
        at = START + timedelta(hours=next(captured))
        lead_id = await asyncio.to_thread(capture.capture_web_lead, form, at, "c")
        stored = await asyncio.to_thread(capture.repository.get, lead_id)
        return lead_id, stored.merged_into

    async def deal_open(opportunity: uuid.UUID, is_open: bool) -> None:
        row = await eventually(
            lambda: pool.fetchrow(
                "SELECT lead_id, open FROM customer_deal WHERE opportunity_id = $1", opportunity
            ),
            lambda r: r is not None and r["open"] is is_open,
        )
        assert row is not None and row["open"] is is_open, row

    first, merged = await lead()
    assert merged is None
    await p.open(lead_id=str(first))  # pipeline opens the customer's deal from its first lead
    deal = opportunity_id_for(first)
    await deal_open(deal, True)
    assert await pool.fetchval("SELECT lead_id FROM customer_deal WHERE opportunity_id = $1",
                               deal) == first  # fmt: skip
    assert (await lead())[1] == first  # open: merged into it

    lost = await p.post("admin", deal, "lose", expected_version=await p.version(deal),
                        reason_code="price", note="too dear")  # fmt: skip
    assert lost.status_code == 200, lost.text
    await deal_open(deal, False)
    returning, merged = await lead()
    assert merged is None  # a new lead: it opens a new deal
    assert (await lead())[1] == returning  # and the customer's next leads merge into that one

    reopened = await p.post("admin", deal, "reopen", expected_version=await p.version(deal),
                            note="budget back")  # fmt: skip
    assert reopened.status_code == 200, reopened.text
    await deal_open(deal, True)
    assert (await lead())[1] == first  # open again: the customer's first deal, as before
    capture.close()

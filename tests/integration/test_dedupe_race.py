"""Dedupe under concurrency (SPEC §3: a lead matching an open lead or opportunity is merged): two
leads of one new customer captured at the same moment, by two replicas or two posts of one web
form, make one customer, not two. Each lookup finds no customer, so both would be new; the key
each claims for its customer is unique, and the second lead's transaction fails and is decided
again, finding the first. On the real PostgreSQL, with each round's two captures let go together
from two threads."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any

from services.capture.app import MIGRATIONS, CaptureApp
from services.capture.domain import Incoming, partner_lead_id, sign
from shared.contracts.partner import WebFormLead
from shared.settings import Rules, Settings
from tests.support import at_once, lead_value

NOW = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
ROUNDS = 8


def form(email: str, company: str) -> WebFormLead:
    return WebFormLead.model_validate({"company": {"name": company, "region": "CN-SN"},
                                       "contact": {"name": "Li Wei", "email": email}})  # fmt: skip


def customers_of(app: CaptureApp, lead_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """The customer (first lead) each lead is merged into, or is."""
    leads = [app.repository.get(i) for i in lead_ids]
    return {lead.merged_into or lead.id for lead in leads}


@asynccontextmanager
async def replicas(
    settings: Settings, schema: str, open_pool: Any
) -> AsyncIterator[tuple[Any, list[CaptureApp]]]:
    """Two capture apps on one schema, as two replicas, and a pool on it."""
    pool = await open_pool(schema, MIGRATIONS)
    apps = [await asyncio.to_thread(CaptureApp, settings.dsn(), schema) for _ in range(2)]
    try:
        yield pool, apps
    finally:
        for app in apps:
            app.close()


async def test_two_posts_of_one_web_form_at_once_make_one_customer(
    settings: Settings, schema: str, open_pool: Any
) -> None:
    async with replicas(settings, schema, open_pool) as (_, (one, other)):
        for n in range(ROUNDS):
            same = form(f"twice.{n}.{uuid.uuid4().hex[:8]}@example.cn", f"Twice Co {n}")
            ids = await at_once(partial(one.capture_web_lead, same, NOW, "c1"),
                                partial(other.capture_web_lead, same, NOW, "c2"))  # fmt: skip
            assert len(set(ids)) == 2  # both leads are kept
            assert len(await asyncio.to_thread(customers_of, one, ids)) == 1, f"round {n}"


async def test_one_customers_partner_leads_on_two_replicas_at_once_make_one_customer(
    settings: Settings, schema: str, open_pool: Any
) -> None:
    """Two partners' leads of one contact (by e-mail; of differently named companies, so no
    registration is contested), each taken by a replica of its own at the same moment."""
    async with replicas(settings, schema, open_pool) as (_, (one, other)):
        secrets = {"alpha": ["s"], "bravo": ["s"]}

        def fetch(app: CaptureApp, partition: int, partner: str, email: str, n: int) -> uuid.UUID:
            value = lead_value(partner, f"{partner}-{n}", company=f"{partner} side {n}",
                               contact={"name": "Li Wei", "email": email})  # fmt: skip
            headers = {"x-partner-id": partner, "x-message-id": f"{partner}-{n}",
                       "x-signature": sign("s", value)}  # fmt: skip
            message = Incoming("partner.leads.v1", partition, n, partner.encode(), value, headers)
            applied = app.handle_partner_fetch({partition: f"t:p{partition}"}, [message], secrets,
                                               NOW, Rules())  # fmt: skip
            assert applied == 1
            return partner_lead_id(partner, f"{partner}-{n}")

        for n in range(ROUNDS):
            email = f"both.{n}.{uuid.uuid4().hex[:8]}@example.cn"
            ids = await at_once(partial(fetch, one, 0, "alpha", email, n),
                                partial(fetch, other, 1, "bravo", email, n))  # fmt: skip
            assert len(await asyncio.to_thread(customers_of, one, ids)) == 1, f"round {n}"


async def test_a_returning_customer_posting_twice_at_once_makes_one_new_customer(
    settings: Settings, schema: str, open_pool: Any
) -> None:
    """The customer's deal was lost: the next lead is a new customer (its keys claimed anew),
    and only one of two at the same moment is."""
    async with replicas(settings, schema, open_pool) as (pool, (one, other)):
        for n in range(ROUNDS):
            same = form(f"back.{n}.{uuid.uuid4().hex[:8]}@example.cn", f"Back Co {n}")
            first = await asyncio.to_thread(one.capture_web_lead, same, NOW, "c0")
            await pool.execute("INSERT INTO customer_deal (opportunity_id, lead_id, open, version)"
                               " VALUES ($1, $2, false, 3)", uuid.uuid4(), first)  # fmt: skip
            ids = await at_once(partial(one.capture_web_lead, same, NOW, "c1"),
                                partial(other.capture_web_lead, same, NOW, "c2"))  # fmt: skip
            customers = await asyncio.to_thread(customers_of, one, ids)
            assert len(customers) == 1 and first not in customers, f"round {n}"

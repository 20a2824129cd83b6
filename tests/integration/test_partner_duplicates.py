"""`duplicate` (SPEC §3: "same message_id again, or same lead from the same partner") is answered
by who sent the customer before, not by who brought the customer first: a partner's second lead
of a customer first seen on a web form, or from another partner, is a duplicate of the partner's
own first one (it was `accepted` again, as the customer's first lead was not that partner's).
Each message goes through capture's batch path on the real PostgreSQL, its reply read back from
the store."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

import pytest

from services.capture.app import MIGRATIONS, PARTNER_MESSAGE_NAMESPACE, CaptureApp
from services.capture.domain import Incoming, partner_lead_id, sign
from shared.contracts.partner import WebFormLead
from shared.settings import Rules, Settings
from tests.support import lead_value

NOW = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
SECRETS = {"acme": ["s"], "bolt": ["s"]}


class Intake:
    """Partner messages of one customer (one e-mail; each of a company of its own, so no
    registration is contested) taken in batches, and the replies they got."""

    def __init__(self, app: CaptureApp) -> None:
        self.app, self.offsets = app, count()
        self.email = f"again.{uuid.uuid4().hex[:8]}@example.cn"

    def message(self, partner: str, message_id: str, **fields: Any) -> Incoming:
        fields = {"contact": {"name": "Li Wei", "email": self.email}, **fields}
        value = lead_value(partner, message_id, company=f"{message_id} Co", **fields)
        headers = {"x-partner-id": partner, "x-message-id": message_id,
                   "x-signature": sign("s", value)}  # fmt: skip
        return Incoming("partner.leads.v1", 0, next(self.offsets), partner.encode(), value, headers)

    def send(self, *sent: tuple[str, str]) -> list[tuple[str, uuid.UUID]]:
        """One batch of (partner, message id): each reply's status and lead."""
        messages = [self.message(partner, message_id) for partner, message_id in sent]
        at = NOW + timedelta(minutes=messages[0].offset + 1)  # each batch after the web form
        self.app.handle_partner_fetch({0: "t:p0"}, messages, SECRETS, at, Rules())
        replies = [self.app.repository.get(uuid.uuid5(PARTNER_MESSAGE_NAMESPACE,
                                                      f"t:p0/{m.offset}")).reply
                   for m in messages]  # fmt: skip
        return [(r["status"], uuid.UUID(r["lead_id"])) for r in replies]

    def send_body(
        self, partner: str, message_id: str, fields: dict[str, Any]
    ) -> tuple[str, uuid.UUID]:
        """One message with these fields (its contact, say) in a batch of its own."""
        message = self.message(partner, message_id, **fields)
        at = NOW + timedelta(minutes=message.offset + 1)
        self.app.handle_partner_fetch({0: "t:p0"}, [message], SECRETS, at, Rules())
        reply = self.app.repository.get(
            uuid.uuid5(PARTNER_MESSAGE_NAMESPACE, f"t:p0/{message.offset}")
        ).reply
        return reply["status"], uuid.UUID(reply["lead_id"])

    def web_form(self) -> uuid.UUID:
        form = WebFormLead.model_validate({
            "company": {"name": "Web Co", "region": "CN-SN"},
            "contact": {"name": "Li Wei", "email": self.email},
        })  # fmt: skip
        return self.app.capture_web_lead(form, NOW, "web")


@pytest.fixture
async def intake(settings: Settings, schema: str, open_pool: Any) -> Any:
    await open_pool(schema, MIGRATIONS)
    app = await asyncio.to_thread(CaptureApp, settings.dsn(), schema)
    yield Intake(app)
    app.close()


def lead(partner: str, message_id: str) -> uuid.UUID:
    return partner_lead_id(partner, message_id)


async def test_a_partners_second_lead_of_a_web_form_customer_is_a_duplicate(intake: Any) -> None:
    web = await asyncio.to_thread(intake.web_form)
    acme = lead("acme", "a1")
    assert await asyncio.to_thread(intake.send, ("acme", "a1")) == [("accepted", acme)]
    assert await asyncio.to_thread(intake.send, ("acme", "a2")) == [("duplicate", acme)]
    assert await asyncio.to_thread(intake.send, ("bolt", "b1")) == [
        ("accepted", lead("bolt", "b1"))
    ]
    # Sent again, each is answered as it was the first time.
    assert await asyncio.to_thread(intake.send, ("acme", "a1"), ("acme", "a2")) == [
        ("duplicate", acme), ("duplicate", acme)]  # fmt: skip
    stored = await asyncio.to_thread(intake.app.repository.get, acme)
    assert stored.merged_into == web  # merged into the customer all the same


async def test_a_partners_second_lead_of_another_partners_customer_is_a_duplicate(
    intake: Any,
) -> None:
    bolt, acme = lead("bolt", "b1"), lead("acme", "a1")
    assert await asyncio.to_thread(intake.send, ("bolt", "b1")) == [("accepted", bolt)]
    assert await asyncio.to_thread(intake.send, ("acme", "a1")) == [("accepted", acme)]
    # In one batch too: each partner's lead it already has.
    assert await asyncio.to_thread(intake.send, ("acme", "a2"), ("bolt", "b2"), ("acme", "a3")) == [
        ("duplicate", acme), ("duplicate", bolt), ("duplicate", acme)]  # fmt: skip


async def test_a_partners_first_leads_of_a_new_customer_in_one_batch(intake: Any) -> None:
    acme = lead("acme", "a1")
    assert await asyncio.to_thread(intake.send, ("acme", "a1"), ("bolt", "b1"), ("acme", "a2")) == [
        ("accepted", acme), ("accepted", lead("bolt", "b1")), ("duplicate", acme)]  # fmt: skip


async def test_after_an_unmerge_the_partners_lead_is_no_longer_the_customers(intake: Any) -> None:
    web = await asyncio.to_thread(intake.web_form)
    acme, third = lead("acme", "a1"), lead("acme", "a3")
    assert await asyncio.to_thread(intake.send, ("acme", "a1")) == [("accepted", acme)]
    assert await asyncio.to_thread(intake.send, ("acme", "a2")) == [("duplicate", acme)]
    assert await asyncio.to_thread(intake.app.unmerge, acme, "root", NOW) == web
    # The next lead matches the web form's customer (the first by e-mail): acme's first lead of
    # it is gone, so this one is.
    assert await asyncio.to_thread(intake.send, ("acme", "a3")) == [("accepted", third)]
    assert await asyncio.to_thread(intake.send, ("acme", "a4")) == [("duplicate", third)]
    # Sent again: a2 as it was answered; a1, unmerged, is its own customer's.
    assert await asyncio.to_thread(intake.send, ("acme", "a2"), ("acme", "a1")) == [
        ("duplicate", acme), ("duplicate", acme)]  # fmt: skip


async def test_a_customers_key_brought_by_a_partners_lead_makes_no_duplicate_of_the_customer(
    intake: Any,
) -> None:
    """A key a partner's merged lead brought (its phone) leads to the customer, a web form's
    lead: the partner's next lead found by it is a duplicate of the partner's own lead, never of
    the web form's; once that lead is unmerged, the partner has none of the customer."""
    web = await asyncio.to_thread(intake.web_form)
    a1, a3 = lead("acme", "a1"), lead("acme", "a3")
    phone = {"contact": {"name": "Li Wei", "email": intake.email, "phone": "+86 139 1234 5678"}}
    assert await asyncio.to_thread(intake.send, ("acme", "a1")) == [("accepted", a1)]
    assert await asyncio.to_thread(intake.send_body, "acme", "a2", phone) == ("duplicate", a1)
    await asyncio.to_thread(intake.app.unmerge, a1, "root", NOW)
    by_phone = {"contact": {"name": "Wang", "phone": "+86 139 1234 5678"}}
    assert await asyncio.to_thread(intake.send_body, "acme", "a3", by_phone) == ("accepted", a3)
    stored = await asyncio.to_thread(intake.app.repository.get, a3)
    assert stored.merged_into == web

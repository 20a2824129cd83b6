"""Redelivery and recovery with the services as real processes: the same partner message twice, a
relay that republishes everything, consumers killed mid-batch, and a fresh, empty broker each
leave exactly one lead, one opportunity, one funnel row and one timer per accepted message."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.capture.domain import partner_lead_id
from services.pipeline.domain import opportunity_id_for
from shared.devstack import DevStack
from tests.e2e.conftest import Services, cli, partner_secret
from tests.support import eventually, lead_value, read_topic, send_partner_messages, signed_headers

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def partner(services: Services) -> tuple[str, str]:
    out = cli(services.env, "partner", "add", "acme")
    return "acme", partner_secret(out)


@pytest.fixture
async def db(e2e_stack: DevStack) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(e2e_stack.database_url)
    yield conn
    await conn.close()


async def counts(db: asyncpg.Connection, lead_ids: list[uuid.UUID]) -> dict[str, int]:
    """How often each stage of the flow holds these leads; every value must equal len(lead_ids)."""
    opportunities = [opportunity_id_for(lead) for lead in lead_ids]
    return {
        "leads": await db.fetchval(
            "SELECT count(*) FROM capture.capture_events WHERE originator_id = ANY($1::uuid[])",
            lead_ids,
        ),
        "opportunities": await db.fetchval(
            "SELECT count(*) FROM pipeline.pipeline_events"
            " WHERE originator_id = ANY($1::uuid[]) AND originator_version = 1",
            opportunities,
        ),
        "funnel_rows": await db.fetchval(
            "SELECT count(*) FROM reporting.opportunity_now WHERE opportunity_id = ANY($1::uuid[])",
            opportunities,
        ),
        "timers": await db.fetchval(
            "SELECT count(*) FROM notify.timer"
            " WHERE kind = 'follow_up' AND opportunity_id = ANY($1::uuid[])",
            opportunities,
        ),
    }


async def assert_exactly_once(db: asyncpg.Connection, lead_ids: list[uuid.UUID]) -> None:
    want = {k: len(lead_ids) for k in ("leads", "opportunities", "funnel_rows", "timers")}

    async def probe() -> dict[str, int]:
        return await counts(db, lead_ids)

    assert await eventually(probe, lambda c: c == want, within=60) == want
    await asyncio.sleep(1.5)  # anything late and duplicated would show now
    assert await counts(db, lead_ids) == want
    for schema in ("reporting", "notify"):
        assert await db.fetchval(f"SELECT count(*) FROM {schema}.stream_gap") == 0


def batch(partner: tuple[str, str], n: int) -> tuple[list[uuid.UUID], list]:  # type: ignore[type-arg]
    partner_id, secret = partner
    messages, lead_ids = [], []
    for _ in range(n):
        message_id = f"{partner_id}-{uuid.uuid4().hex[:12]}"
        value = lead_value(partner_id, message_id)
        messages.append((partner_id, value, signed_headers(partner_id, message_id, secret, value)))
        lead_ids.append(partner_lead_id(partner_id, message_id))
    return lead_ids, messages


async def test_the_same_partner_message_three_times_is_one_lead(
    services: Services, partner: tuple[str, str], db: asyncpg.Connection
) -> None:
    lead_ids, messages = batch(partner, 1)
    bootstrap = services.stack.kafka
    await send_partner_messages(bootstrap, messages * 3)
    message_id = json.loads(messages[0][1])["message_id"]

    def mine(records: list) -> list:  # type: ignore[type-arg]
        return [json.loads(r.value) for r in records if r.key == message_id.encode()]

    replies = mine(
        await read_topic(bootstrap, "partner.acme.replies.v1", lambda r: len(mine(r)) >= 3)
    )
    assert [r["status"] for r in replies] == ["accepted", "duplicate", "duplicate"]
    assert {r["lead_id"] for r in replies} == {str(lead_ids[0])}
    await assert_exactly_once(db, lead_ids)


async def test_relays_republishing_everything_change_nothing_downstream(
    services: Services, partner: tuple[str, str], db: asyncpg.Connection
) -> None:
    lead_ids, messages = batch(partner, 30)
    await send_partner_messages(services.stack.kafka, messages)
    await assert_exactly_once(db, lead_ids)
    services.kill("capture")
    services.kill("pipeline")
    await db.execute("UPDATE capture.relay_position SET position = 0")
    await db.execute("UPDATE pipeline.relay_position SET position = 0")
    services.start("capture")
    services.start("pipeline")
    await asyncio.to_thread(services.wait_ready, "capture", "pipeline")

    async def republished() -> int:
        return int(await db.fetchval("SELECT min(position) FROM pipeline.relay_position"))

    latest = await db.fetchval("SELECT max(notification_id) FROM pipeline.pipeline_events")
    assert await eventually(republished, lambda p: p >= latest, within=60) >= latest
    await assert_exactly_once(db, lead_ids)


async def test_consumers_killed_mid_batch_lose_and_duplicate_nothing(
    services: Services, partner: tuple[str, str], db: asyncpg.Connection
) -> None:
    lead_ids, messages = batch(partner, 600)
    sending = asyncio.create_task(send_partner_messages(services.stack.kafka, messages))
    await asyncio.sleep(0.3)
    for service in ("pipeline", "reporting", "notify", "capture"):
        services.kill(service)  # SIGKILL: no clean shutdown, no offset commit
        await asyncio.sleep(0.2)
    await sending
    for service in ("capture", "pipeline", "reporting", "notify"):
        services.start(service)
    await asyncio.to_thread(services.wait_ready)
    await assert_exactly_once(db, lead_ids)


async def test_a_fresh_empty_broker_loses_nothing(
    services: Services, partner: tuple[str, str], db: asyncpg.Connection
) -> None:
    before, messages = batch(partner, 40)
    await send_partner_messages(services.stack.kafka, messages)
    await assert_exactly_once(db, before)
    await asyncio.to_thread(services.stack.restart_broker)  # the embedded broker forgets all
    after, messages = batch(partner, 40)
    await send_partner_messages(services.stack.kafka, messages)
    await assert_exactly_once(db, before + after)
    ids = {json.loads(m[1])["message_id"] for m in messages}

    def mine(records: list) -> list:  # type: ignore[type-arg]
        return [r for r in records if r.key.decode() in ids]

    replies = mine(
        await read_topic(
            services.stack.kafka, "partner.acme.replies.v1", lambda r: len(mine(r)) >= 40
        )
    )
    assert sorted(json.loads(r.value)["status"] for r in replies) == ["accepted"] * 40


async def test_capture_killed_while_a_partner_sends_loses_and_duplicates_no_lead(
    services: Services, partner: tuple[str, str], db: asyncpg.Connection
) -> None:
    lead_ids, messages = batch(partner, 800)
    sending = asyncio.create_task(send_partner_messages(services.stack.kafka, messages))
    for _ in range(3):
        await asyncio.sleep(0.4)
        services.kill("capture")
        services.start("capture")
    await sending
    await asyncio.to_thread(services.wait_ready, "capture")
    await assert_exactly_once(db, lead_ids)
    ids = {json.loads(m[1])["message_id"] for m in messages}

    def mine(records: list) -> list:  # type: ignore[type-arg]
        return [r for r in records if r.key.decode() in ids]

    replies = mine(
        await read_topic(services.stack.kafka, "partner.acme.replies.v1",
                         lambda r: len({x.key for x in mine(r)}) >= len(ids), within=90)
    )  # fmt: skip
    answers: dict[str, set[str]] = {}
    for record in replies:  # the relay may repeat a message after a crash: never change it
        answers.setdefault(record.key.decode(), set()).add(record.value.decode())
    assert set(answers) == ids and all(len(a) == 1 for a in answers.values())
    accepted = [json.loads(next(iter(a))) for a in answers.values()]
    assert {a["status"] for a in accepted} == {"accepted"}
    assert sorted(a["lead_id"] for a in accepted) == sorted(str(i) for i in lead_ids)

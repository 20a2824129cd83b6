"""Partner intake on the real broker: every message answered once on the partner's replies topic,
bad signatures and unknown partners dead-lettered, poison messages never stop the consumer
(SPEC §3)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

from services.capture.app import MIGRATIONS, CaptureApp
from services.capture.client import PartnerClient
from services.capture.domain import Incoming, partner_lead_id, sign
from services.capture.partners import PartnerSecrets, add_partner, rotate_partner
from shared.contracts.topics import partner_replies
from shared.settings import Rules, Settings
from tests.integration.conftest import register_partner, start_intake
from tests.support import lead_body, lead_value, read_topic, send_partner_messages, signed_headers


async def answers_to(settings: Settings, partner: str, message_ids: set[str]) -> dict[str, dict]:  # type: ignore[type-arg]
    """Replies on the partner's topic to these messages, read with a plain consumer."""

    def mine(records: list) -> list:  # type: ignore[type-arg]
        return [r for r in records if r.key.decode() in message_ids]

    records = mine(await read_topic(settings.bootstrap_servers(), partner_replies(partner),
                                    lambda r: len(mine(r)) >= len(message_ids)))  # fmt: skip
    return {r.key.decode(): json.loads(r.value) for r in records}


async def test_every_partner_message_gets_one_answer_and_poison_does_not_stop_intake(
    settings: Settings,
    intake,  # type: ignore[no-untyped-def]
) -> None:
    app, partner, secret = intake

    def m(mid: str) -> str:
        return f"{partner}-{mid}"

    good = lead_value(partner, m("1"))
    bad_schema = json.loads(lead_value(partner, m("5")))
    bad_schema["contact"]["email"] = "nope"
    stranger = f"x{uuid.uuid4().hex[:8]}"
    stranger_value = lead_value(stranger, f"{stranger}-1")
    messages = [
        (partner, good, signed_headers(partner, m("1"), secret, good)),
        (partner, good, signed_headers(partner, m("1"), secret, good)),  # the same message again
        (partner, good, signed_headers(partner, m("3"), "wrong-secret", good)),
        (partner, b"\x00not json", signed_headers(partner, m("4"), secret, b"\x00not json")),
        (
            partner,
            json.dumps(bad_schema).encode(),
            signed_headers(partner, m("5"), secret, json.dumps(bad_schema).encode()),
        ),
        (stranger, stranger_value, signed_headers(stranger, f"{stranger}-1", "s", stranger_value)),
    ]
    late = lead_value(partner, m("6"))
    messages.append((partner, late, signed_headers(partner, m("6"), secret, late)))
    await send_partner_messages(settings.bootstrap_servers(), messages)

    replies = await read_topic(
        settings.bootstrap_servers(), partner_replies(partner), lambda r: len(r) >= 6
    )
    answers = [json.loads(r.value) for r in replies]
    assert [r.key.decode() for r in replies] == [a["message_id"] for a in answers]
    by_id: dict[str, list[dict]] = {}  # type: ignore[type-arg]
    for answer in answers:
        by_id.setdefault(answer["message_id"], []).append(answer)
    lead_id = str(partner_lead_id(partner, m("1")))
    assert [a["status"] for a in by_id[m("1")]] == ["accepted", "duplicate"]
    assert {a["lead_id"] for a in by_id[m("1")]} == {lead_id}
    assert by_id[m("3")] == [
        {
            "message_id": m("3"),
            "status": "rejected",
            "errors": [
                {
                    "field": "x-signature",
                    "code": "bad_signature",
                    "message": "signature does not match the partner's secret",
                }
            ],
        }
    ]
    assert by_id[m("4")][0]["status"] == "rejected"
    assert by_id[m("4")][0]["errors"][0]["code"] == "invalid_json"
    assert by_id[m("5")][0]["errors"][0]["field"] == "contact.email"
    assert by_id[m("6")][0]["status"] == "accepted"  # after the poison, intake goes on
    assert len(answers) == 6

    def ours(records: list) -> list:  # type: ignore[type-arg]
        return [
            json.loads(r.value)
            for r in records
            if json.loads(r.value).get("partner_id") in (partner, stranger)
        ]

    dead = ours(
        await read_topic(
            settings.bootstrap_servers(), "dead-letter.v1", lambda r: len(ours(r)) >= 2
        )
    )
    assert sorted((d["partner_id"], d["reason"]) for d in dead) == sorted(
        [(partner, "bad_signature"), (stranger, "unknown_partner")]
    )
    assert all(d["source_topic"] == "partner.leads.v1" and d["value_b64"] for d in dead)
    # Only the two good messages became leads.
    assert app.existing_ids([partner_lead_id(partner, m(n)) for n in "13456"]) == {
        partner_lead_id(partner, m("1")),
        partner_lead_id(partner, m("6")),
    }


async def test_the_partner_client_sends_signed_leads_and_gets_their_replies(
    settings: Settings,
    intake,  # type: ignore[no-untyped-def]
) -> None:
    _, partner, secret = intake
    lead = lead_body()
    async with PartnerClient(settings.bootstrap_servers(), partner, secret) as client:
        first = await client.submit(lead)
        again = await client.submit(lead, message_id=first["message_id"])
        refused = await client.submit({**lead, "contact": {"name": "X", "email": "nope"}})
    assert first["status"] == "accepted" and uuid.UUID(first["lead_id"])
    assert (again["status"], again["lead_id"]) == ("duplicate", first["lead_id"])
    assert first["registration"]["status"] == "registered"
    assert refused["status"] == "rejected" and refused["errors"][0]["field"] == "contact.email"


async def test_a_known_customer_is_merged_not_duplicated(settings: Settings, intake) -> None:  # type: ignore[no-untyped-def]
    app, partner, secret = intake
    first = lead_body(company="Northwind Logistics Co., Ltd.")
    same_company = {
        **first,
        "company": {**first["company"], "name": "NORTHWIND LOGISTICS"},
        "contact": {"name": "Zhang", "email": f"z.{uuid.uuid4().hex}@example.cn"},
    }
    same_phone = {
        **first,
        "company": {"name": "Other Co", "region": "CN-BJ"},
        "contact": {"name": "Li", "phone": first["contact"]["phone"].replace(" ", "-")},
    }
    async with PartnerClient(settings.bootstrap_servers(), partner, secret) as client:
        original = await client.submit(first)
        again = await client.submit(same_company)
        by_phone = await client.submit(same_phone)
        resent = await client.submit(same_phone, message_id=by_phone["message_id"])
    assert original["status"] == "accepted"
    # The same customer from the same partner is that partner's lead already.
    assert again["status"] == "duplicate" and again["lead_id"] == original["lead_id"]
    assert by_phone["status"] == "duplicate" and by_phone["lead_id"] == original["lead_id"]
    # A company nobody held is registered to the partner that submitted it first, though the
    # lead merged as the same customer (by phone); a resent message names the same lead.
    assert by_phone["registration"]["status"] == "registered"
    assert (resent["status"], resent["lead_id"]) == ("duplicate", original["lead_id"])
    root = uuid.UUID(original["lead_id"])

    def merges(records: list) -> list:  # type: ignore[type-arg]
        return [json.loads(r.value) for r in records
                if b"LeadMerged" in r.value and str(root).encode() in r.value]  # fmt: skip

    merged = merges(await read_topic(settings.bootstrap_servers(), "lead.events.v1",
                                     lambda r: len(merges(r)) >= 2))  # fmt: skip
    assert sorted(m["data"]["rule"] for m in merged) == ["company_region", "phone"]
    assert all(m["data"]["into_lead_id"] == str(root) for m in merged)
    stored = [app.repository.get(uuid.UUID(m["data"]["lead_id"])) for m in merged]
    assert all(lead.merged_into == root for lead in stored)  # stored all the same: nothing lost


async def test_the_first_partner_holds_the_registration_until_it_expires(
    settings: Settings,
    intake,
    open_pool,
    schema: str,  # type: ignore[no-untyped-def]
) -> None:
    app, partner, secret = intake
    pool = await open_pool(schema, MIGRATIONS)
    rival, rival_secret = await register_partner(settings, pool, "r")
    lead = lead_body(company=f"Registered Co {uuid.uuid4().hex[:6]}")
    other_contact = {"name": "Chen", "email": f"chen.{uuid.uuid4().hex}@example.cn"}
    async with PartnerClient(settings.bootstrap_servers(), partner, secret) as first:
        held = await first.submit(lead)
    async with PartnerClient(settings.bootstrap_servers(), rival, rival_secret) as second:
        turned_away = await second.submit({**lead, "contact": other_contact})
    assert held["status"] == "accepted" and held["registration"]["status"] == "registered"
    assert turned_away["status"] == "conflict"
    assert turned_away["registration"] == {
        "status": "held_by_other_partner",
        "expires_at": held["registration"]["expires_at"],
    }
    assert turned_away["lead_id"] != held["lead_id"]  # stored all the same, merged
    [mine] = await asyncio.to_thread(app.registrations_of, partner)
    assert (mine["status"], mine["conflicts"], str(mine["lead_id"])) == ("held", 1, held["lead_id"])
    assert await asyncio.to_thread(app.registrations_of, rival) == []

    expires = datetime.fromisoformat(held["registration"]["expires_at"].replace("Z", "+00:00"))
    assert await asyncio.to_thread(app.expire_registrations, expires - timedelta(seconds=1)) == []
    expired = await asyncio.to_thread(app.expire_registrations, expires)
    assert expired == [mine["registration_id"]]
    [after] = await asyncio.to_thread(app.registrations_of, partner)
    assert after["status"] == "expired"

    def events(records: list) -> list:  # type: ignore[type-arg]
        return [json.loads(r.value)["event_type"] for r in records
                if r.key == str(mine["registration_id"]).encode()]  # fmt: skip

    seen = events(await read_topic(settings.bootstrap_servers(), "lead.events.v1",
                                   lambda r: len(events(r)) >= 3))  # fmt: skip
    assert seen == ["PartnerRegistered", "RegistrationConflicted", "RegistrationExpired"]


async def test_a_rotated_secret_works_in_the_overlap_window_and_not_after(
    settings: Settings,
    intake,
    open_pool,
    schema: str,  # type: ignore[no-untyped-def]
) -> None:
    _, partner, old_secret = intake
    pool = await open_pool(schema, MIGRATIONS)
    new_secret = await rotate_partner(pool, partner, datetime.now(UTC))
    await asyncio.sleep(1.2)  # past the secrets cache

    def message(message_id: str, secret: str) -> tuple[str, bytes, list[tuple[str, bytes]]]:
        value = lead_value(partner, message_id)
        return partner, value, signed_headers(partner, message_id, secret, value)

    ids = {f"{partner}-old-1", f"{partner}-new-1"}
    await send_partner_messages(settings.bootstrap_servers(),
                                [message(f"{partner}-old-1", old_secret),
                                 message(f"{partner}-new-1", new_secret)])  # fmt: skip
    during = await answers_to(settings, partner, ids)
    assert {during[i]["status"] for i in ids} == {"accepted"}

    await pool.execute("UPDATE partners SET previous_valid_until = now() - interval '1 second'"
                       " WHERE partner_id = $1", partner)  # fmt: skip
    await asyncio.sleep(1.2)
    after_ids = {f"{partner}-old-2", f"{partner}-new-2"}
    await send_partner_messages(settings.bootstrap_servers(),
                                [message(f"{partner}-old-2", old_secret),
                                 message(f"{partner}-new-2", new_secret)])  # fmt: skip
    after = await answers_to(settings, partner, after_ids)
    assert after[f"{partner}-new-2"]["status"] == "accepted"
    assert after[f"{partner}-old-2"]["status"] == "rejected"
    assert after[f"{partner}-old-2"]["errors"][0]["code"] == "bad_signature"


async def test_a_partner_finds_nothing_of_another_partner_in_its_replies(
    settings: Settings,
    intake,
    open_pool,
    schema: str,  # type: ignore[no-untyped-def]
) -> None:
    _, partner, secret = intake
    pool = await open_pool(schema, MIGRATIONS)
    other, other_secret = await register_partner(settings, pool, "o")
    mine_id, theirs_id = f"{partner}-mine", f"{other}-theirs"
    mine_value, theirs_value = lead_value(partner, mine_id), lead_value(other, theirs_id)
    await send_partner_messages(settings.bootstrap_servers(), [
        (partner, mine_value, signed_headers(partner, mine_id, secret, mine_value)),
        (other, theirs_value, signed_headers(other, theirs_id, other_secret, theirs_value)),
    ])  # fmt: skip
    assert (await answers_to(settings, other, {theirs_id}))[theirs_id]["status"] == "accepted"
    everything = await read_topic(settings.bootstrap_servers(), partner_replies(partner),
                                  lambda r: any(x.key == mine_id.encode() for x in r))  # fmt: skip
    assert mine_id.encode() in {r.key for r in everything}
    assert all(json.loads(r.value)["message_id"].startswith(partner) for r in everything)


async def test_two_partners_racing_for_one_company_one_holds_it(
    settings: Settings,
    schema: str,
    open_pool,  # type: ignore[no-untyped-def]
) -> None:
    await open_pool(schema, MIGRATIONS)
    apps = [await asyncio.to_thread(CaptureApp, settings.dsn(), schema) for _ in range(2)]
    company = f"Contested Co {uuid.uuid4().hex[:6]}"
    batches = []
    for n, partner in enumerate(("alpha", "bravo")):
        value = lead_value(partner, f"{partner}-1", company=company)
        headers = {"x-partner-id": partner, "x-message-id": f"{partner}-1",
                   "x-signature": sign("s", value)}  # fmt: skip
        message = Incoming("partner.leads.v1", n, 0, partner.encode(), value, headers)
        batches.append((apps[n], f"t:p{n}", [message]))
    secrets = {"alpha": ["s"], "bravo": ["s"]}
    now = datetime.now(UTC)
    await asyncio.gather(*(
        asyncio.to_thread(app.handle_partner_messages, name, messages, secrets, now, Rules())
        for app, name, messages in batches
    ))  # fmt: skip
    held = [r for p in ("alpha", "bravo") for r in apps[0].registrations_of(p)]
    assert [r["status"] for r in held] == ["held"]
    assert held[0]["conflicts"] == 1
    for app in apps:
        app.close()


async def test_one_fetch_of_two_partitions_registers_the_company_for_who_came_first(
    settings: Settings,
    schema: str,
    open_pool,  # type: ignore[no-untyped-def]
) -> None:
    """Partitions of one fetch are judged in one save, in the order the broker took them
    (the consumer's `in_arrival_order`): the partner whose message came first holds the
    registration, whichever partition it is on, and each partition's position is kept."""
    await open_pool(schema, MIGRATIONS)
    app = await asyncio.to_thread(CaptureApp, settings.dsn(), schema)
    company = f"Contested Co {uuid.uuid4().hex[:6]}"
    messages = []
    for partition, partner in ((1, "bravo"), (0, "alpha")):  # bravo's came first
        value = lead_value(partner, f"{partner}-1", company=company)
        headers = {"x-partner-id": partner, "x-message-id": f"{partner}-1",
                   "x-signature": sign("s", value)}  # fmt: skip
        messages.append(
            Incoming("partner.leads.v1", partition, 0, partner.encode(), value, headers)
        )
    names = {0: "t:p0", 1: "t:p1"}
    secrets = {"alpha": ["s"], "bravo": ["s"]}
    now = datetime.now(UTC)
    fetch = (names, messages, secrets, now, Rules())
    assert await asyncio.to_thread(app.handle_partner_fetch, *fetch) == 2
    assert [r["status"] for r in app.registrations_of("bravo")] == ["held"]
    assert app.registrations_of("bravo")[0]["conflicts"] == 1
    assert app.registrations_of("alpha") == []  # a conflict registers nothing
    assert app.tracked_positions(["t:p0", "t:p1"]) == {"t:p0": 1, "t:p1": 1}
    assert await asyncio.to_thread(app.handle_partner_fetch, *fetch) == 0  # once each
    app.close()


async def test_what_a_partner_writes_in_its_headers_and_fields_is_read_as_the_spec_says(
    settings: Settings,
    intake,  # type: ignore[no-untyped-def]
) -> None:
    """A signature in upper-case hex is the same signature; a header named like the relays'
    stamp (`x-relay-cluster`) is the partner's own and its message is answered like any other
    (it was dropped unanswered); a bad e-mail's error code is `invalid_email`."""
    _, partner, secret = intake
    upper, stamped, bad = (f"{partner}-{n}" for n in ("upper", "stamped", "bad"))
    upper_value, stamped_value = lead_value(partner, upper), lead_value(partner, stamped)
    bad_body = json.loads(lead_value(partner, bad))
    bad_body["contact"]["email"] = "li.wei.example.cn"
    bad_value = json.dumps(bad_body).encode()
    upper_headers = [
        (k, v.upper().replace(b"SHA256=", b"sha256=") if k == "x-signature" else v)
        for k, v in signed_headers(partner, upper, secret, upper_value)
    ]
    assert upper_headers != signed_headers(partner, upper, secret, upper_value)
    stamped_headers = [*signed_headers(partner, stamped, secret, stamped_value),
                       ("x-relay-cluster", b"some-other-cluster")]  # fmt: skip
    await send_partner_messages(settings.bootstrap_servers(), [
        (partner, upper_value, upper_headers),
        (partner, stamped_value, stamped_headers),
        (partner, bad_value, signed_headers(partner, bad, secret, bad_value)),
    ])  # fmt: skip
    answers = await answers_to(settings, partner, {upper, stamped, bad})
    assert answers[upper]["status"] == "accepted", answers[upper]
    assert answers[stamped]["status"] == "accepted", answers[stamped]
    assert answers[bad]["status"] == "rejected"
    assert [(e["field"], e["code"]) for e in answers[bad]["errors"]] == [
        ("contact.email", "invalid_email")
    ]


async def test_a_partner_added_or_a_secret_rotated_a_moment_ago_is_known(
    settings: Settings,
    schema: str,
    open_pool,
    background,  # type: ignore[no-untyped-def]
) -> None:
    """Secrets are cached for a minute here; a message refused on them has them read again
    first (it was dead-lettered as from an unknown partner, or rejected as badly signed)."""
    app, known, known_secret = await start_intake(settings, schema, open_pool, background, 60)
    pool = await open_pool(schema, MIGRATIONS)

    def message(partner: str, n: str, secret: str) -> tuple[str, bytes, list[tuple[str, bytes]]]:
        value = lead_value(partner, f"{partner}-{n}")
        return partner, value, signed_headers(partner, f"{partner}-{n}", secret, value)

    await send_partner_messages(settings.bootstrap_servers(), [message(known, "1", known_secret)])
    assert (await answers_to(settings, known, {f"{known}-1"}))[f"{known}-1"]["status"] == "accepted"
    new, new_secret = await register_partner(settings, pool, "n")  # after the secrets were read
    rotated = await rotate_partner(pool, known, datetime.now(UTC))
    await send_partner_messages(settings.bootstrap_servers(), [
        message(new, "1", new_secret), message(known, "2", rotated)])  # fmt: skip
    assert (await answers_to(settings, new, {f"{new}-1"}))[f"{new}-1"]["status"] == "accepted"
    assert (await answers_to(settings, known, {f"{known}-2"}))[f"{known}-2"]["status"] == "accepted"
    app.close()


async def test_secrets_read_again_for_a_fetch_see_a_partner_added_just_before_it(
    schema: str,
    open_pool,  # type: ignore[no-untyped-def]
) -> None:
    """A fetch that arrives after a partner was added sees it on the read again, however soon
    after the last read it comes (a 0.2 s floor between reads refused such a partner's first
    message as unknown, now and then on a fast machine); the read again is once a fetch."""
    pool = await open_pool(schema, MIGRATIONS)
    secrets = PartnerSecrets(pool, ttl=60)
    now = datetime.now(UTC)
    assert "early" not in await secrets.current(now)
    await add_partner(pool, "early", "s1")
    arrived = time.monotonic()  # the fetch with early's first message
    assert (await secrets.current(now)).get("early") is None  # the cache is a minute old at most
    assert (await secrets.reloaded(now, arrived))["early"] == ["s1"]
    await add_partner(pool, "later", "s2")
    assert "later" not in await secrets.reloaded(now, arrived)  # read once for that fetch
    assert (await secrets.reloaded(now, time.monotonic()))["later"] == ["s2"]

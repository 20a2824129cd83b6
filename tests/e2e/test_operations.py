"""Operations from an operator's seat, against the services running as processes: `dealstream
replay reporting --verify` finds nothing wrong on a healthy system, finds exactly the row an
intruder changed, and `replay reporting` rebuilds and swaps the read models while reporting
keeps answering."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from services.capture.domain import partner_lead_id
from services.pipeline.domain import opportunity_id_for
from shared.auth import Principal, Role, issue_token
from shared.contracts.events import EVENT_TYPES
from shared.devstack import DevStack
from tests.e2e.conftest import Services, cli, partner_secret
from tests.support import connected, eventually, lead_value, send_partner_messages, signed_headers

pytestmark = pytest.mark.e2e
LEADS = 24


def run(env: dict[str, str], *args: str) -> tuple[int, Any]:
    done = subprocess.run([sys.executable, "-m", "services.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode in (0, 1) and done.stdout.startswith("{"), done.stderr[-3000:]
    return done.returncode, json.loads(done.stdout)


@pytest.fixture(scope="module")
async def history(services: Services, e2e_stack: DevStack) -> dict[str, Any]:
    """Leads from a partner become opportunities; some move to B and some of those are lost;
    reporting has applied it all."""
    secret = partner_secret(cli(services.env, "partner", "add", "opsco"))
    messages, ids = [], []
    for _ in range(LEADS):
        message_id = f"opsco-{uuid.uuid4().hex[:10]}"
        value = lead_value("opsco", message_id)
        messages.append(("opsco", value, signed_headers("opsco", message_id, secret, value)))
        ids.append(opportunity_id_for(partner_lead_id("opsco", message_id)))
    await send_partner_messages(e2e_stack.kafka, messages)
    db = await asyncpg.connect(e2e_stack.database_url)

    async def in_reporting(condition: str = "TRUE") -> int:
        return int(await db.fetchval(
            f"SELECT count(*) FROM reporting.opportunity_now WHERE opportunity_id = ANY($1)"
            f" AND {condition}", ids,
        ))  # fmt: skip

    assert await eventually(in_reporting, lambda n: n == LEADS, within=60) == LEADS
    secret_key = services.env["DEALSTREAM_TOKEN_SECRET"]
    token = issue_token(Principal(role=Role.admin, user="ops"), secret_key, datetime.now(UTC),
                        timedelta(hours=1))  # fmt: skip
    bearer = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=services.url("pipeline"), headers=bearer) as http:
        for opportunity in ids[:10]:
            moved = await http.post(f"/v1/opportunities/{opportunity}/stage",
                                    json={"expected_version": 3, "to_stage": "B"})  # fmt: skip
            assert moved.status_code == 200, moved.text
        skipped = await http.post(f"/v1/opportunities/{ids[0]}/stage",
                                  json={"expected_version": 4, "to_stage": "D"})  # fmt: skip
        assert skipped.status_code == 409 and skipped.json()["code"] == "stage_skip"
        await asyncio.sleep(0.3)
        between = datetime.now(UTC)
        await asyncio.sleep(0.3)
        for opportunity in ids[:4]:
            lost = await http.post(f"/v1/opportunities/{opportunity}/lose",
                                   json={"expected_version": 4, "reason_code": "price",
                                         "note": "too dear"})  # fmt: skip
            assert lost.status_code == 200, lost.text
    assert await eventually(lambda: in_reporting("status = 'lost'"), lambda n: n == 4) == 4
    assert await eventually(lambda: in_reporting("stage = 'B'"), lambda n: n == 10) == 10
    await asyncio.sleep(1)  # let anything in flight land
    await db.close()
    return {"ids": ids, "token": token, "secret": secret, "between": between}


async def test_replay_verifies_finds_a_tampered_row_and_rebuilds_while_serving(
    services: Services, e2e_stack: DevStack, history: dict[str, Any]
) -> None:
    env = services.env
    code, healthy = run(env, "replay", "reporting", "--verify")
    assert (code, healthy["verified"], healthy["differences"]) == (0, True, [])
    assert healthy["applied"] >= LEADS * 3
    code, again = run(env, "replay", "reporting", "--verify")
    assert (code, again["verified"], again["applied"]) == (0, True, 0)  # resumed: nothing new

    tampered = history["ids"][5]
    db = await asyncpg.connect(e2e_stack.database_url)
    try:
        await db.execute("UPDATE reporting.opportunity_now SET amount = amount + 1"
                         " WHERE opportunity_id = $1", tampered)  # fmt: skip
        code, found = run(env, "replay", "reporting", "--verify")
        assert code == 1 and found["verified"] is False
        assert sorted(
            (d["table"], d["side"], d["key"]["opportunity_id"]) for d in found["differences"]
        ) == [
            ("opportunity_now", "live only", str(tampered)),
            ("opportunity_now", "rebuilt only", str(tampered)),
        ]
        live = next(d for d in found["differences"] if d["side"] == "live only")
        assert live["row"]["amount"] == "350001.00"

        code, swapped = run(env, "replay", "reporting")
        assert (code, swapped["swapped"]) == (0, True)
        assert await db.fetchval("SELECT amount FROM reporting.opportunity_now"
                                 " WHERE opportunity_id = $1", tampered) == 350000  # fmt: skip
        assert not await db.fetchval("SELECT count(*) FROM pg_namespace"
                                     " WHERE nspname LIKE 'reporting\\_%'")  # fmt: skip
    finally:
        await db.close()
    # The live service answers from the swapped tables, and applies new events to them.
    bearer = {"Authorization": f"Bearer {history['token']}"}
    async with httpx.AsyncClient(base_url=services.url("reporting"), headers=bearer) as http:
        funnel = (await http.get("/v1/reports/funnel", params={"source": "partner"})).json()
        assert funnel["total"]["count"] >= LEADS - 4
        message_id = f"opsco-{uuid.uuid4().hex[:10]}"
        value = lead_value("opsco", message_id)
        await send_partner_messages(
            e2e_stack.kafka,
            [("opsco", value, signed_headers("opsco", message_id, history["secret"], value))],
        )
        newcomer = str(opportunity_id_for(partner_lead_id("opsco", message_id)))

        async def partner_deals() -> int:
            answer = await http.get("/v1/reports/funnel", params={"partner": "opsco"})
            return int(answer.json()["total"]["count"])

        assert await eventually(partner_deals, lambda n: n == funnel["total"]["count"] + 1) == (
            funnel["total"]["count"] + 1
        )
    db = await asyncpg.connect(e2e_stack.database_url)
    try:
        assert (
            await db.fetchval(
                "SELECT count(*) FROM reporting.opportunity_now WHERE opportunity_id = $1", newcomer
            )
            == 1
        )
    finally:
        await db.close()
    code, after = run(env, "replay", "reporting", "--verify")
    assert (code, after["differences"]) == (0, [])


async def test_audit_lost_tells_each_lost_deal_event_for_event_with_findings(
    services: Services, history: dict[str, Any]
) -> None:
    env = services.env
    report = json.loads(cli(env, "audit", "lost", "--format", "json"))
    mine = {d["opportunity_id"]: d for d in report["deals"]}
    lost_ids = [str(i) for i in history["ids"][:4]]
    assert set(lost_ids) <= set(mine)
    assert report["summary"]["by_reason"]["price"] >= 4
    chosen = mine[lost_ids[0]]
    assert (chosen["reason"], chosen["stage"], chosen["note"]) == ("price", "B", "too dear")
    bearer = {"Authorization": f"Bearer {history['token']}"}
    async with httpx.AsyncClient(base_url=services.url("pipeline"), headers=bearer) as http:
        events = (await http.get(f"/v1/opportunities/{lost_ids[0]}/history")).json()
    told = [e for e in chosen["timeline"] if e["source"] == "event"]
    assert [(e["version"], e["type"], e["at"]) for e in told] == [
        (e["version"], e["event_type"], e["occurred_at"]) for e in events
    ]
    refused = [e for e in chosen["timeline"] if e["source"] == "refused"]
    assert [(e["type"], e["detail"]) for e in refused] == [("stage", "stage_skip")]
    assert "refused commands: stage_skip x1" in chosen["findings"]
    assert set(chosen["stage_days"]) == {"A", "B"}
    rows = list(csv.DictReader(io.StringIO(cli(env, "audit", "lost", "--format", "csv",
                                               "--reason", "price"))))  # fmt: skip
    assert {r["opportunity_id"] for r in rows} >= set(lost_ids)
    assert all(r["reason"] == "price" for r in rows)
    table = cli(env, "audit", "lost")
    assert f"{len(report['deals'])} lost deal(s)" in table and "! refused commands" in table


async def test_audit_show_and_export_tell_the_same_history_as_of_any_moment(
    services: Services, history: dict[str, Any]
) -> None:
    env = services.env
    chosen = str(history["ids"][1])
    then = json.loads(cli(env, "audit", "show", chosen, "--as-of",
                          history["between"].isoformat()))  # fmt: skip
    assert (then["state"]["status"], then["state"]["stage"], then["state"]["version"]) == (
        "open",
        "B",
        4,
    )
    assert [h["event_type"] for h in then["history"]][-1] == "OpportunityStageChanged"
    now = json.loads(cli(env, "audit", "show", chosen))
    assert (now["state"]["status"], now["state"]["version"]) == ("lost", 5)
    lines = cli(env, "export", "events", "--stream", chosen, "--format", "jsonl").splitlines()
    exported = [json.loads(line) for line in lines]
    assert [e["stream_version"] for e in exported] == [1, 2, 3, 4, 5]
    assert [e["event_type"] for e in exported] == [h["event_type"] for h in now["history"]]
    assert all(e["stream_id"] == chosen for e in exported)
    # Everything, partner messages among it: the bus contract's events only, leads included.
    everything = [json.loads(line) for line in cli(env, "export", "events").splitlines()]
    kinds = {e["event_type"] for e in everything}
    assert {"LeadCaptured", "OpportunityOpened", "OpportunityLost"} <= kinds <= set(EVENT_TYPES)


async def test_demo_loads_a_living_year_that_the_reports_and_audit_show(
    services: Services, e2e_stack: DevStack, history: dict[str, Any]
) -> None:
    env = services.env
    # (about 10 s on a quiet machine; the generous bound is for a busy one)
    output = cli(env, "demo", "--weeks", "10", "--per-week", "10", timeout=400)
    loaded = json.loads(output.splitlines()[-1])
    assert loaded["leads"] == loaded["opportunities"] == 100
    assert loaded["commands"] > 100 and loaded["notifications"] > 0
    bearer = {"Authorization": f"Bearer {history['token']}"}
    async with httpx.AsyncClient(base_url=services.url("reporting"), headers=bearer) as http:

        async def demo_partners() -> int:
            total = 0
            for partner in ("acme", "bolt", "cathay"):
                body = (await http.get("/v1/reports/win-rate", params={
                    "partner": partner, "from": "2020-01-01T00:00:00Z"})).json()  # fmt: skip
                total += body["total"]["won"] + body["total"]["lost"]
            return total

        assert await eventually(demo_partners, lambda n: n > 0) > 0
    lost = json.loads(cli(env, "audit", "lost", "--format", "json"))
    assert any(d["team"] in ("east", "north", "south", "europe") for d in lost["deals"])

    # A rebuild from scratch (set-based, services/reporting/bulk.py) over the demo's year equals
    # what the live consumer projected, once it has caught up (a later --verify resumes).
    async with connected(e2e_stack.database_url) as db:
        await db.execute("DROP SCHEMA IF EXISTS reporting_replay CASCADE")

    async def differences() -> list[Any]:
        _, verified = await asyncio.to_thread(run, env, "replay", "reporting", "--verify")
        return list(verified["differences"])

    assert await eventually(differences, lambda found: found == [], within=120) == []

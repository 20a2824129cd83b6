"""`dealstream dev` (what `make run` runs) from a user's seat: start it, register a partner with
the CLI, send a signed lead with a plain aiokafka producer, read the `accepted` reply, and see the
lead counted in the funnel; a web-form lead shows up the same way."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from services.capture.domain import partner_lead_id
from services.pipeline.domain import opportunity_id_for
from shared.devstack import free_port
from tests.e2e.conftest import cli, partner_secret
from tests.support import eventually, lead_value, read_topic, send_partner_messages, signed_headers


async def test_make_run_path_from_partner_message_and_web_form_to_funnel(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("kafka", "capture", "pipeline", "notify", "reporting")}
    env = {
        **os.environ,
        "DEALSTREAM_DATA_DIR": str(tmp_path / ".dealstream"),
        **{f"DEALSTREAM_{name.upper()}_PORT": str(port) for name, port in ports.items()},
    }
    env.pop("DEALSTREAM_KAFKA", None)
    env.pop("DEALSTREAM_DATABASE_URL", None)
    log = (tmp_path / "dev.log").open("wb")
    started = time.monotonic()
    dev = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "dev"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        up_in = None
        while time.monotonic() - started < 90 and up_in is None:
            if "DealStream is up" in (tmp_path / "dev.log").read_text():
                up_in = time.monotonic() - started
            assert dev.poll() is None, (tmp_path / "dev.log").read_text()[-3000:]
            await asyncio.sleep(0.2)
        assert up_in is not None, "dev did not come up within 90s"
        print(f"dealstream dev up in {up_in:.1f}s")

        bootstrap = f"127.0.0.1:{ports['kafka']}"
        out = cli(env, "partner", "add", "acme")
        secret = partner_secret(out)
        assert "kafka-acls.sh" in out and "--topic partner.acme.replies.v1" in out
        token = cli(env, "token", "issue", "--role", "ops", "--user", "ops1").strip()
        funnel_url = f"http://127.0.0.1:{ports['reporting']}/v1/reports/funnel"
        auth = {"Authorization": f"Bearer {token}"}
        http = httpx.AsyncClient(timeout=10)
        assert (await http.get(funnel_url)).status_code == 401

        message_id = f"acme-{uuid.uuid4().hex[:6]}"
        # Expected to close well after the tick below, whatever today is (a fixed date would
        # fire its own reminder at that tick once today came within four days of it).
        closes = (datetime.now(UTC) + timedelta(days=90)).date().isoformat()
        value = lead_value("acme", message_id, expected_close=closes)
        await send_partner_messages(
            bootstrap, [("acme", value, signed_headers("acme", message_id, secret, value))]
        )
        replies = await read_topic(bootstrap, "partner.acme.replies.v1", lambda r: len(r) >= 1)
        reply = json.loads(replies[0].value)
        assert reply["status"] == "accepted" and reply["message_id"] == message_id
        assert replies[0].key == message_id.encode()

        async def stage_a() -> int:
            body = (await http.get(funnel_url, headers=auth)).json()
            return int(body["rows"][0]["count"])  # stage A

        assert await eventually(stage_a, lambda n: n == 1) == 1

        # Nobody follows it up: notify's tick, run as an operator would, reminds on the bus.
        opportunity = opportunity_id_for(partner_lead_id("acme", message_id))
        notify = f"http://127.0.0.1:{ports['notify']}/v1"

        async def armed() -> set[str]:
            timers = await http.get(f"{notify}/timers?opportunity_id={opportunity}", headers=auth)
            return {t["kind"] for t in timers.json()} if timers.is_success else set()

        assert "follow_up" in await eventually(armed, lambda kinds: "follow_up" in kinds)
        later = (datetime.now(UTC) + timedelta(days=4)).isoformat()
        # A major deal (the lead's budget is 350,000): the branch manager is told at once.
        assert "notifications=2 " in cli(env, "notify", "tick", "--now", later)
        told = await http.get(f"{notify}/notifications?opportunity_id={opportunity}", headers=auth)
        assert sorted(n["kind"] for n in told.json()) == ["escalation", "follow_up_due"]
        for notification in told.json():
            assert notification["overdue_days"] == 1
            assert notification["deliveries"][0]["status"] == "sent"

        posted = await http.post(
            f"http://127.0.0.1:{ports['capture']}/v1/leads",
            data={
                "company.name": "Web Form Co",
                "company.region": "CN-BJ",
                "contact.name": "Wang",
                "contact.email": "wang@example.cn",
                "channel": "web_form",
            },
        )
        assert posted.status_code == 202 and uuid.UUID(posted.json()["lead_id"])
        refused = await http.post(
            f"http://127.0.0.1:{ports['capture']}/v1/leads",
            json={"company": {"name": ""}, "contact": {"name": "Wang"}},
        )
        assert refused.status_code == 422
        assert refused.json()["errors"][0]["field"] == "company.name"
        assert await eventually(stage_a, lambda n: n == 2) == 2
        for port in (ports["capture"], ports["pipeline"], ports["notify"], ports["reporting"]):
            alive = await http.get(f"http://127.0.0.1:{port}/healthz")
            assert alive.json() == {"status": "alive"}
        await http.aclose()
    finally:
        dev.send_signal(signal.SIGINT)
        dev.wait(60)
    assert dev.returncode == 0
    assert "stopped" in (tmp_path / "dev.log").read_text()

"""Erasure (SPEC §8): a lead's contact is sealed with its own key from the start and matched by
keyed hashes, so forgetting it — destroying the key — leaves no readable trace: reads show the
contact erased, the deal's numbers stay, the erasure is an event, and the database's raw bytes
hold none of the erased values."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.capture.app import MIGRATIONS, CaptureApp
from services.capture.bus import route
from shared.contracts.envelope import HEADER_EVENT_TYPE
from shared.contracts.partner import WebFormLead
from shared.contracts.topics import LEAD_EVENTS
from shared.devstack import DevStack
from shared.privacy import ERASED_CONTACT
from shared.settings import Settings

NOW = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def raw_files_holding(root: Path, needles: list[bytes]) -> dict[bytes, list[str]]:
    """Which files under the database's data directory contain each byte string."""
    found: dict[bytes, list[str]] = {n: [] for n in needles}
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for needle in needles:
                if needle in data:
                    found[needle].append(str(path.relative_to(root)))
    return found


def captured(app: CaptureApp, lead_id: uuid.UUID) -> list[Any]:
    return app.events_of([lead_id])[lead_id]


async def test_a_forgotten_lead_shows_its_contact_erased_and_the_disk_holds_none_of_it(
    settings: Settings, stack: DevStack, schema: str, open_pool: Any
) -> None:
    pool = await open_pool(schema, MIGRATIONS)
    app = await asyncio.to_thread(CaptureApp, settings.dsn(), schema, 2)
    marker = uuid.uuid4().hex[:12]
    name, email = f"Erasable Person {marker}", f"erase.{marker}@example.cn"
    phone_digits = f"{uuid.uuid4().int % 10**8:08d}"
    form = WebFormLead.model_validate({
        "company": {"name": f"Keepable Co {marker}", "region": "CN-SH"},
        "contact": {"name": name, "email": email, "phone": f"+86 139 {phone_digits}"},
        "budget": {"amount": "88000.00", "currency": "CNY"},
    })  # fmt: skip
    lead_id = await asyncio.to_thread(app.capture_web_lead, form, NOW, "c-erase")
    [before] = await asyncio.to_thread(captured, app, lead_id)
    assert before.payload["contact"]["email"] == email  # readers see it while it is kept
    stored = await pool.fetchval(
        f"SELECT state FROM {schema}.capture_events WHERE originator_id = $1", lead_id
    )
    assert email.encode() not in stored and b"sealed" in stored  # never stored in clear
    # Still matched by its keyed hashes: the same e-mail again is the same customer.
    other = {"name": "Other Co", "region": "CN-BJ"}
    again = WebFormLead.model_validate({**form.model_dump(mode="json"), "company": other})
    twin = await asyncio.to_thread(app.capture_web_lead, again, NOW + timedelta(hours=1), "c-2")
    twin_events = await asyncio.to_thread(captured, app, twin)
    assert twin_events[0].payload["duplicate_of"] == str(lead_id)

    assert await asyncio.to_thread(app.forget, lead_id, NOW + timedelta(days=1)) is True
    assert await asyncio.to_thread(app.forget, lead_id, NOW + timedelta(days=2)) is False
    opened, forgotten = await asyncio.to_thread(captured, app, lead_id)
    assert opened.payload["contact"] == ERASED_CONTACT
    assert opened.payload["budget"] == {"amount": "88000.00", "currency": "CNY"}
    assert opened.payload["company"]["name"] == f"Keepable Co {marker}"
    assert forgotten.public_name == "LeadForgotten"
    assert forgotten.payload["lead_id"] == str(lead_id)
    [published] = route(forgotten, None)  # sales systems hear of the erasure too
    assert published.topic == LEAD_EVENTS
    assert dict(published.headers)[HEADER_EVENT_TYPE] == b"LeadForgotten"
    assert await pool.fetchval("SELECT count(*) FROM subject_key WHERE lead_id = $1", lead_id) == 0
    assert await pool.fetchval("SELECT count(*) FROM lead_key WHERE rule IN ('email', 'phone')"
                               " AND lead_id = $1", lead_id) == 0  # fmt: skip
    app.close()

    # Every page and log the database wrote: the erased values are nowhere; the company name,
    # written the same way, is found (the scan works).
    await pool.execute("CHECKPOINT")
    found = await asyncio.to_thread(
        raw_files_holding, stack.settings.data_dir / "pg",
        [email.encode(), phone_digits.encode(), name.encode(), f"Keepable Co {marker}".encode()],
    )  # fmt: skip
    assert found[email.encode()] == [] and found[name.encode()] == []
    assert found[phone_digits.encode()] == []
    assert found[f"Keepable Co {marker}".encode()] != []


def test_dealstream_forget_erases_through_the_command_line(
    settings: Settings, stack: DevStack
) -> None:
    env = {**os.environ, **stack.env(), "DEALSTREAM_DATA_DIR": str(stack.settings.data_dir)}

    def dealstream(*args: str, status: int = 0) -> str:
        done = subprocess.run([sys.executable, "-m", "services.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == status, done.stderr
        return (done.stdout or done.stderr).strip()

    dealstream("migrate")  # the command works on the service's own schema, as operators run it
    app = CaptureApp(settings.dsn(), "capture", 2)
    form = WebFormLead.model_validate({"company": {"name": "Cli Co"}, "contact": {"name": "Zhao"}})
    lead_id = app.capture_web_lead(form, NOW, "c-cli")
    app.close()
    assert dealstream("forget", str(lead_id)) == f"lead {lead_id}: contact erased"
    assert dealstream("forget", str(lead_id)) == f"lead {lead_id}: contact was erased before"
    unknown = uuid.uuid4()  # no lead: said in one line, not a traceback
    assert dealstream("forget", str(unknown), status=2) == f"dealstream forget: no lead {unknown}"

"""`dealstream pipeline tick --now` as operations run it: a subprocess against the real database
recycles what was idle for `recycle_days` as of that moment, and nothing else."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime

from services.pipeline.app import MIGRATIONS, SCHEMA, PipelineApp
from services.pipeline.domain import opportunity_id_for
from shared.devstack import DevStack
from shared.runtime import open_schema
from shared.settings import Settings
from tests.factories import lead_captured


async def test_tick_recycles_what_was_idle_as_of_now(settings: Settings, stack: DevStack) -> None:
    pool = await open_schema(settings, SCHEMA, MIGRATIONS)
    app = await asyncio.to_thread(PipelineApp, settings.dsn(), SCHEMA)
    old, recent = uuid.uuid4(), uuid.uuid4()
    items = []
    for n, (lead, captured) in enumerate(((old, "2026-01-05T09:00:00Z"),
                                          (recent, "2026-02-20T09:00:00Z")), start=1):  # fmt: skip
        envelope = lead_captured(lead)
        envelope = envelope.model_copy(update={"data": {**envelope.data, "captured_at": captured}})
        items.append((n, envelope))
    await asyncio.to_thread(app.apply_lead_events, "capture:p9", items, settings.rules())
    env = {**os.environ, **stack.env(), "DEALSTREAM_DATA_DIR": str(stack.settings.data_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "pipeline", "tick", "--now", "2026-03-10T00:00:00Z"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"recycled {opportunity_id_for(old)}" in done.stdout
    assert str(opportunity_id_for(recent)) not in done.stdout
    status = {
        row["opportunity_id"]: row["status"]
        for row in await pool.fetch("SELECT opportunity_id, status FROM opportunity_index")
    }
    assert status[opportunity_id_for(old)] == "recycled"
    assert status[opportunity_id_for(recent)] == "open"
    recycled = await asyncio.to_thread(app.get, opportunity_id_for(old))
    assert recycled.status == "recycled" and recycled.last_activity_at == datetime(
        2026, 3, 10, tzinfo=UTC
    )
    bad = subprocess.run(
        [sys.executable, "-m", "services.cli", "pipeline", "tick", "--now", "2026-03-10"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "time zone" in bad.stderr
    app.close()
    await pool.close()

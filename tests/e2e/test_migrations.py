"""Schema migrations as operators meet them: `dealstream migrate` on an empty database, and on a
database left at the previous schema version with data in it (every service's steps but its
last, as the release before this one knew them); then the four services start on it and the
data is all there."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import cast
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from services.capture.app import MIGRATIONS as CAPTURE
from services.notify.timers import MIGRATIONS as NOTIFY
from services.pipeline.app import MIGRATIONS as PIPELINE
from services.pipeline.app import PipelineApp
from services.pipeline.domain import Opportunity
from services.pipeline.rules import route
from services.reporting.projection import MIGRATIONS as REPORTING
from shared.contracts.events import LeadCaptured
from shared.devstack import DevStack
from shared.settings import Settings
from shared.store.migrations import Migration, SchemaTooNew, migrate
from tests.e2e.conftest import SERVICES, Services, cli
from tests.factories import lead_captured
from tests.support import connected

pytestmark = pytest.mark.e2e

STEPS: dict[str, list[Migration]] = {
    "capture": CAPTURE,
    "pipeline": PIPELINE,
    "notify": NOTIFY,
    "reporting": REPORTING,
}


def latest(schema: str) -> int:
    return max(version for version, _ in STEPS[schema])


async def new_database(stack: DevStack, name: str) -> str:
    async with connected(stack.database_url) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(stack.database_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def services_on(stack: DevStack, url: str, logs_dir: object) -> Services:
    running = Services(stack, logs_dir)  # type: ignore[arg-type]
    running.env["DEALSTREAM_DATABASE_URL"] = url
    return running


async def versions(url: str) -> dict[str, int]:
    async with connected(url) as conn:
        return {
            schema: await conn.fetchval(f'SELECT max(version) FROM "{schema}".schema_version')
            for schema in STEPS
        }


async def test_an_empty_database_is_migrated_to_the_latest_version_of_every_schema(
    e2e_stack: DevStack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    url = await new_database(e2e_stack, f"empty_{uuid.uuid4().hex[:8]}")
    running = services_on(e2e_stack, url, tmp_path_factory.mktemp("logs"))
    printed = cli(running.env, "migrate")
    assert await versions(url) == {schema: latest(schema) for schema in STEPS}
    for schema in STEPS:
        assert f"{schema}: schema version {latest(schema)}" in printed
    assert cli(running.env, "migrate") == printed  # run again: nothing more to do
    # The event stores are the migrations' too, recorded with the rest.
    async with connected(url) as conn:
        for table in ("capture.capture_events", "capture.capture_tracking",
                      "pipeline.pipeline_events", "pipeline.pipeline_tracking"):  # fmt: skip
            assert await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table), table


async def test_a_database_at_the_previous_version_keeps_its_data_and_the_services_start(
    e2e_stack: DevStack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    url = await new_database(e2e_stack, f"previous_{uuid.uuid4().hex[:8]}")
    settings = Settings(database_url=url, config_file=e2e_stack.settings.config_file)
    async with connected(url) as conn:
        for schema, steps in STEPS.items():  # the release before: all steps but the last
            previous = sorted(steps)[:-1]
            assert await migrate(conn, schema, previous) == previous[-1][0]
        await conn.execute(
            "INSERT INTO capture.partners (partner_id, secret) VALUES ('acme', 'acme-secret')"
        )
        notify_stream = uuid.uuid4()
        await conn.execute(
            "INSERT INTO notify.stream_position (stream_id, version) VALUES ($1, 3)", notify_stream
        )
        await conn.execute(
            "INSERT INTO reporting.funnel_now VALUES"
            " ('open', 'B', 'CNY', 'li', 'east', 'CN-BJ', 'web', '', 'standard', 2, 900, 450)"
        )
    # An opportunity in the pipeline's event store and index, written by the service's code.
    app = await asyncio.to_thread(PipelineApp, url, "pipeline", 1)
    # The release before had no event-store step: the library made its tables at start (what
    # this call does), and `migrate` must keep them as they are.
    await asyncio.to_thread(app.recorder.create_table)  # type: ignore[attr-defined]
    try:
        lead = cast(LeadCaptured, lead_captured(uuid.uuid4()).contract())
        rules = settings.rules()
        opened = Opportunity.open_from_lead(
            lead, rules, route(lead, rules.directory, rules.routing, {}), "e-1", "c-1"
        )
        await asyncio.to_thread(app.record, [opened], None, app.index_writes([opened]))
    finally:
        app.close()

    running = services_on(e2e_stack, url, tmp_path_factory.mktemp("logs"))
    cli(running.env, "migrate")
    assert await versions(url) == {schema: latest(schema) for schema in STEPS}
    for service in SERVICES:
        running.start(service)
    try:
        running.wait_ready()
        token = cli(running.env, "token", "issue", "--role", "admin", "--user", "ops").strip()
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(headers=headers, timeout=10) as http:
            got = await http.get(f"{running.url('pipeline')}/v1/opportunities/{opened.id}")
            funnel = await http.get(f"{running.url('reporting')}/v1/reports/funnel",
                                    params={"region": "CN-BJ"})  # fmt: skip
        assert got.status_code == 200, got.text
        assert got.json()["title"] == opened.title and got.json()["version"] == 3
        assert funnel.status_code == 200, funnel.text
        stage_b = next(row for row in funnel.json()["rows"] if row["stage"] == "B")
        assert (stage_b["count"], Decimal(str(stage_b["amount"]))) == (2, Decimal("900"))
        assert "acme" in cli(running.env, "partner", "list")
    finally:
        running.stop()
    async with connected(url) as conn:
        position = await conn.fetchval(
            "SELECT version FROM notify.stream_position WHERE stream_id = $1", notify_stream
        )
        assert position == 3
        row = await conn.fetchrow("SELECT n, amount FROM reporting.funnel_now WHERE stage = 'B'")
        assert (row["n"], row["amount"]) == (2, Decimal("900.00"))


async def test_a_schema_newer_than_the_code_stops_the_migration_and_the_service(
    e2e_stack: DevStack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    url = await new_database(e2e_stack, f"newer_{uuid.uuid4().hex[:8]}")
    async with connected(url) as conn:
        await migrate(conn, "notify", NOTIFY)
        await conn.execute("INSERT INTO notify.schema_version (version) VALUES (99)")
        with pytest.raises(SchemaTooNew, match="version 99"):
            await migrate(conn, "notify", NOTIFY)
    # A service of an older release, started on it, refuses to run, and says why.
    running = services_on(e2e_stack, url, tmp_path_factory.mktemp("logs"))
    running.start("notify")
    notify = running.processes.pop("notify")
    try:
        exited = await asyncio.to_thread(notify.wait, 60)
    finally:
        if notify.poll() is None:  # it ran on: the failure below, and no process left behind
            notify.kill()
            notify.wait()
    assert exited != 0
    assert "schema notify is at version 99" in (running.logs / "notify.log").read_text()

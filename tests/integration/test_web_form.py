"""The public web-form intake (SPEC §3, §8) on real PostgreSQL: a lead is durable before the 202,
bad input gets field errors, bots that fill the honeypot store nothing, and each client is rate
limited."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from services.capture.api import create_api
from services.capture.app import MIGRATIONS, CaptureApp
from services.capture.domain import Incoming, sign
from services.capture.intake_limits import RateLimiter
from shared.auth import Principal, Role, issue_token
from shared.clock import SystemClock
from shared.contracts.asyncapi import canonical, document
from shared.settings import Rules, Settings
from tests.support import lead_value

FORM = {"company": {"name": "Web Co", "region": "CN-BJ"}, "contact": {"name": "Wang"}}


@pytest.fixture
async def web(
    settings: Settings, schema: str, open_pool
) -> AsyncIterator[tuple[httpx.AsyncClient, CaptureApp]]:  # type: ignore[no-untyped-def]
    await open_pool(schema, MIGRATIONS)
    app = await asyncio.to_thread(CaptureApp, settings.dsn(), schema)
    api = create_api(
        app, settings, SystemClock(), lambda: None, RateLimiter(per_minute=60, burst=8)
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(api), base_url="http://capture"
    ) as http:
        yield http, app
    app.close()


async def test_a_lead_is_durable_before_202_and_bad_input_gets_field_errors(web) -> None:  # type: ignore[no-untyped-def]
    http, app = web
    posted = await http.post("/v1/leads", json={**FORM, "channel": "event"})
    assert posted.status_code == 202
    lead_id = uuid.UUID(posted.json()["lead_id"])
    stored = app.repository.get(lead_id)  # read straight after the answer: already there
    assert stored.details["channel"] == "event" and stored.details["source"] == "event"
    cases = [
        ({**FORM, "channel": "fax"}, "channel"),
        ({**FORM, "budget": {"amount": "1e30", "currency": "CNY"}}, "budget.amount"),
        ({**FORM, "contact": {"name": "W", "email": "no-at-sign"}}, "contact.email"),
        # No text column takes a NUL; the pipeline would have stopped at this lead's title.
        ({**FORM, "company": {"name": "Nul\x00 Co", "region": "CN-BJ"}}, "company.name"),
    ]
    for body, field in cases:
        refused = await http.post("/v1/leads", json=body)
        assert refused.status_code == 422, body
        assert refused.json()["errors"][0]["field"] == field
    deep = await http.post(
        "/v1/leads", content=b"[" * 5000, headers={"content-type": "application/json"}
    )
    assert deep.status_code == 422 and deep.json()["errors"][0]["code"] == "invalid_json"
    huge = await http.post("/v1/leads", content=json.dumps({**FORM, "need": "x" * 70000}))
    assert huge.status_code == 413

    async def chunks() -> AsyncIterator[bytes]:  # no length declared: read up to the limit
        for _ in range(64):
            yield b" " * 16384

    assert (await http.post("/v1/leads", content=chunks())).status_code == 413


async def test_input_that_once_made_500s_gets_field_errors(web) -> None:  # type: ignore[no-untyped-def]
    http, _app = web
    # Once 500s: a NUL found by walking nesting deeper than recursion goes, a lone surrogate
    # in the key naming where the NUL is (the answer could not be written), a close in 9999.
    as_deep = await http.post("/v1/leads", content=(
        b'{"need":"\\u0000","x":' + b"[" * 900 + b"]" * 900 + b"}"
    ), headers={"content-type": "application/json"})  # fmt: skip
    form_deep = await http.post("/v1/leads", content=b"a" + b".a" * 3000 + b"=%00", headers={
        "content-type": "application/x-www-form-urlencoded"})  # fmt: skip
    surrogate = await http.post("/v1/leads", content=b'{"\\udfff": "\\u0000"}',
                                headers={"content-type": "application/json"})  # fmt: skip
    far = await http.post("/v1/leads", json={**FORM, "expected_close": "9999-12-31"})
    for answer, field in ((as_deep, "need"), (form_deep, "a." * 3000 + "a"),
                          (surrogate, "\\udfff"), (far, "expected_close")):  # fmt: skip
        assert answer.status_code == 422, answer.text
        assert [e["field"] for e in answer.json()["errors"]] == [field]


async def test_the_honeypot_stores_nothing(web) -> None:  # type: ignore[no-untyped-def]
    http, app = web
    bot = await http.post("/v1/leads", data={"company.name": "Spam", "contact.name": "Bot",
                                             "website": "http://spam.example"})  # fmt: skip
    assert bot.status_code == 202
    assert app.existing_ids([uuid.UUID(bot.json()["lead_id"])]) == set()


async def test_each_client_is_rate_limited(settings: Settings, web) -> None:  # type: ignore[no-untyped-def]
    _, app = web
    # The limiter's clock stands still: on a slow machine nine durable posts can take a
    # second, and the bucket would have a token again.
    limiter = RateLimiter(per_minute=60, burst=8, now=lambda: 0.0)
    api = create_api(app, settings, SystemClock(), lambda: None, limiter)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://c") as http:
        answers = [await http.post("/v1/leads", json=FORM) for _ in range(9)]
    assert [a.status_code for a in answers] == [202] * 8 + [429]
    assert int(answers[-1].headers["Retry-After"]) >= 1


def test_the_limiter_refills_and_forgets_idle_clients() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, now=lambda: now[0], max_clients=2)
    assert limiter.retry_after("a") is None and limiter.retry_after("a") is None
    assert limiter.retry_after("a") == pytest.approx(1.0)
    now[0] = 1.0
    assert limiter.retry_after("a") is None
    limiter.retry_after("b")
    now[0] = 100.0
    limiter.retry_after("c")  # three clients tracked: the idle ones are forgotten
    assert set(limiter._buckets) == {"c"}


async def test_capture_serves_the_bus_contract(web) -> None:  # type: ignore[no-untyped-def]
    http, _ = web
    served = await http.get("/asyncapi")
    assert served.status_code == 200
    assert served.json() == json.loads(canonical(document()))


async def test_registrations_are_partner_scoped(settings: Settings, web) -> None:  # type: ignore[no-untyped-def]
    http, app = web
    value = lead_value("acme", "acme-reg-1")
    incoming = Incoming("partner.leads.v1", 0, 0, b"acme", value,
                        {"x-partner-id": "acme", "x-message-id": "acme-reg-1",
                         "x-signature": sign("s3cret", value)})  # fmt: skip
    await asyncio.to_thread(app.handle_partner_messages, "t:p0", [incoming],
                            {"acme": ["s3cret"]}, datetime.now(UTC), Rules())  # fmt: skip

    def auth(role: Role, user: str) -> dict[str, str]:
        token = issue_token(Principal(role=role, user=user), settings.secret_for_tokens(),
                            datetime.now(UTC), timedelta(hours=1))  # fmt: skip
        return {"Authorization": f"Bearer {token}"}

    url = "/v1/partners/acme/registrations"
    own = await http.get(url, headers=auth(Role.partner, "acme"))
    assert own.status_code == 200 and [r["status"] for r in own.json()] == ["held"]
    assert (await http.get(url, headers=auth(Role.partner, "globex"))).status_code == 404
    assert (await http.get(url, headers=auth(Role.rep, "rep1"))).status_code == 403
    assert (await http.get(url, headers=auth(Role.manager, "mgr1"))).status_code == 403
    assert (await http.get(url, headers=auth(Role.ops, "ops1"))).status_code == 200
    assert (await http.get(url)).status_code == 401

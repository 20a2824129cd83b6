"""Reporting's HTTP API: the report routes of SPEC §6 as JSON or `?format=csv`, with the roles
of SPEC §8 (a rep sees own numbers, a manager the team's, ops and admin all, a partner only its
own commissions), and the dashboard at `GET /`."""

from __future__ import annotations

import csv
import io
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import asyncpg
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from services.reporting import queries
from services.reporting.domain import next_period, period_start, previous_period, year_before
from services.reporting.queries import Filters
from shared.auth import Principal, Role
from shared.clock import Clock, SystemClock
from shared.contracts.common import jsonable
from shared.http_auth import bearer
from shared.runtime import (
    Readiness,
    asked,
    correlate,
    health_router,
    observed,
    projection_refresh,
)
from shared.settings import Settings

STATIC = Path(__file__).parent / "static"
Grain = Literal["day", "week", "month", "quarter"]
GroupBy = Literal["owner", "team", "region", "source", "partner", "tier"]
MAX_BUCKETS = 60


def local(at: datetime | None, zone: tzinfo) -> datetime | None:
    """A time asked without an offset (`2026-03-01T00:00:00`) is in the reports' time zone."""
    return at.replace(tzinfo=zone) if at is not None and at.tzinfo is None else at


def as_csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and not isinstance(v, list)]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in jsonable(row).items()})
    return out.getvalue()


def create_api(
    settings: Settings,
    pool: asyncpg.Pool,
    readiness: Callable[[], Readiness | None],
    clock: Clock | None = None,
) -> FastAPI:
    api = observed(
        correlate(FastAPI(title="DealStream reporting", version="1")),
        "reporting",
        readiness,
        projection_refresh("reporting", readiness),
    )
    api.include_router(health_router(readiness))
    time = clock or SystemClock()
    authenticated = bearer(settings, time)

    def filters(
        principal: Principal = Depends(authenticated),
        as_of: datetime | None = None,
        group_by: GroupBy | None = None,
        currency: str = Query("CNY", pattern=r"^[A-Z]{3}$"),
        owner: str | None = None,
        team: str | None = None,
        region: str | None = None,
        source: str | None = None,
        partner: str | None = None,
        tier: str | None = None,
    ) -> Filters:
        zone = ZoneInfo(settings.rules().reporting.timezone)
        at = asked("as_of", local(as_of, zone))
        where = {k: v for k, v in (("owner", owner), ("team", team), ("region", region),
                                   ("source", source), ("partner", partner), ("tier", tier))
                 if v is not None}  # fmt: skip
        if principal.role is Role.rep:
            where["owner"] = principal.user  # a rep's own numbers, whatever was asked
        elif principal.role is Role.manager:
            if principal.team is None:
                raise HTTPException(403, "a manager token needs a team")
            where["team"] = principal.team
        elif principal.role is Role.partner:
            where["partner"] = principal.user
        return Filters(at, currency, where, group_by, zone)

    def internal(principal: Principal = Depends(authenticated)) -> Principal:
        if principal.role is Role.partner:
            raise HTTPException(403, "partners read only their commissions")
        return principal

    def period(
        f: Filters, at: datetime, start: datetime | None, end: datetime | None
    ) -> tuple[datetime, datetime]:
        """[from, to): by default the month so far in the reports' time zone (or, given only
        `to`, the month up to it). `at` was checked (`filters`), or is now.
        All lie in 1970-2199 (`asked`): a period compared with the one before it, or a year
        before, stays within what dates can hold."""
        start, end = local(start, f.zone), local(end, f.zone)
        asked("from", start)  # checked; kept in the zone they were given
        asked("to", end)
        start = start or period_start(end - timedelta(microseconds=1) if end else at, "month",
                                      f.zone)  # fmt: skip
        end = end or at
        if start >= end:
            raise HTTPException(422, "from must be before to")
        return start, end

    def answer(report: str, f: Filters, body: dict[str, Any], fmt: str | None) -> Response:
        if fmt == "csv":
            disposition = f'attachment; filename="{report}.csv"'
            return Response(as_csv(body["rows"]), media_type="text/csv; charset=utf-8",
                            headers={"content-disposition": disposition})  # fmt: skip
        head = {"report": report, "as_of": f.as_of, "currency": f.currency,
                "group_by": f.group_by, "filters": f.where, "time_zone": str(f.zone)}  # fmt: skip
        return JSONResponse(jsonable({**head, **body}))

    PeriodReport = Callable[[asyncpg.Pool, Filters, datetime, datetime], Awaitable[dict[str, Any]]]

    async def periodic(report: str, run: PeriodReport, f: Filters, start: datetime | None,
                       end: datetime | None, grain: Grain | None, compare: bool,
                       fmt: str | None) -> Response:  # fmt: skip
        at = f.as_of or time.now()
        begin, finish = period(f, at, start, end)
        body = await run(pool, f, begin, finish)
        body["period"] = {"from": begin, "to": finish}
        if compare:
            before, until = previous_period(begin, finish, f.zone)
            body["compare"] = {
                "previous": {"from": before, "to": until,
                             "total": (await run(pool, f, before, until))["total"]},
                "year_ago": {"from": year_before(begin), "to": year_before(finish),
                             "total": (await run(pool, f, year_before(begin),
                                                 year_before(finish)))["total"]},
            }  # fmt: skip
        if grain is not None:
            series = []
            bucket = period_start(begin, grain, f.zone)
            while bucket < finish and len(series) < MAX_BUCKETS:
                upper = next_period(bucket, grain, f.zone)
                part = await run(pool, f, max(bucket, begin), min(upper, finish))
                series.append({"from": bucket, "to": upper, "first_day": bucket.date(),
                               "total": part["total"]})  # fmt: skip
                bucket = upper
            body["series"] = series
        return answer(report, f, body, fmt)

    base = "/v1/reports"
    csv_format = Query(None, alias="format", pattern="^(json|csv)$")

    @api.get(f"{base}/funnel", dependencies=[Depends(internal)])
    async def funnel(f: Filters = Depends(filters), fmt: str | None = csv_format) -> Response:
        return answer("funnel", f, await queries.funnel(pool, f, settings.rules()), fmt)

    def period_route(path: str, report: str, run: PeriodReport) -> None:
        async def route(
            f: Filters = Depends(filters),
            start: datetime | None = Query(None, alias="from"),
            end: datetime | None = Query(None, alias="to"),
            grain: Grain | None = None,
            compare: bool = False,
            fmt: str | None = csv_format,
        ) -> Response:
            return await periodic(report, run, f, start, end, grain, compare, fmt)

        api.get(f"{base}/{path}", dependencies=[Depends(internal)], name=report)(route)

    period_route("pass-through", "pass_through", queries.pass_through)
    period_route("win-rate", "win_rate", queries.win_rate)
    period_route("cycle-time", "cycle_time", queries.cycle_time)
    period_route("loss-reasons", "loss_reasons", queries.loss_reasons)

    @api.get(f"{base}/fresh", dependencies=[Depends(internal)])
    async def fresh(f: Filters = Depends(filters), fmt: str | None = csv_format) -> Response:
        return answer("fresh", f, await queries.fresh(pool, f, f.as_of or time.now()), fmt)

    @api.get(f"{base}/forecast", dependencies=[Depends(internal)])
    async def forecast(f: Filters = Depends(filters), fmt: str | None = csv_format) -> Response:
        now = time.now()
        return answer("forecast", f, await queries.forecast(pool, f, f.as_of or now, now), fmt)

    @api.get(f"{base}/partner-commissions")
    async def commissions(
        f: Filters = Depends(filters),
        start: datetime | None = Query(None, alias="from"),
        end: datetime | None = Query(None, alias="to"),
        fmt: str | None = csv_format,
    ) -> Response:
        at = f.as_of or time.now()
        begin, finish = period(f, at, start or datetime(2000, 1, 1, tzinfo=UTC), end)
        partner = f.where.pop("partner", None)  # commissions filter on the registering partner
        body = await queries.partner_commissions(pool, f, begin, finish, partner, at)
        body["period"] = {"from": begin, "to": finish}
        return answer("partner_commissions", f, body, fmt)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "dashboard.html")

    @api.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file():
            raise HTTPException(404, "no such file")
        return FileResponse(path)

    return api

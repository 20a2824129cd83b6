"""Notify's HTTP API (bearer token, roles of SPEC §8): who was told what, when, through which
channel, and how each delivery went; and an opportunity's armed timers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
from fastapi import Depends, FastAPI, HTTPException, Query
from pydantic import BaseModel

from shared.auth import Principal, Role, visible
from shared.contracts.notifications import NotificationIssued
from shared.http_auth import bearer
from shared.metrics import backlog_refresh
from shared.runtime import Readiness, correlate, health_router, observed
from shared.settings import Settings


class DeliveryView(BaseModel):
    channel: str
    address: str | None
    status: str  # pending | sent | dead
    attempts: int
    last_error: str | None
    sent_at: datetime | None


class NotificationView(NotificationIssued):
    deliveries: list[DeliveryView]


class TimerView(BaseModel):
    opportunity_id: uuid.UUID
    kind: str
    due_at: datetime
    derived_from: uuid.UUID
    fired_at: datetime | None


# What /metrics calls the reminder backlog: timers due and not fired, deliveries not yet sent.
BACKLOG = (
    "SELECT (SELECT count(*) FROM timer WHERE fired_at IS NULL AND due_at <= now())"
    " + (SELECT count(*) FROM delivery WHERE status = 'pending')"
)


def create_api(
    settings: Settings, pool: asyncpg.Pool, readiness: Callable[[], Readiness | None]
) -> FastAPI:
    api = observed(
        correlate(FastAPI(title="DealStream notify", version="1")),
        "notify",
        readiness,
        backlog_refresh("notify", pool, BACKLOG),
    )
    api.include_router(health_router(readiness))
    authenticated = bearer(settings)

    async def scope(
        principal: Principal, opportunity_id: uuid.UUID | None
    ) -> tuple[str, list[Any]]:
        """The SQL condition on `notification n` of what the caller may read: a rep their own
        opportunities' notifications and their own; a manager the team's; ops and admin all.
        Another's opportunity is 404, as in pipeline."""
        if principal.role is Role.partner:
            raise HTTPException(403, "partners do not read notifications")
        if opportunity_id is not None:
            row = await pool.fetchrow(
                "SELECT owner, team FROM opportunity_picture WHERE opportunity_id = $1",
                opportunity_id,
            )
            known = row is not None or await pool.fetchval(
                "SELECT 1 FROM notification WHERE opportunity_id = $1 LIMIT 1", opportunity_id
            )
            owner, team = (row["owner"], row["team"]) if row else (None, None)
            if not known or not visible(principal, owner, team):
                raise HTTPException(404, "no such opportunity (or not yours)")
            return "n.opportunity_id = $1", [opportunity_id]
        if principal.role in (Role.ops, Role.admin):
            return "TRUE", []
        if principal.role is Role.manager:
            return "(n.team = $1 OR n.recipient = $2)", [principal.team, principal.user]
        return (
            "(n.recipient = $1 OR n.opportunity_id IN"
            " (SELECT opportunity_id FROM opportunity_picture WHERE owner = $1))",
            [principal.user],
        )

    @api.get("/v1/notifications", response_model=list[NotificationView])
    async def notifications(
        opportunity_id: uuid.UUID | None = None,
        kind: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
        principal: Principal = Depends(authenticated),
    ) -> list[NotificationView]:
        where, args = await scope(principal, opportunity_id)
        if kind is not None:
            args.append(kind)
            where += f" AND n.kind = ${len(args)}"
        args.append(limit)
        rows = await pool.fetch(
            "SELECT n.payload::text AS payload, coalesce(json_agg(json_build_object("
            " 'channel', d.channel, 'address', d.address, 'status', d.status,"
            " 'attempts', d.attempts, 'last_error', d.last_error, 'sent_at', d.sent_at)"
            " ORDER BY d.channel) FILTER (WHERE d.id IS NOT NULL), '[]')::text AS deliveries"
            f" FROM notification n LEFT JOIN delivery d USING (notification_id) WHERE {where}"
            f" GROUP BY n.notification_id ORDER BY n.issued_at, n.key LIMIT ${len(args)}",
            *args,
        )
        return [
            NotificationView(**json.loads(r["payload"]), deliveries=json.loads(r["deliveries"]))
            for r in rows
        ]

    @api.get("/v1/timers", response_model=list[TimerView])
    async def timers(
        opportunity_id: uuid.UUID, principal: Principal = Depends(authenticated)
    ) -> list[TimerView]:
        await scope(principal, opportunity_id)
        rows = await pool.fetch(
            "SELECT opportunity_id, kind, due_at, derived_from, fired_at FROM timer"
            " WHERE opportunity_id = $1 ORDER BY due_at",
            opportunity_id,
        )
        return [TimerView(**dict(r)) for r in rows]

    return api

"""Notify's HTTP API: the follow-up timers of an opportunity (bearer token required)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

import asyncpg
from fastapi import Depends, FastAPI
from pydantic import BaseModel

from shared.auth import Principal
from shared.http_auth import bearer
from shared.runtime import Readiness, health_router
from shared.settings import Settings


class FollowUpTimer(BaseModel):
    opportunity_id: uuid.UUID
    stage: str
    due_at: datetime
    started_by: uuid.UUID
    started_at: datetime


def create_api(
    settings: Settings, pool: asyncpg.Pool, readiness: Callable[[], Readiness | None]
) -> FastAPI:
    api = FastAPI(title="DealStream notify", version="1")
    api.include_router(health_router(readiness))
    authenticated = bearer(settings)

    @api.get("/v1/timers", response_model=list[FollowUpTimer])
    async def timers(
        opportunity_id: uuid.UUID | None = None, principal: Principal = Depends(authenticated)
    ) -> list[FollowUpTimer]:
        rows = await pool.fetch(
            "SELECT opportunity_id, stage, due_at, started_by, started_at FROM follow_up_timer"
            " WHERE $1::uuid IS NULL OR opportunity_id = $1 ORDER BY due_at LIMIT 500",
            opportunity_id,
        )
        return [FollowUpTimer(**dict(r)) for r in rows]

    return api

"""Reporting's HTTP API: the report routes of SPEC §6 (bearer token required)."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
from fastapi import Depends, FastAPI

from services.reporting.queries import Funnel, funnel
from shared.auth import Principal
from shared.http_auth import bearer
from shared.runtime import Readiness, health_router
from shared.settings import Settings


def create_api(
    settings: Settings, pool: asyncpg.Pool, readiness: Callable[[], Readiness | None]
) -> FastAPI:
    api = FastAPI(title="DealStream reporting", version="1")
    api.include_router(health_router(readiness))
    authenticated = bearer(settings)

    @api.get("/v1/reports/funnel", response_model=Funnel)
    async def get_funnel(principal: Principal = Depends(authenticated)) -> Funnel:
        return await funnel(pool, settings.rules())

    return api

"""Capture's HTTP API: the public web-form intake `POST /v1/leads` (JSON or form-encoded)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.capture.app import CaptureApp
from services.capture.domain import NotMerged, field_errors
from services.capture.intake_limits import HONEYPOT_FIELD, RateLimiter
from shared.auth import Principal, Role
from shared.clock import Clock
from shared.contracts.asyncapi import document
from shared.contracts.partner import FieldError, WebFormLead, nul_errors
from shared.http_auth import bearer
from shared.runtime import Readiness, correlate, correlation_id, health_router, observed
from shared.settings import Settings

MAX_BODY = 64 * 1024
log = logging.getLogger(__name__)


class LeadAccepted(BaseModel):
    lead_id: uuid.UUID


class UnmergeCommand(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str | None = Field(default=None, max_length=2000)


class Unmerged(BaseModel):
    lead_id: uuid.UUID
    unmerged_from: uuid.UUID  # the lead it had been merged into


class FieldErrors(BaseModel):
    detail: str
    errors: list[FieldError]


def _nest(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """`company.name=X` form fields into `{"company": {"name": "X"}}`; empty values dropped."""
    nested: dict[str, Any] = {}
    for key, value in pairs:
        if value == "":
            continue
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
    return nested


async def _body_within(request: Request, limit: int) -> bytes | None:
    """The body, or None once it is past `limit`: read no further than that, whatever it
    claims or sends (an over-long body is not held in memory whole before it is refused)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _invalid(errors: list[FieldError], status: int = 422) -> JSONResponse:
    body = FieldErrors(detail="invalid lead", errors=errors)
    return JSONResponse(body.model_dump(mode="json"), status_code=status)


def create_api(
    app: CaptureApp,
    settings: Settings,
    clock: Clock,
    readiness: Callable[[], Readiness | None],
    limiter: RateLimiter | None = None,
) -> FastAPI:
    api = observed(
        correlate(FastAPI(title="DealStream capture", version="1")), "capture", readiness
    )
    api.include_router(health_router(readiness))
    limiter = limiter or RateLimiter(per_minute=60, burst=20)

    authenticated = bearer(settings, clock)

    @api.get("/v1/partners/{partner_id}/registrations", tags=["partners"])
    async def registrations(
        partner_id: str, principal: Principal = Depends(authenticated)
    ) -> list[dict[str, Any]]:
        """A partner's deal registrations (报备): held, expired, and how often others were
        turned away. A partner sees only its own (another's: as if there were none, 404); ops
        and admin see any; sales roles none (403)."""
        if principal.role in (Role.rep, Role.manager):
            raise HTTPException(403, "registrations are for partners, ops and admin")
        allowed = principal.role in (Role.ops, Role.admin) or (
            principal.role is Role.partner and principal.user == partner_id
        )
        if not allowed:
            raise HTTPException(404, "no such partner")
        rows = await asyncio.to_thread(app.registrations_of, partner_id)
        return [json.loads(json.dumps(row, default=str)) for row in rows]

    @api.post(
        "/v1/leads/{lead_id}/unmerge",
        tags=["leads"],
        response_model=Unmerged,
        responses={404: {"description": "no such lead"},
                   409: {"description": "the lead is not merged (`code`: `not_merged`)"}},
    )  # fmt: skip
    async def unmerge(
        lead_id: uuid.UUID,
        body: UnmergeCommand | None = None,
        principal: Principal = Depends(authenticated),
    ) -> Any:
        """Undo dedupe's merge of a lead (SPEC §3): it becomes a customer of its own and opens
        a deal of its own (`LeadUnmerged`; pipeline detaches it from the deal it had joined).
        For admins: the lead leaves a deal of whichever team, and opens one routed anew."""
        if principal.role is not Role.admin:
            raise HTTPException(403, "admins undo merges")
        note = body.note if body else None
        try:
            merged_into = await asyncio.to_thread(app.unmerge, lead_id, principal.user,
                                                  clock.now(), note)  # fmt: skip
        except LookupError:
            raise HTTPException(404, "no such lead") from None
        except NotMerged as exc:
            return JSONResponse({"code": "not_merged", "message": str(exc)}, status_code=409)
        log.info("lead unmerged", extra={"lead_id": str(lead_id), "actor": principal.user})
        return Unmerged(lead_id=lead_id, unmerged_from=merged_into)

    @api.get("/asyncapi", tags=["contract"])
    async def asyncapi() -> dict[str, Any]:
        """The bus contract (AsyncAPI 3.0), generated from the pydantic contracts."""
        return document()

    @api.post(
        "/v1/leads",
        status_code=202,
        response_model=LeadAccepted,
        responses={
            422: {"model": FieldErrors},
            413: {"model": FieldErrors},
            429: {"description": "too many posts from this client; see Retry-After"},
        },
    )
    async def post_lead(request: Request) -> JSONResponse:
        client = request.client.host if request.client else "unknown"
        wait = limiter.retry_after(client)
        if wait is not None:
            return JSONResponse(
                {"detail": "too many requests"},
                status_code=429,
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        body = await _body_within(request, MAX_BODY)
        if body is None:
            error = FieldError(field="body", code="too_large", message=f"over {MAX_BODY} bytes")
            return _invalid([error], status=413)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if content_type == "application/x-www-form-urlencoded":
                raw: Any = _nest(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
            else:
                raw = json.loads(body)
        except (ValueError, RecursionError) as exc:
            error = FieldError(field="body", code="invalid_json", message=str(exc)[:200])
            return _invalid([error])
        if isinstance(raw, dict) and raw.pop(HONEYPOT_FIELD, None):
            log.info("web form: honeypot filled; nothing stored", extra={"client": client})
            return JSONResponse({"lead_id": str(uuid.uuid4())}, status_code=202)
        if errors := nul_errors(body, raw, "body"):
            return _invalid(errors)
        try:
            form = WebFormLead.model_validate(raw)
        except ValidationError as exc:
            return _invalid(field_errors(exc))
        except (ArithmeticError, ValueError, RecursionError) as exc:
            error = FieldError(field="body", code="invalid_value", message=str(exc)[:200])
            return _invalid([error])
        lead_id = await asyncio.to_thread(app.capture_web_lead, form, clock.now(), correlation_id())
        log.info("web lead accepted", extra={"lead_id": str(lead_id)})
        return JSONResponse({"lead_id": str(lead_id)}, status_code=202)

    return api

"""Pipeline's HTTP API (SPEC §4): commands with `expected_version`, queries, and the access
rules of SPEC §8 — a rep sees and changes only their own opportunities, a manager the team's,
ops reads everything, admin does everything; what a caller may not see does not exist (404)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse

from services.pipeline import views as v
from services.pipeline.app import Command, NotFound, PipelineApp, StaleVersion
from services.pipeline.domain import Opportunity, Refused
from shared.auth import Principal, Role, visible
from shared.clock import Clock
from shared.http_auth import bearer
from shared.runtime import Readiness, asked, correlate, correlation_id, health_router, observed
from shared.settings import Rules, Settings
from shared.writer import BatchWriter

# Refusals about the request itself; the others are conflicts with the opportunity's state.
UNPROCESSABLE = {"unknown_reason", "unknown_stage", "invalid_probability", "currency_mismatch",
                 "amount_out_of_range", "follow_up_out_of_range", "unknown_owner", "unknown_team",
                 "owner_not_in_team"}  # fmt: skip

log = logging.getLogger(__name__)


class Hidden(Exception):
    """The caller may not see this opportunity: answered exactly like a missing one."""


class Forbidden(Exception):
    pass


def check_change(principal: Principal, o: Opportunity, command: str) -> None:
    if not visible(principal, o.owner, o.team):
        raise Hidden
    if principal.role is Role.ops:
        raise Forbidden("ops reads, it does not change opportunities")
    if command in ("assign", "reactivate") and principal.role is Role.rep:
        raise Forbidden("reps do not assign; their manager does")


def check_team_scope(principal: Principal, body: v.AssignCommand, rules: Rules) -> None:
    """A manager assigns within their own team, to people of that team."""
    if principal.role is not Role.manager:
        return
    if body.team not in (None, principal.team):
        raise Forbidden("a manager assigns within their own team")
    if body.owner is not None:
        owner = rules.directory.user(body.owner)
        if owner is None or owner.team != principal.team:
            raise Forbidden(f"{body.owner} is not in team {principal.team}")


def assignment(
    body: v.AssignCommand, current_team: str | None, rules: Rules
) -> tuple[str | None, str | None]:
    """Whom an assignment names, checked against the directory: an owner in it (or none, the
    pool), of the team named, or else in their own team, or else the deal's; a team the
    directory or routing knows. (An unknown owner held a deal nobody could see or be reminded
    of, and an owner of another team split it from its escalations.)"""
    directory = rules.directory
    user = directory.user(body.owner) if body.owner is not None else None
    if body.owner is not None and user is None:
        raise Refused("unknown_owner", f"{body.owner} is not in the directory")
    team = body.team or (user.team if user else None) or current_team
    if user is not None and user.team is not None and team != user.team:
        raise Refused("owner_not_in_team", f"{body.owner} is in team {user.team}, not {team}")
    teams = {t.id for t in directory.teams} | {u.team for u in directory.users if u.team}
    teams |= {r.team for r in rules.routing.rules} | {rules.routing.default_team}
    if team is not None and team not in teams:
        raise Refused("unknown_team", f"no team {team} in the directory")
    return body.owner, team


def create_api(
    app: PipelineApp,
    settings: Settings,
    pool: asyncpg.Pool,
    clock: Clock,
    readiness: Callable[[], Readiness | None],
) -> FastAPI:
    api = observed(
        correlate(FastAPI(title="DealStream pipeline", version="1")), "pipeline", readiness
    )
    api.include_router(health_router(readiness))
    authenticated = bearer(settings, clock)
    rules = settings.rules
    # Commands are stored by one writer thread, those that wait together in one transaction.
    writer = BatchWriter(app.commands, lambda c: c.opportunity_id, "pipeline-commands")

    def authorize(principal: Principal, o: Opportunity, command: str, body: v.Command) -> None:
        """Who may: visibility first (hidden is 404), then the role, then a manager's team."""
        check_change(principal, o, command)
        if isinstance(body, v.AssignCommand):
            check_team_scope(principal, body, rules())

    async def audit(opportunity_id: uuid.UUID, command: str, code: str, actor: str,
                    detail: dict[str, Any]) -> None:  # fmt: skip
        log.info("command refused", extra={"opportunity_id": str(opportunity_id),
                                           "command": command, "code": code})  # fmt: skip
        await pool.execute(
            "INSERT INTO refused_command (opportunity_id, command, code, actor, detail, refused_at)"
            " VALUES ($1, $2, $3, $4, $5::jsonb, $6)",
            opportunity_id, command, code, actor, json.dumps(detail, default=str), clock.now(),
        )  # fmt: skip

    async def run(
        opportunity_id: uuid.UUID,
        command: str,
        body: v.Command,
        principal: Principal,
        change: Callable[[Opportunity, datetime], None],
    ) -> JSONResponse:
        now = clock.now()

        try:
            saved = await writer.submit(
                Command(
                    opportunity_id,
                    body.expected_version,
                    lambda o: change(o, now),
                    lambda o: authorize(principal, o, command, body),
                    correlation_id(),
                )
            )
        except (NotFound, Hidden):
            raise HTTPException(404, "no such opportunity") from None
        except Forbidden as exc:  # an attempted bypass of the roles: kept, like the rules'
            await audit(opportunity_id, command, "forbidden", principal.user, {"why": str(exc)})
            raise HTTPException(403, str(exc)) from None
        except StaleVersion as exc:
            await audit(
                opportunity_id,
                command,
                "stale_version",
                principal.user,
                {"expected_version": body.expected_version, "current": exc.current},
            )
            refusal = v.Refusal(code="stale_version", message=str(exc),
                                current_version=exc.current)  # fmt: skip
            return JSONResponse(refusal.model_dump(), status_code=409)
        except Refused as exc:
            await audit(
                opportunity_id,
                command,
                exc.code,
                principal.user,
                {**exc.detail, "body": body.model_dump(mode="json")},
            )
            status = 422 if exc.code in UNPROCESSABLE else 409
            refusal = v.Refusal(code=exc.code, message=str(exc), detail=exc.detail)
            return JSONResponse(refusal.model_dump(mode="json"), status_code=status)
        applied = {"opportunity_id": str(opportunity_id), "command": command}
        log.info("command applied", extra={**applied, "version": saved.version})
        return JSONResponse(v.OpportunityView.of(saved).model_dump(mode="json"))

    base = "/v1/opportunities/{opportunity_id}"
    refusals: dict[int | str, dict[str, Any]] = {
        404: {"description": "no such opportunity (or not yours)"},
        409: {"model": v.Refusal}, 422: {"model": v.Refusal},
    }  # fmt: skip

    @api.post(f"{base}/stage", response_model=v.OpportunityView, responses=refusals)
    async def stage(opportunity_id: uuid.UUID, body: v.StageCommand,
                    p: Principal = Depends(authenticated)) -> JSONResponse:  # fmt: skip
        return await run(
            opportunity_id,
            "stage",
            body,
            p,
            lambda o, now: o.change_stage(body.to_stage, p.user, now, rules(), note=body.note),
        )

    @api.post(f"{base}/follow-ups", response_model=v.OpportunityView, responses=refusals)
    async def follow_up(opportunity_id: uuid.UUID, body: v.FollowUpCommand,
                        p: Principal = Depends(authenticated)) -> JSONResponse:  # fmt: skip
        return await run(
            opportunity_id,
            "follow-ups",
            body,
            p,
            lambda o, now: o.log_follow_up(
                body.channel, body.summary, p.user, now, body.next_follow_up_at, body.authority
            ),
        )

    @api.post(f"{base}/win", response_model=v.OpportunityView, responses=refusals)
    async def win(opportunity_id: uuid.UUID, body: v.WinCommand,
                  p: Principal = Depends(authenticated)) -> JSONResponse:  # fmt: skip
        return await run(
            opportunity_id,
            "win",
            body,
            p,
            lambda o, now: o.win(body.contract_amount, p.user, now, rules()),
        )

    @api.post(f"{base}/lose", response_model=v.OpportunityView, responses=refusals)
    async def lose(opportunity_id: uuid.UUID, body: v.LoseCommand,
                   p: Principal = Depends(authenticated)) -> JSONResponse:  # fmt: skip
        return await run(
            opportunity_id,
            "lose",
            body,
            p,
            lambda o, now: o.lose(
                body.reason_code, p.user, now, rules(), note=body.note, competitor=body.competitor
            ),
        )

    @api.post(f"{base}/reopen", response_model=v.OpportunityView, responses=refusals)
    async def reopen(opportunity_id: uuid.UUID, body: v.ReopenCommand,
                     p: Principal = Depends(authenticated)) -> JSONResponse:  # fmt: skip
        return await run(
            opportunity_id,
            "reopen",
            body,
            p,
            lambda o, now: o.reopen(p.user, now, rules(), note=body.note),
        )

    @api.post(f"{base}/assign", response_model=v.OpportunityView, responses=refusals)
    async def assign(opportunity_id: uuid.UUID, body: v.AssignCommand,
                     p: Principal = Depends(authenticated)) -> JSONResponse:  # fmt: skip
        return await run(
            opportunity_id,
            "assign",
            body,
            p,
            lambda o, now: o.assign(*assignment(body, o.team, rules()), p.user, now),
        )

    @api.post(f"{base}/reactivate", response_model=v.OpportunityView, responses=refusals)
    async def reactivate(opportunity_id: uuid.UUID, body: v.AssignCommand,
                         p: Principal = Depends(authenticated)) -> JSONResponse:  # fmt: skip
        return await run(
            opportunity_id,
            "reactivate",
            body,
            p,
            lambda o, now: o.reactivate(*assignment(body, o.team, rules()), p.user, now),
        )

    @api.post(f"{base}/payments", response_model=v.OpportunityView, responses=refusals)
    async def payments(opportunity_id: uuid.UUID, body: v.PaymentCommand,
                       p: Principal = Depends(authenticated)) -> JSONResponse:  # fmt: skip
        return await run(
            opportunity_id,
            "payments",
            body,
            p,
            lambda o, now: o.receive_payment(body.amount, p.user, now),
        )

    @api.post(f"{base}/amount", response_model=v.OpportunityView, responses=refusals)
    async def amount(opportunity_id: uuid.UUID, body: v.AmountCommand,
                     p: Principal = Depends(authenticated)) -> JSONResponse:  # fmt: skip
        return await run(
            opportunity_id,
            "amount",
            body,
            p,
            lambda o, now: o.change_amount(body.kind, body.amount, p.user, now, rules()),
        )

    @api.post(f"{base}/probability", response_model=v.OpportunityView, responses=refusals)
    async def probability(opportunity_id: uuid.UUID, body: v.ProbabilityCommand,
                          p: Principal = Depends(authenticated)) -> JSONResponse:  # fmt: skip
        return await run(
            opportunity_id,
            "probability",
            body,
            p,
            lambda o, now: o.override_probability(body.probability, p.user, now, note=body.note),
        )

    async def load_visible(opportunity_id: uuid.UUID, p: Principal,
                           as_of: datetime | None = None) -> Opportunity:  # fmt: skip
        try:
            o = await asyncio.to_thread(app.get, opportunity_id, as_of)
            current = o if as_of is None else await asyncio.to_thread(app.get, opportunity_id)
        except NotFound:
            raise HTTPException(404, "no such opportunity") from None
        if not visible(p, current.owner, current.team):
            raise HTTPException(404, "no such opportunity")
        return o

    @api.get(base, response_model=v.OpportunityView)
    async def get_one(opportunity_id: uuid.UUID, as_of: datetime | None = None,
                      p: Principal = Depends(authenticated)) -> v.OpportunityView:  # fmt: skip
        at = asked("as_of", as_of)
        return v.OpportunityView.of(await load_visible(opportunity_id, p, at), at)

    @api.get(f"{base}/history", response_model=list[v.HistoryEntry])
    async def history(opportunity_id: uuid.UUID,
                      p: Principal = Depends(authenticated)) -> list[v.HistoryEntry]:  # fmt: skip
        await load_visible(opportunity_id, p)
        events = await asyncio.to_thread(app.history, opportunity_id)
        return [v.HistoryEntry.of(e) for e in events]

    @api.get("/v1/opportunities", response_model=v.OpportunityPage)
    async def list_opportunities(
        p: Principal = Depends(authenticated),
        lead_id: uuid.UUID | None = None,
        owner: str | None = None,
        team: str | None = None,
        stage: str | None = Query(default=None, pattern="^[A-F]$"),
        status: str | None = Query(default=None, pattern="^(open|won|lost|recycled)$"),
        limit: int = Query(default=50, ge=1, le=200),
        offset: int = Query(default=0, ge=0, le=2**31 - 1),  # past int64 the driver fails
    ) -> v.OpportunityPage:
        if p.role is Role.rep:
            if owner not in (None, p.user):  # another rep's: as if there were none
                return v.OpportunityPage(items=[], total=0, limit=limit, offset=offset)
            owner = p.user
        elif p.role is Role.manager:
            if p.team is None or team not in (None, p.team):
                return v.OpportunityPage(items=[], total=0, limit=limit, offset=offset)
            team = p.team
        elif p.role not in (Role.ops, Role.admin):  # a partner: no opportunity is visible
            return v.OpportunityPage(items=[], total=0, limit=limit, offset=offset)
        where = (
            "($1::uuid IS NULL OR i.opportunity_id IN"
            " (SELECT opportunity_id FROM opportunity_lead WHERE lead_id = $1))"
            " AND ($2::text IS NULL OR i.owner = $2) AND ($3::text IS NULL OR i.team = $3)"
            " AND ($4::text IS NULL OR i.stage = $4) AND ($5::text IS NULL OR i.status = $5)"
        )
        args = (lead_id, owner, team, stage, status)
        total = await pool.fetchval(
            f"SELECT count(*) FROM opportunity_index i WHERE {where}", *args
        )
        rows = await pool.fetch(
            f"SELECT * FROM opportunity_index i WHERE {where}"
            " ORDER BY opened_at DESC, opportunity_id LIMIT $6 OFFSET $7",
            *args, limit, offset,
        )  # fmt: skip
        items = [json.loads(json.dumps(dict(r), default=str)) for r in rows]
        return v.OpportunityPage(items=items, total=int(total), limit=limit, offset=offset)

    return api

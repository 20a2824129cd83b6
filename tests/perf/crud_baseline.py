"""The CRUD baseline of the end-to-end benchmark (tests/perf/e2e_bench.py): a lead stored the way a
conventional CRM service stores it. One process, FastAPI on uvicorn, asyncpg with an ordinary
pool; `POST /leads` takes the partner's lead message (SPEC §3, validated with the same pydantic
model capture uses) and in one transaction inserts the lead, its opportunity in stage A and the
first stage-history row, then answers 201 with the ids (200 with the stored ids when the
partner's message id was seen before). Its own schema, `crud_baseline`, made at start.

    python -m tests.perf.crud_baseline --port 8010 --dsn postgresql://…
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import uvicorn
from fastapi import FastAPI, Response
from pydantic import BaseModel

from shared.contracts.partner import PartnerLeadMessage

SCHEMA = "crud_baseline"
POOL_SIZE = 10  # asyncpg's default

DDL = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.lead (
    lead_id uuid PRIMARY KEY,
    partner_id text NOT NULL,
    message_id text NOT NULL,
    submitted_at timestamptz NOT NULL,
    company_name text NOT NULL,
    industry text,
    region text,
    company_size text,
    contact_name text NOT NULL,
    contact_email text,
    contact_phone text,
    contact_title text,
    need text,
    budget_amount numeric(18, 2),
    budget_currency char(3),
    authority text NOT NULL,
    timeline text NOT NULL,
    expected_close date,
    source_detail text,
    received_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (partner_id, message_id)
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.opportunity (
    opportunity_id uuid PRIMARY KEY,
    lead_id uuid NOT NULL REFERENCES {SCHEMA}.lead,
    title text NOT NULL,
    region text,
    stage char(1) NOT NULL,
    status text NOT NULL,
    amount numeric(18, 2),
    currency char(3),
    expected_close date,
    opened_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS opportunity_lead ON {SCHEMA}.opportunity (lead_id);
CREATE INDEX IF NOT EXISTS opportunity_open ON {SCHEMA}.opportunity (status, stage);
CREATE TABLE IF NOT EXISTS {SCHEMA}.stage_history (
    id bigserial PRIMARY KEY,
    opportunity_id uuid NOT NULL REFERENCES {SCHEMA}.opportunity,
    from_stage char(1),
    to_stage char(1) NOT NULL,
    changed_by text NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS stage_history_opportunity ON {SCHEMA}.stage_history (opportunity_id);
"""

INSERT_LEAD = f"""
INSERT INTO {SCHEMA}.lead (lead_id, partner_id, message_id, submitted_at, company_name, industry,
    region, company_size, contact_name, contact_email, contact_phone, contact_title, need,
    budget_amount, budget_currency, authority, timeline, expected_close, source_detail)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)
ON CONFLICT (partner_id, message_id) DO NOTHING
RETURNING lead_id
"""
INSERT_OPPORTUNITY = f"""
INSERT INTO {SCHEMA}.opportunity (opportunity_id, lead_id, title, region, stage, status, amount,
    currency, expected_close)
VALUES ($1, $2, $3, $4, 'A', 'open', $5, $6, $7)
"""
INSERT_HISTORY = f"""
INSERT INTO {SCHEMA}.stage_history (opportunity_id, from_stage, to_stage, changed_by)
VALUES ($1, NULL, 'A', $2)
"""
FIND_EXISTING = f"""
SELECT l.lead_id, o.opportunity_id FROM {SCHEMA}.lead l JOIN {SCHEMA}.opportunity o USING (lead_id)
WHERE l.partner_id = $1 AND l.message_id = $2
"""


class LeadCreated(BaseModel):
    lead_id: uuid.UUID
    opportunity_id: uuid.UUID


def create_app(dsn: str) -> FastAPI:
    pools: dict[str, asyncpg.Pool] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(dsn, min_size=POOL_SIZE, max_size=POOL_SIZE)
        assert pool is not None
        async with pool.acquire() as conn:
            await conn.execute(DDL)
        pools["db"] = pool
        yield
        await pool.close()

    app = FastAPI(title="CRUD baseline", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/leads", status_code=201, response_model=LeadCreated)
    async def create_lead(lead: PartnerLeadMessage, response: Response) -> Any:
        lead_id, opportunity_id = uuid.uuid4(), uuid.uuid4()
        budget = lead.budget
        async with pools["db"].acquire() as conn, conn.transaction():
            stored = await conn.fetchval(
                INSERT_LEAD,
                lead_id,
                lead.partner_id,
                lead.message_id,
                lead.submitted_at,
                lead.company.name,
                lead.company.industry,
                lead.company.region,
                lead.company.size,
                lead.contact.name,
                lead.contact.email,
                lead.contact.phone,
                lead.contact.title,
                lead.need,
                budget.amount if budget else None,
                budget.currency if budget else None,
                lead.authority.value,
                lead.timeline.value,
                lead.expected_close,
                lead.source_detail,
            )
            if stored is None:  # the partner sent this message before
                row = await conn.fetchrow(FIND_EXISTING, lead.partner_id, lead.message_id)
                response.status_code = 200
                return LeadCreated(lead_id=row["lead_id"], opportunity_id=row["opportunity_id"])
            await conn.execute(
                INSERT_OPPORTUNITY,
                opportunity_id,
                lead_id,
                lead.company.name,
                lead.company.region,
                budget.amount if budget else None,
                budget.currency if budget else None,
                lead.expected_close,
            )
            await conn.execute(INSERT_HISTORY, opportunity_id, f"partner:{lead.partner_id}")
        return LeadCreated(lead_id=lead_id, opportunity_id=opportunity_id)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.perf.crud_baseline", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn", required=True, help="PostgreSQL URL")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    uvicorn.run(create_app(args.dsn), host=args.host, port=args.port, log_level="warning",
                access_log=False)  # fmt: skip


if __name__ == "__main__":
    main()

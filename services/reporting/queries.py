"""Read-side queries over reporting's tables."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
from pydantic import BaseModel

from shared.contracts.common import Money
from shared.settings import STAGES, Rules


class FunnelStage(BaseModel):
    stage: str
    name: str
    name_zh: str
    count: int
    amount: list[Money]
    weighted: list[Money]


class Funnel(BaseModel):
    stages: list[FunnelStage]
    open_count: int


async def funnel(pool: asyncpg.Pool, rules: Rules) -> Funnel:
    """Open opportunities now: count and amount per stage, and the weighted pipeline
    (amount x probability) per currency."""
    rows = await pool.fetch(
        "SELECT stage, currency, count(*) AS n, coalesce(sum(amount), 0) AS amount,"
        " coalesce(sum(amount * probability / 100.0), 0) AS weighted"
        " FROM opportunity WHERE status = 'open' GROUP BY stage, currency"
    )
    stages = []
    for code in STAGES:
        mine = [r for r in rows if r["stage"] == code]
        priced = [r for r in mine if r["currency"] is not None]
        rule = rules.stages[code]
        stages.append(
            FunnelStage(
                stage=code,
                name=rule.name,
                name_zh=rule.name_zh,
                count=sum(int(r["n"]) for r in mine),
                amount=[Money(amount=Decimal(r["amount"]), currency=r["currency"]) for r in priced],
                weighted=[
                    Money(
                        amount=Decimal(r["weighted"]).quantize(Decimal("0.01")),
                        currency=r["currency"],
                    )
                    for r in priced
                ],
            )
        )
    return Funnel(stages=stages, open_count=sum(s.count for s in stages))

"""The reports of SPEC §6 over reporting's tables. Every report reads a snapshot of the
opportunities — now, or as known at `as_of` — narrowed by filters and the caller's scope, and
can be grouped by owner, team, region, source, partner or tier. Money is summed per currency
(`currency`, CNY by default); rates are exact decimals, None where nothing was there to divide."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from services.reporting.domain import at_midnight, fresh_window, month_start
from services.reporting.projection import SPAN_HOURS, STATE_COLUMNS
from shared.settings import STAGES, ReportingRules, Rules

GROUPS = {"owner": "owner", "team": "team", "region": "region", "source": "source",
          "partner": "partner_id", "tier": "tier"}  # fmt: skip
FILTERS = GROUPS
EPSILON = timedelta(microseconds=1)
RATE = Decimal("0.0001")
DAYS = Decimal("0.01")


@dataclass
class Filters:
    as_of: datetime | None = None
    currency: str = "CNY"
    where: dict[str, str] = field(default_factory=dict)  # filter name -> value
    group_by: str | None = None
    # The calendar of months (fresh, conversion, attainment, forecast): `[reporting] timezone`.
    zone: tzinfo = field(default_factory=lambda: ZoneInfo(ReportingRules().timezone))

    def at(self, as_of: datetime | None) -> Filters:
        return replace(self, as_of=as_of)


class Query:
    """Builds one SQL text with numbered arguments."""

    def __init__(self) -> None:
        self.args: list[Any] = []

    def arg(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"

    def snapshot(self, f: Filters) -> str:
        """The opportunities as known at `f.as_of` (now when None), filtered: a FROM item `o`."""
        cols = ", ".join(STATE_COLUMNS)
        if f.as_of is None:
            base = f"SELECT {cols} FROM opportunity_now"
        else:
            t = f"{self.arg(f.as_of)}::timestamptz"
            # The versions valid at t, class by class of their span (see SPAN_HOURS): a class
            # began less than its bound before t, the last class at any time.
            began = [f" AND valid_from > {t} - interval '{h} hours'" for h in SPAN_HOURS] + [""]
            base = " UNION ALL ".join([
                f"SELECT {cols} FROM opportunity_now WHERE valid_from <= {t}",
                *(f"SELECT {cols} FROM opportunity_history WHERE span_class = {c}{after}"
                  f" AND valid_from <= {t} AND valid_to > {t}" for c, after in enumerate(began)),
            ])  # fmt: skip
        where = " AND ".join(self.filters(f)) or "TRUE"
        return f"(SELECT * FROM ({base}) s WHERE {where}) o"

    def filters(self, f: Filters, table: str = "") -> list[str]:
        """The filters' conditions on columns of `table` (an alias and a dot, or none)."""
        return [f"{table}{FILTERS[name]} = {self.arg(value)}" for name, value in f.where.items()]

    def group(self, f: Filters) -> str:
        return f"o.{GROUPS[f.group_by]}::text" if f.group_by else "NULL::text"

    def money(self, f: Filters, expression: str, condition: str = "TRUE") -> str:
        """Sum of `expression` over rows in the report's currency meeting `condition`."""
        cur = self.arg(f.currency)
        return f"coalesce(sum({expression}) FILTER (WHERE o.currency = {cur} AND {condition}), 0)"


def rate(part: Decimal | int, whole: Decimal | int) -> Decimal | None:
    if not whole:
        return None
    return (Decimal(part) / Decimal(whole)).quantize(RATE)


def money(value: Any) -> Decimal:
    return Decimal(value or 0).quantize(Decimal("0.01"))


def days(value: Any) -> Decimal | None:
    return None if value is None else Decimal(value).quantize(DAYS)


async def _fetch(pool: asyncpg.Pool, q: Query, sql: str) -> list[asyncpg.Record]:
    return await pool.fetch(sql, *q.args)


def _groups(rows: list[asyncpg.Record]) -> list[str | None]:
    keys = {r["grp"] for r in rows}
    return sorted(keys, key=lambda k: (k is None, k or ""))


# -- funnel ------------------------------------------------------------------------------------


async def funnel(pool: asyncpg.Pool, f: Filters, rules: Rules) -> dict[str, Any]:
    """Open opportunities per stage: count, amount, weighted pipeline (amount x probability).
    Now: from the running sums; as known at a past moment: from that moment's versions."""
    q = Query()
    if f.as_of is None:
        group = f"NULLIF(o.{GROUPS[f.group_by]}, '')" if f.group_by else "NULL::text"
        where = " AND ".join(["o.status = 'open'", *q.filters(f, "o.")])
        rows = await _fetch(pool, q, (
            f"SELECT {group} AS grp, o.stage, sum(o.n) AS n,"
            f" {q.money(f, 'o.amount')} AS amount, {q.money(f, 'o.weighted')} AS weighted"
            f" FROM funnel_now o WHERE {where} GROUP BY 1, 2 HAVING sum(o.n) > 0"
        ))  # fmt: skip
    else:
        amount = q.money(f, "o.amount")
        weighted = q.money(f, "o.amount * o.probability / 100.0")
        rows = await _fetch(pool, q, (
            f"SELECT {q.group(f)} AS grp, o.stage, count(*) AS n, {amount} AS amount,"
            f" {weighted} AS weighted FROM {q.snapshot(f)} WHERE o.status = 'open'"
            " GROUP BY 1, 2"
        ))  # fmt: skip
    found = {(r["grp"], r["stage"]): r for r in rows}
    out = []
    for grp in _groups(rows) or [None]:
        for stage in STAGES:
            r = found.get((grp, stage))
            out.append({
                "group": grp, "stage": stage, "name": rules.stages[stage].name,
                "name_zh": rules.stages[stage].name_zh, "count": int(r["n"]) if r else 0,
                "amount": money(r["amount"] if r else 0),
                "weighted": money(Decimal(r["weighted"]).quantize(Decimal("0.01")) if r else 0),
            })  # fmt: skip
    total = {
        "count": sum(r["count"] for r in out),
        "amount": sum((r["amount"] for r in out), Decimal("0.00")),
        "weighted": sum((r["weighted"] for r in out), Decimal("0.00")),
    }
    return {"rows": out, "total": total}


# -- pass-through ------------------------------------------------------------------------------


async def pass_through(
    pool: asyncpg.Pool, f: Filters, start: datetime, end: datetime
) -> dict[str, Any]:
    """阶段通过率 for the cohort created in [start, end): reached stage k+1 / reached stage k."""
    q = Query()
    reached = ", ".join(f"count(*) FILTER (WHERE o.reached >= '{s}') AS r{s}" for s in STAGES)
    rows = await _fetch(pool, q, (
        f"SELECT {q.group(f)} AS grp, {reached} FROM {q.snapshot(f)}"
        f" WHERE o.opened_at >= {q.arg(start)} AND o.opened_at < {q.arg(end)} GROUP BY 1"
    ))  # fmt: skip

    def lines(grp: str | None, counts: dict[str, int]) -> list[dict[str, Any]]:
        return [
            {"group": grp, "stage": s, "next_stage": n, "reached": counts[s],
             "passed": counts[n], "rate": rate(counts[n], counts[s])}
            for s, n in itertools.pairwise(STAGES)
        ]  # fmt: skip

    out: list[dict[str, Any]] = []
    totals = dict.fromkeys(STAGES, 0)
    for r in sorted(rows, key=lambda r: (r["grp"] is None, r["grp"] or "")):
        counts = {s: int(r[f"r{s.lower()}"]) for s in STAGES}
        for s in STAGES:
            totals[s] += counts[s]
        out += lines(r["grp"], counts)
    return {"rows": out, "total": {"cohort": totals["A"], "stages": lines(None, totals)}}


# -- win rate ----------------------------------------------------------------------------------


async def win_rate(
    pool: asyncpg.Pool, f: Filters, start: datetime, end: datetime
) -> dict[str, Any]:
    """won / (won + lost) of the opportunities closed in [start, end), by count and by amount
    (their expected amounts; the contract amounts won are given beside)."""
    q = Query()
    s, e = q.arg(start), q.arg(end)
    won = f"o.status = 'won' AND o.won_at >= {s} AND o.won_at < {e}"
    lost = f"o.status = 'lost' AND o.lost_at >= {s} AND o.lost_at < {e}"
    rows = await _fetch(pool, q, (
        f"SELECT {q.group(f)} AS grp, count(*) FILTER (WHERE {won}) AS won,"
        f" count(*) FILTER (WHERE {lost}) AS lost, {q.money(f, 'o.amount', won)} AS won_amount,"
        f" {q.money(f, 'o.amount', lost)} AS lost_amount,"
        f" {q.money(f, 'o.won_amount', won)} AS contract_amount"
        f" FROM {q.snapshot(f)} WHERE ({won}) OR ({lost}) GROUP BY 1"
    ))  # fmt: skip
    out = [
        _win_line(r["grp"], r)
        for r in sorted(rows, key=lambda r: (r["grp"] is None, r["grp"] or ""))
    ]
    sums = {k: sum((r[k] for r in rows), 0) for k in ("won", "lost", "won_amount", "lost_amount",
                                                     "contract_amount")}  # fmt: skip
    return {"rows": out, "total": _win_line(None, sums)}


def _win_line(grp: str | None, r: Any) -> dict[str, Any]:
    won, lost = int(r["won"]), int(r["lost"])
    won_amount, lost_amount = money(r["won_amount"]), money(r["lost_amount"])
    return {
        "group": grp, "won": won, "lost": lost, "count_rate": rate(won, won + lost),
        "won_amount": won_amount, "lost_amount": lost_amount,
        "amount_rate": rate(won_amount, won_amount + lost_amount),
        "contract_amount": money(r["contract_amount"]),
    }  # fmt: skip


# -- cycle time --------------------------------------------------------------------------------

# One sort serves both percentiles.
STATS = (
    "count(*) AS n, avg(d) AS mean,"
    " percentile_cont(ARRAY[0.5, 0.9]) WITHIN GROUP (ORDER BY d) AS pct"
)


async def cycle_time(
    pool: asyncpg.Pool, f: Filters, start: datetime, end: datetime
) -> dict[str, Any]:
    """Days from created to won (won in [start, end)) and in each stage (stays that ended in
    [start, end)): mean, median and p90 (continuous percentiles, as PostgreSQL's
    percentile_cont)."""
    q = Query()
    won = _fetch(pool, q, (
        f"SELECT grp, GROUPING(grp) AS total, 'created_to_won' AS measure, {STATS} FROM"
        f" (SELECT {q.group(f)} AS grp, extract(epoch FROM o.won_at - o.opened_at) / 86400.0 AS d"
        f" FROM {q.snapshot(f)} WHERE o.status = 'won' AND o.won_at >= {q.arg(start)}"
        f" AND o.won_at < {q.arg(end)}) w GROUP BY ROLLUP (grp)"
    ))  # fmt: skip
    q = Query()
    known = f" AND st.left_at <= {q.arg(f.as_of)}" if f.as_of else ""
    # A stay knows its stage and times; the opportunity is joined only to filter or group.
    scoped = bool(f.where or f.group_by)
    joined = f" JOIN {q.snapshot(f)} USING (opportunity_id)" if scoped else ""
    sets = "GROUPING SETS ((grp, stage), (stage))" if f.group_by else "stage"
    stays = _fetch(pool, q, (
        f"SELECT {'grp, GROUPING(grp)' if f.group_by else 'NULL AS grp, 1'} AS total,"
        f" 'stage_' || stage AS measure, {STATS} FROM"
        f" (SELECT {q.group(f)} AS grp, st.stage, st.days AS d FROM stage_stay st{joined}"
        f" WHERE st.left_at >= {q.arg(start)} AND st.left_at < {q.arg(end)}{known}) w"
        f" GROUP BY {sets} ORDER BY 3"
    ))  # fmt: skip
    won_rows, stay_rows = await asyncio.gather(won, stays)  # side by side on the pool

    def line(r: Any) -> dict[str, Any]:
        return {"group": None if r["total"] else r["grp"], "measure": r["measure"],
                "n": int(r["n"]), "mean_days": days(r["mean"]),
                "median_days": days(r["pct"][0] if r["pct"] else None),
                "p90_days": days(r["pct"][1] if r["pct"] else None)}  # fmt: skip

    totals = [line(r) for r in [*won_rows, *stay_rows] if r["total"]]
    rows = [line(r) for r in [*won_rows, *stay_rows] if not r["total"]] if f.group_by else totals
    return {"rows": rows, "total": {"measures": totals}}


# -- loss reasons ------------------------------------------------------------------------------


async def loss_reasons(
    pool: asyncpg.Pool, f: Filters, start: datetime, end: datetime
) -> dict[str, Any]:
    """Opportunities lost in [start, end): count and (expected) amount by reason code and by the
    stage they were lost at."""
    out: list[dict[str, Any]] = []
    total: dict[str, Any] = {}
    for by, column in (("reason", "o.reason_code"), ("stage", "o.lost_stage")):
        q = Query()
        rows = await _fetch(pool, q, (
            f"SELECT {q.group(f)} AS grp, {column}::text AS key, count(*) AS n,"
            f" {q.money(f, 'o.amount')} AS amount FROM {q.snapshot(f)}"
            f" WHERE o.status = 'lost' AND o.lost_at >= {q.arg(start)}"
            f" AND o.lost_at < {q.arg(end)} GROUP BY 1, 2 ORDER BY 1 NULLS LAST, 3 DESC, 2"
        ))  # fmt: skip
        out += [{"group": r["grp"], "by": by, "key": r["key"], "count": int(r["n"]),
                 "amount": money(r["amount"])} for r in rows]  # fmt: skip
        if by == "reason":
            total = {"count": sum(int(r["n"]) for r in rows),
                     "amount": money(sum((r["amount"] for r in rows), 0))}  # fmt: skip
    return {"rows": out, "total": total}


# -- fresh opportunities, conversion, attainment, forecast -------------------------------------


async def fresh(
    pool: asyncpg.Pool, f: Filters, at: datetime, current: bool = False
) -> dict[str, Any]:
    """鲜活商机 and 商机转化率 at `at` (as known then): the cohort created in the last three
    calendar months with expected close by the end of next month; fresh = still open; the
    conversion = won / all of the cohort, by count and by expected amount."""
    created_from, close_by = fresh_window(at, f.zone)
    q = Query()
    is_open, is_won = "o.status = 'open'", "o.status = 'won'"
    rows = await _fetch(pool, q, (
        f"SELECT {q.group(f)} AS grp, count(*) FILTER (WHERE {is_open}) AS fresh_count,"
        f" {q.money(f, 'o.amount', is_open)} AS fresh_amount, count(*) AS cohort_count,"
        f" count(*) FILTER (WHERE {is_won}) AS won_count,"
        f" {q.money(f, 'o.amount')} AS cohort_amount,"
        f" {q.money(f, 'o.amount', is_won)} AS won_amount"
        f" FROM {q.snapshot(f if current else f.at(at))}"
        f" WHERE o.opened_at >= {q.arg(created_from)} AND o.opened_at <= {q.arg(at)}"
        f" AND o.expected_close <= {q.arg(close_by)} GROUP BY 1"
    ))  # fmt: skip
    keys = ("fresh_count", "fresh_amount", "cohort_count", "won_count", "cohort_amount",
            "won_amount")  # fmt: skip
    out = [_fresh_line(r["grp"], r) for r in sorted(rows, key=_by_group)]
    sums = {k: sum((r[k] for r in rows), 0) for k in keys}
    return {"rows": out, "total": _fresh_line(None, sums),
            "window": {"created_from": created_from, "expected_close_by": close_by}}  # fmt: skip


def _by_group(r: Any) -> tuple[bool, str]:
    return (r["grp"] is None, r["grp"] or "")


def _fresh_line(grp: str | None, r: Any) -> dict[str, Any]:
    return {
        "group": grp, "fresh_count": int(r["fresh_count"]),
        "fresh_amount": money(r["fresh_amount"]), "cohort_count": int(r["cohort_count"]),
        "won_count": int(r["won_count"]), "cohort_amount": money(r["cohort_amount"]),
        "won_amount": money(r["won_amount"]),
        "conversion_count_rate": rate(int(r["won_count"]), int(r["cohort_count"])),
        "conversion_amount_rate": rate(money(r["won_amount"]), money(r["cohort_amount"])),
    }  # fmt: skip


async def attainment(pool: asyncpg.Pool, f: Filters, month: date) -> dict[str | None, Any]:
    """承诺金额达成率 measured in `month`: payments received in `month` on the deals won in the
    month before, over those deals' contract amounts (as known at the end of `month`)."""
    won_from, paid_from, paid_to = (at_midnight(month_start(month, n), f.zone) for n in (-1, 0, 1))
    q = Query()
    known = f.at(paid_to - EPSILON)
    rows = await _fetch(pool, q, (
        f"SELECT {q.group(f)} AS grp, {q.money(f, 'o.won_amount')} AS won,"
        f" {q.money(f, 'p.paid')} AS paid FROM {q.snapshot(known)} LEFT JOIN"
        " (SELECT opportunity_id, sum(amount) AS paid FROM payment"
        f" WHERE received_at >= {q.arg(paid_from)} AND received_at < {q.arg(paid_to)}"
        " GROUP BY 1) p USING (opportunity_id)"
        f" WHERE o.status = 'won' AND o.won_at >= {q.arg(won_from)}"
        f" AND o.won_at < {q.arg(paid_from)} GROUP BY 1"
    ))  # fmt: skip
    found: dict[str | None, Any] = {}
    total_won, total_paid = Decimal(0), Decimal(0)
    for r in rows:
        won, paid = money(r["won"]), money(r["paid"])
        total_won, total_paid = total_won + won, total_paid + paid
        found[r["grp"]] = {"won_amount": won, "paid": paid, "rate": rate(paid, won)}
    found["*"] = {"won_amount": total_won, "paid": total_paid, "rate": rate(total_paid, total_won)}
    return found


async def forecast(pool: asyncpg.Pool, f: Filters, at: datetime, now: datetime) -> dict[str, Any]:
    """Next month's forecast made at `at`: new-signed revenue = fresh amount x last month's
    amount conversion rate x last month's commitment attainment; new deals = fresh count x last
    month's count conversion rate. When that month is over by `now` (the injected clock), what
    actually happened is beside."""
    this_month = month_start(at.astimezone(f.zone).date())
    last_month = month_start(this_month, -1)
    end_of_last = at_midnight(this_month, f.zone) - EPSILON
    # Three independent reads, side by side on the pool's connections.
    current, then, attained = await asyncio.gather(
        fresh(pool, f, at, current=f.as_of is None),
        fresh(pool, f, end_of_last),
        attainment(pool, f, last_month),
    )
    before = {r["group"]: r for r in then["rows"]}
    target_from, target_to = (
        at_midnight(month_start(this_month, 1), f.zone),
        at_midnight(month_start(this_month, 2), f.zone),
    )

    def line(grp: str | None, fresh_row: dict[str, Any], past: dict[str, Any] | None,
             attain: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
        amount_rate = past["conversion_amount_rate"] if past else None
        count_rate = past["conversion_count_rate"] if past else None
        attain_rate = attain["rate"] if attain else None
        revenue = None
        if amount_rate is not None and attain_rate is not None:
            revenue = money(fresh_row["fresh_amount"] * amount_rate * attain_rate)
        deals = (
            None if count_rate is None else (fresh_row["fresh_count"] * count_rate).quantize(DAYS)
        )
        return {
            "group": grp, "month": target_from.date(), "fresh_count": fresh_row["fresh_count"],
            "fresh_amount": fresh_row["fresh_amount"],
            "last_month_conversion_amount_rate": amount_rate,
            "last_month_conversion_count_rate": count_rate,
            "last_month_attainment": attain_rate, "new_signed_revenue": revenue,
            "new_deals": deals,
        }  # fmt: skip

    rows = [line(r["group"], r, before.get(r["group"]), attained.get(r["group"]))
            for r in current["rows"]] if f.group_by else []  # fmt: skip
    total = line(None, current["total"], then["total"], attained.get("*"))
    if f.as_of is not None and target_to <= now:
        total["actual"] = await _actual(pool, f, target_from, target_to)
    return {"rows": rows or [total], "total": total}


async def _actual(pool: asyncpg.Pool, f: Filters, start: datetime, end: datetime) -> dict[str, Any]:
    """What the forecast month brought, as known now: deals won in it, their contract amounts,
    and the payments received in it."""
    q = Query()
    s, e = q.arg(start), q.arg(end)
    won = f"o.status = 'won' AND o.won_at >= {s} AND o.won_at < {e}"
    row = await pool.fetchrow(
        f"SELECT count(*) FILTER (WHERE {won}) AS deals,"
        f" {q.money(f, 'o.won_amount', won)} AS signed,"
        f" {q.money(f, 'p.paid')} AS paid FROM {q.snapshot(f.at(None))} LEFT JOIN"
        f" (SELECT opportunity_id, sum(amount) AS paid FROM payment WHERE received_at >= {s}"
        f" AND received_at < {e} GROUP BY 1) p USING (opportunity_id)",
        *q.args,
    )
    assert row is not None
    return {"new_deals": int(row["deals"]), "signed_amount": money(row["signed"]),
            "payments": money(row["paid"])}  # fmt: skip


# -- partner commissions -----------------------------------------------------------------------


async def partner_commissions(
    pool: asyncpg.Pool,
    f: Filters,
    start: datetime,
    end: datetime,
    partner: str | None,
    now: datetime,
) -> dict[str, Any]:
    """Per partner, the opportunities won in [start, end) whose lead the partner had registered
    (报备) and still held at the win, with amounts and payments; and the partner's
    registrations: held, expired, conflicted."""
    q = Query()
    only = f" AND r.partner_id = {q.arg(partner)}" if partner else ""
    known = f" AND r.registered_at <= {q.arg(f.as_of)}" if f.as_of else ""
    rows = await _fetch(pool, q, (
        "SELECT r.partner_id, o.opportunity_id, o.company, o.won_at, o.currency, o.won_amount,"
        " o.received, r.registration_id, r.registered_at FROM"
        f" {q.snapshot(f)} JOIN registration r ON r.lead_id = ANY(o.lead_ids)"
        " WHERE o.status = 'won' AND r.registered_at <= o.won_at"
        " AND o.won_at < least(r.expires_at, coalesce(r.expired_at, r.expires_at))"
        f" AND o.won_at >= {q.arg(start)} AND o.won_at < {q.arg(end)}{only}{known}"
        " ORDER BY r.partner_id, o.won_at"
    ))  # fmt: skip
    out = [{"group": r["partner_id"], "partner_id": r["partner_id"],
            "opportunity_id": r["opportunity_id"], "company": r["company"], "won_at": r["won_at"],
            "currency": r["currency"], "won_amount": money(r["won_amount"]),
            "received": money(r["received"]), "registration_id": r["registration_id"],
            "registered_at": r["registered_at"]} for r in rows]  # fmt: skip
    q = Query()
    at = q.arg(f.as_of or now)
    who = f" AND partner_id = {q.arg(partner)}" if partner else ""
    registrations = await _fetch(pool, q, (
        "SELECT partner_id, registration_id, lead_id, company, registered_at AS at,"
        f" CASE WHEN coalesce(expired_at, expires_at) <= {at} THEN 'expired' ELSE 'held' END"
        f" AS status FROM registration WHERE registered_at <= {at}{who} UNION ALL"
        " SELECT partner_id, registration_id, lead_id, NULL, at, 'conflicted'"
        f" FROM registration_conflict WHERE at <= {at}{who} ORDER BY 1, 5"
    ))  # fmt: skip
    total = {"commissions": len(out),
             "won_amount": money(sum((r["won_amount"] for r in out), 0)),
             "received": money(sum((r["received"] for r in out), 0))}  # fmt: skip
    return {"rows": out, "total": total, "registrations": [dict(r) for r in registrations]}

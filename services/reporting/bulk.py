"""The opportunity read models rebuilt set-based, inside PostgreSQL: what `replay reporting` does
with the pipeline store's history up to a fixed position, before it goes on event by event. Each
chunk of streams is read, parsed (`jsonb`), folded by window functions and written by one
statement, so no event travels to Python and back.

It states `domain.fold` a second time, in SQL: each column of a version is the value given by the
latest event that sets it (a running `max` over "version, then value" per column, all in one
window), and versions at the same moment collapse into one, as `projection` does. The live
projection and this rebuild are held equal by `replay reporting --verify` on every running system
and by `tests/integration/test_replay_bulk.py` over every kind of event: a change to `fold` needs
the same change here."""

from __future__ import annotations

import re
import uuid

import asyncpg
from eventsourcing.utils import get_topic

from services.pipeline.domain import Opportunity
from services.reporting.projection import FUNNEL_KEY, STATE_COLUMNS

# The reportable opportunity events, by the short names the statement uses.
KINDS = {
    "OpportunityOpened": "O",
    "OpportunityScored": "S",
    "OpportunityAssigned": "A",
    "OpportunityStageChanged": "SC",
    "OpportunityProbabilityOverridden": "P",
    "OpportunityAmountChanged": "AC",
    "OpportunityWon": "W",
    "PaymentReceived": "PR",
    "OpportunityLost": "L",
    "OpportunityReopened": "RO",
    "OpportunityRecycled": "RC",
    "OpportunityReactivated": "RA",
    "LeadAttached": "LA",
    "LeadDetached": "LD",
}


def kinds_by_topic() -> dict[str, str]:
    """The stored topic of each reportable opportunity event, and its short name."""
    found = {}
    for value in vars(Opportunity).values():
        name = getattr(value, "public_name", "")
        if isinstance(value, type) and name in KINDS:
            found[get_topic(value)] = KINDS[name]
    missing = set(KINDS.values()) - set(found.values())
    assert not missing, f"no event class for {missing}"
    return found


TO_F = "kind = 'SC' AND stage_to = 'F'"
V = "lpad(version::text, 10, '0')"  # a version as text that sorts as the number


def _kind(*kinds: str) -> str:
    return "kind IN (" + ", ".join(f"'{k}'" for k in kinds) + ")"


def _latest(setters: str, *values: str) -> str:
    """The values set by the latest event up to this row that `setters` holds for: a running max
    over arrays whose first element, the version, decides (NULL values kept as NULL)."""
    return f"max(CASE WHEN {setters} THEN ARRAY[{V}, {', '.join(values)}] END) OVER w"


# Each event's fields, read once from its payload. `stage_to` is the stage it moves to (or was
# lost at), `at_field` its own time field, `money`/`currency` its amount (the contract's for a win).
FIELDS = {
    "stage_to": "CASE WHEN kind IN ('O', 'RO', 'L') THEN p->>'stage'"
    " WHEN kind = 'SC' THEN p->>'to_stage' WHEN kind = 'W' THEN 'F' END",
    "at_field": "CASE kind WHEN 'O' THEN p->>'opened_at' WHEN 'SC' THEN p->>'changed_at'"
    " WHEN 'W' THEN p->>'won_at' WHEN 'RO' THEN p->>'reopened_at' WHEN 'L' THEN p->>'lost_at'"
    " WHEN 'PR' THEN p->>'received_at' END",
    "probability": "CASE WHEN kind = 'W' THEN '100' ELSE p->>'probability' END",
    "owner": "p->>'owner'",
    "team": "p->>'team'",
    "tier": "p->>'tier'",
    "money": "CASE WHEN kind = 'W' THEN p->'contract_amount'->>'amount'"
    " ELSE p->'amount'->>'amount' END",
    "currency": "CASE WHEN kind = 'W' THEN p->'contract_amount'->>'currency'"
    " ELSE p->'amount'->>'currency' END",
    "reason_code": "p->>'reason_code'",
    "competitor": "p->>'competitor'",
    "lead_id": "(p->>'lead_id')::uuid",
    # What only the opening event says, as one array.
    "opening": "CASE WHEN kind = 'O' THEN ARRAY[p->>'opportunity_id', p->>'company',"
    " p->>'source', p->>'partner_id', p->>'region', p->>'industry', p->>'expected_close',"
    " p->>'opened_at'] END",
}

# The running values of each row, from one window (`w`, a stream's events by version).
RUNNING = {
    "opening": "first_value(opening) OVER w",
    "who": _latest(
        _kind("O", "A", "RA", "RC"),
        f"CASE WHEN {_kind('A', 'RA')} THEN owner END",
        "CASE WHEN kind <> 'O' THEN team END",
    ),
    "tiered": _latest(_kind("O", "S", "AC"), "CASE WHEN kind = 'O' THEN 'small' ELSE tier END"),
    "status": _latest(
        f"{_kind('O', 'RA', 'RO', 'W', 'L', 'RC')} OR ({TO_F})",
        "CASE WHEN kind IN ('O', 'RA', 'RO') THEN 'open' WHEN kind = 'L' THEN 'lost'"
        " WHEN kind = 'RC' THEN 'recycled' ELSE 'won' END",
    ),
    "staged": _latest(_kind("O", "SC", "W", "RO"), "stage_to", "at_field"),
    "chance": _latest(_kind("O", "SC", "P", "W", "RO"), "probability"),
    "priced": _latest(_kind("O", "AC"), "money", "currency"),
    "currency_by": _latest(_kind("O", "AC", "W"), "kind"),
    "won": _latest(_kind("W"), "money", "currency"),
    "won_at": _latest(f"kind = 'W' OR ({TO_F})", "at_field"),
    "lost": _latest(
        _kind("L", "RO"),
        *(
            f"CASE WHEN kind = 'L' THEN {field} END"  # RO: none
            for field in ("at_field", "stage_to", "reason_code", "competitor")
        ),
    ),
    "reached": f'max(CASE WHEN {_kind("O", "SC", "W")} THEN stage_to END COLLATE "C") OVER w',
    "received": "coalesce(sum(money::numeric) FILTER (WHERE kind = 'PR') OVER w, 0)",
    "lead_ids": f"array_agg(lead_id) FILTER (WHERE {_kind('O', 'LA')}) OVER w",
    "detached": "array_agg(lead_id) FILTER (WHERE kind = 'LD') OVER w",
    # The stage being left, and since when (for the stays), and when the next event is.
    "before": f"max(CASE WHEN {_kind('O', 'SC', 'W', 'RO')} THEN ARRAY[{V}, stage_to,"
    " at_field] END) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)",
    "next_at": "lead(at) OVER w",
}

# A version's columns, from the running values.
STATE = {
    "opportunity_id": "opening[1]::uuid",
    "version": "version::int",
    "valid_from": "at",
    # The leads joined, in order, less those unmerged since (a lead is detached once).
    "lead_ids": "CASE WHEN detached IS NULL THEN lead_ids ELSE ARRAY(SELECT joined FROM"
    " unnest(lead_ids) WITH ORDINALITY AS j(joined, n) WHERE joined <> ALL(detached)"
    " ORDER BY n) END",
    "company": "opening[2]",
    "source": "opening[3]",
    "partner_id": "opening[4]",
    "region": "opening[5]",
    "industry": "opening[6]",
    "owner": "who[2]",
    "team": "who[3]",
    "tier": "tiered[2]",
    "status": "status[2]",
    "stage": "staged[2]",
    "probability": "chance[2]::int",
    "currency": "CASE WHEN currency_by[2] = 'W' THEN coalesce(priced[3], won[3])"
    " ELSE priced[3] END",
    "amount": "priced[2]::numeric",
    "expected_close": "opening[7]::date",
    "opened_at": "opening[8]::timestamptz",
    "stage_entered_at": "staged[3]::timestamptz",
    "reached": "reached",
    "won_at": "won_at[2]::timestamptz",
    "won_amount": "won[2]::numeric",
    "lost_at": "lost[2]::timestamptz",
    "lost_stage": "lost[3]",
    "reason_code": "lost[4]",
    "competitor": "lost[5]",
    "received": "received",
}
assert list(STATE) == STATE_COLUMNS, "the rebuilt columns are the projection's"


def chunk_statement(store: str) -> str:
    """Rebuild every opportunity whose id is in [$3, $4] from the events of `store` (a quoted
    table) up to notification $5; $1 and $2 name the reportable topics and their kinds. Returns
    how many events it read."""
    columns = ", ".join(STATE_COLUMNS)
    fields = ",\n".join(f"{sql} AS {name}" for name, sql in FIELDS.items())
    running = ",\n".join(f"{sql} AS {name}" for name, sql in RUNNING.items())
    state = ",\n".join(f"{sql} AS {name}" for name, sql in STATE.items())
    return f"""
    WITH ev AS MATERIALIZED (  -- every event of the chunk; a reportable one's fields
        SELECT id, version, kind, at, {fields}
        FROM (  -- (OFFSET 0: each parsed once, not once for every field read from it)
            SELECT id, version, kind, (j->'timestamp'->>'_data_')::timestamptz AS at,
                   j->'payload' AS p
            FROM (
                SELECT e.originator_id AS id, e.originator_version AS version, k.kind,
                       CASE WHEN k.kind IS NOT NULL
                            THEN convert_from(e.state, 'UTF8')::jsonb END AS j
                FROM {store} e LEFT JOIN unnest($1::text[], $2::text[]) AS k(topic, kind)
                     ON k.topic = e.topic
                -- (+ 0: a range of the primary key is the whole scan, not with the
                -- notification index)
                WHERE e.originator_id BETWEEN $3 AND $4 AND e.notification_id + 0 <= $5
                OFFSET 0
            ) stored
            OFFSET 0
        ) parsed
    ),
    st AS MATERIALIZED (
        SELECT kind, money, at_field, before, next_at, {state}
        FROM (
            SELECT id, version, kind, at, money, at_field, {running}
            FROM ev WHERE kind IS NOT NULL
            WINDOW w AS (PARTITION BY id ORDER BY version)
        ) running
        WHERE opening IS NOT NULL  -- a stream reported on from its opening
    ),
    now_rows AS (
        INSERT INTO opportunity_now ({columns})
        SELECT {columns} FROM st WHERE next_at IS NULL
    ),
    -- A version lasts until the next moment the opportunity changed: of the versions at one
    -- moment, the last.
    history_rows AS (
        INSERT INTO opportunity_history ({columns}, valid_to)
        SELECT {columns}, next_at FROM st WHERE next_at > valid_from
    ),
    stays AS (
        INSERT INTO stage_stay (opportunity_id, stage, entered_at, left_at)
        SELECT opportunity_id, before[2], before[3]::timestamptz, at_field::timestamptz
        FROM st WHERE {_kind("SC", "W", "L")}
        ORDER BY opportunity_id, version  -- of stays ending together in a stage, the first
        ON CONFLICT DO NOTHING
    ),
    payments AS (
        INSERT INTO payment (opportunity_id, version, amount, received_at)
        SELECT opportunity_id, version, money::numeric, at_field::timestamptz
        FROM st WHERE kind = 'PR'
    ),
    positions AS (
        INSERT INTO stream_position (stream_id, version)
        SELECT id, max(version) FROM ev GROUP BY id
    )
    SELECT count(*) FROM ev
    """


# The current opportunities summed as `projection` keeps `funnel_now` (weighted: amount times
# probability times 0.01, exact in numeric, as the projection's Decimal arithmetic is).
FUNNEL = f"""
    INSERT INTO funnel_now ({", ".join(FUNNEL_KEY)}, n, amount, weighted)
    SELECT status, stage, coalesce(currency, ''), coalesce(owner, ''), coalesce(team, ''),
           coalesce(region, ''), source, coalesce(partner_id, ''), tier, count(*),
           coalesce(sum(amount), 0), coalesce(sum(amount * probability * 0.01), 0)
    FROM opportunity_now GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9
"""


CHUNK_EVENTS = 120_000  # sorted and windowed in memory (`POOL_SETTINGS`' work_mem) per chunk


def chunks(upto: int, workers: int = 2) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """Ranges of stream ids that split a store of `upto` events evenly (ids are uniform): about
    CHUNK_EVENTS each, as many for each of `workers`."""
    count = workers * max(1, -(-upto // (CHUNK_EVENTS * workers)))
    step = 2**128 // count
    return [
        (
            uuid.UUID(int=n * step),
            uuid.UUID(int=2**128 - 1 if n == count - 1 else (n + 1) * step - 1),
        )
        for n in range(count)
    ]


# The tables a chunk writes; their indexes other than the keys are made once the chunks are in
# (a third of the rebuild's time went to keeping them row by row, measured on 460,000 events).
WRITTEN = ("opportunity_now", "opportunity_history", "stage_stay", "payment")
SET_ASIDE = """
    INSERT INTO replay_index
    SELECT c.relname, pg_get_indexdef(i.indexrelid)
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         JOIN pg_class t ON t.oid = i.indrelid
    WHERE t.relnamespace = current_schema()::regnamespace AND t.relname = ANY($1::text[])
      AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
    ON CONFLICT DO NOTHING
"""


async def set_indexes_aside(conn: asyncpg.Connection) -> None:
    """Drop the written tables' secondary indexes, keeping how to make them again."""
    async with conn.transaction():
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS replay_index (name text PRIMARY KEY,"
            " definition text NOT NULL)"
        )
        await conn.execute(SET_ASIDE, list(WRITTEN))
        for row in await conn.fetch("SELECT name FROM replay_index"):
            await conn.execute(f'DROP INDEX IF EXISTS "{row["name"]}"')


async def indexes_set_aside(conn: asyncpg.Connection) -> list[str]:
    """What `set_indexes_aside` dropped, as the statements that make each again."""
    if await conn.fetchval("SELECT to_regclass('replay_index')") is None:
        return []
    return [
        re.sub(r"^CREATE (UNIQUE )?INDEX ", r"CREATE \1INDEX IF NOT EXISTS ", row["definition"])
        for row in await conn.fetch("SELECT definition FROM replay_index ORDER BY name")
    ]


async def rebuild_chunk(
    conn: asyncpg.Connection, store: str, bounds: tuple[uuid.UUID, uuid.UUID], upto: int
) -> int:
    topics = kinds_by_topic()
    return int(
        await conn.fetchval(
            chunk_statement(store), list(topics), list(topics.values()), *bounds, upto
        )
    )


async def sum_funnel(conn: asyncpg.Connection) -> None:
    await conn.execute(FUNNEL)

"""Routing's load cap across replicas (SPEC §4: round-robin with load cap within a team): two
pipeline replicas that open deals for one team at the same moment do not both give its rep the
last free place. Each looks the loads up before its transaction; the one that commits second
finds the rep over the cap in its own transaction, and its batch is decided again on the loads
as they are. On the real PostgreSQL, each round's two batches let go together from two
threads."""

from __future__ import annotations

import asyncio
import uuid
from functools import partial
from typing import Any

from services.pipeline.app import MIGRATIONS, PipelineApp
from services.pipeline.domain import opportunity_id_for
from shared.settings import Rules, Settings
from tests.factories import lead_captured
from tests.support import at_once

ROUNDS = 6
CAP = 2


def rules_for(team: str, rep: str) -> Rules:
    return Rules.model_validate({
        "routing": {"default_team": team, "load_cap": CAP},
        "directory": {"teams": [{"id": team}], "users": [{"id": rep, "team": team}]},
    })  # fmt: skip


def owner_of(app: PipelineApp, lead: uuid.UUID) -> str | None:
    return app.repository.get(opportunity_id_for(lead)).owner  # type: ignore[no-any-return]


async def test_two_replicas_never_route_a_rep_past_the_load_cap(
    settings: Settings, schema: str, open_pool: Any
) -> None:
    await open_pool(schema, MIGRATIONS)
    one, other = [await asyncio.to_thread(PipelineApp, settings.dsn(), schema) for _ in range(2)]
    for n in range(ROUNDS):
        rep, rules = f"solo{n}", rules_for(f"team{n}", f"solo{n}")
        first, left, right = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        # The rep holds one deal: one place is left under the cap.
        await asyncio.to_thread(one.apply_lead_events, f"round{n}:p0", [(1, lead_captured(first))],
                                rules)  # fmt: skip
        assert await asyncio.to_thread(owner_of, one, first) == rep
        applied = await at_once(
            partial(one.apply_lead_events, f"round{n}:p1", [(1, lead_captured(left))], rules),
            partial(other.apply_lead_events, f"round{n}:p2", [(1, lead_captured(right))], rules),
        )
        assert applied == [1, 1]  # both deals opened
        owners = [await asyncio.to_thread(owner_of, one, lead) for lead in (left, right)]
        assert sorted(owners, key=str) == sorted([rep, None], key=str), f"round {n}: {owners}"
        held = await asyncio.to_thread(one.owner_loads, [rep])
        assert held == {rep: CAP}, f"round {n}"
    one.close()
    other.close()

"""The crash and fault suite in its shortened form (`make chaos` runs it in full; what each count
means is in tests.chaos): 30 s of partner load with a service process SIGKILLed every 10 s, the
broker replaced by a fresh, empty one and PostgreSQL crashed, and then not one partner message
unanswered or answered twice, not one accepted lead without exactly one opportunity, no gap on
`opportunity.events.v1`, reporting equal to a fresh replay and no reminder sent twice."""

from __future__ import annotations

import pytest

from shared.devstack import DevStack
from tests.chaos.run import Plan, run_chaos
from tests.e2e.conftest import Services

pytestmark = pytest.mark.e2e


async def test_nothing_is_lost_or_duplicated_under_fire(
    e2e_stack: DevStack, services: Services
) -> None:
    # A killed notify's deliveries wait out their 2-minute lease: the full run waits for them.
    plan = Plan(seconds=30, rate=120, seed=20261122, drain_within=90, wait_for_leases=False)
    report = await run_chaos(e2e_stack, services, plan)
    assert report.problems == {}, report.problems  # the full report is in the captured stdout
    totals = report.totals
    assert (totals["kills"], totals["broker restarts"], totals["postgres restarts"]) == (3, 1, 1)
    assert totals["messages"] > 1000 and totals["accepted"] == totals["opportunities"] > 1000
    assert totals["stage changes"] > 0 and totals["reminders sent"] > 0

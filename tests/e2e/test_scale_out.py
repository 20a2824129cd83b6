"""Scale-out (issue 8): pipeline, reporting and notify run as 3 replicas each in their consumer
groups, capture as one, on a stack of their own; while a partner sends, one more replica of each
joins and later one of each is SIGKILLed (tests.chaos.faults.Rebalances), and every count of
the crash and fault suite (what each means: tests.chaos) stays at zero: every message answered
once, every accepted lead exactly one opportunity, no gap on `opportunity.events.v1`, reporting
equal to a fresh replay, no reminder sent twice. Throughput with 1 vs 3 replicas is measured by
`make bench` (tests/perf/scale_bench.py), not here."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from shared.devstack import DevStack
from tests.chaos.faults import SCALED, Rebalances
from tests.chaos.run import Plan, run_chaos
from tests.conftest import stack_settings
from tests.e2e.conftest import Services, cli
from tests.support import metric_sum

pytestmark = pytest.mark.e2e

REPLICAS = 3


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevStack, Services]]:
    stack = DevStack(stack_settings(tmp_path_factory.mktemp("scale")))
    stack.start()
    services = Services(stack, tmp_path_factory.mktemp("scale-logs"))
    try:
        cli(services.env, "migrate")
        services.start_all(dict.fromkeys(SCALED, REPLICAS))
        services.wait_ready(within=120)
        yield stack, services
    finally:
        services.stop()
        stack.stop()


async def test_replicas_join_and_die_under_load_and_nothing_is_lost_or_duplicated(
    scaled: tuple[DevStack, Services],
) -> None:
    stack, services = scaled
    assert {s: len(services.replicas(s)) for s in SCALED} == dict.fromkeys(SCALED, REPLICAS)
    plan = Plan(seconds=30, rate=120, seed=20261123, drain_within=90, wait_for_leases=False)
    report = await run_chaos(stack, services, plan, Rebalances)
    assert report.problems == {}, report.problems  # the full report is in the captured stdout
    added, killed = (f.split("  ", 1)[1] for f in report.faults)
    for service in SCALED:
        assert f"{service}-{REPLICAS + 1}" in added and f"{service}-" in killed
        assert len(services.replicas(service)) == REPLICAS  # one joined, one died
    # The work was shared: every replica still running (the one that joined included) handled
    # messages of its own.
    async with httpx.AsyncClient(timeout=5) as http:
        handled = {
            name: metric_sum((await http.get(f"{services.url(name)}/metrics")).text,
                             "dealstream_messages_in_total")
            for s in SCALED
            for name in services.replicas(s)
        }  # fmt: skip
    assert all(n > 0 for n in handled.values()), handled
    totals = report.totals
    assert totals["messages"] > 1000 and totals["accepted"] == totals["opportunities"] > 1000
    assert totals["stage changes"] > 0 and totals["reminders sent"] > 0

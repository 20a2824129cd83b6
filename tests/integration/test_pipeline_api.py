"""The pipeline API as reps, managers, ops and admins use it (SPEC §4, §8): a scripted life with
refusals and time travel, every route under every role, and racing writers."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest

from services.pipeline.app import Command, StaleVersion
from services.pipeline.domain import Opportunity, opportunity_id_for
from shared.auth import Principal, Role
from tests.factories import duplicate_lead, lead_captured, opportunity_event
from tests.integration.pipeline_fixtures import PRINCIPALS, Pipeline, pipeline  # noqa: F401

CNY = "CNY"


def money(amount: str) -> dict[str, str]:
    return {"amount": amount, "currency": CNY}


async def test_a_won_life_with_refusals_history_and_as_of(pipeline: Pipeline) -> None:  # noqa: F811
    p = pipeline
    o = await p.open(budget=money("150000.00"))
    view = (await p.http.get(f"/v1/opportunities/{o}", headers=p.auth("rep1"))).json()
    assert (view["stage"], view["owner"], view["team"], view["tier"]) == (
        "A",
        "rep1",
        "xian",
        "important",
    )
    assert (view["version"], view["score"], view["grade"]) == (3, 95, "A")
    moments = [(p.clock.now(), "A", 3)]

    async def step(route: str, **body: object) -> dict:  # type: ignore[type-arg]
        p.clock.set(p.clock.now() + timedelta(days=1))
        answer = await p.post("rep1", o, route, expected_version=await p.version(o), **body)
        assert answer.status_code == 200, answer.text
        return answer.json()

    await step("stage", to_stage="B")
    skip = await p.post("rep1", o, "stage", expected_version=4, to_stage="D")
    assert skip.status_code == 409 and skip.json()["code"] == "stage_skip"
    stale = await p.post("rep1", o, "stage", expected_version=3, to_stage="C")
    assert stale.status_code == 409
    assert stale.json() == {
        "code": "stale_version",
        "current_version": 4,
        "detail": {},
        "message": "stale expected_version; current version is 4",
    }
    moments.append((p.clock.now(), "B", 4))
    await step("follow-ups", channel="visit", summary="met the CIO")
    await step("stage", to_stage="C")
    moments.append((p.clock.now(), "C", 6))
    await step("stage", to_stage="D")
    unmet = await p.post("rep1", o, "stage", expected_version=7, to_stage="E")
    assert unmet.status_code == 409 and unmet.json()["detail"]["missing"] == ["proposal_amount"]
    await step("amount", kind="proposal", amount=money("140000.00"))
    await step("stage", to_stage="E")
    moments.append((p.clock.now(), "E", 9))
    won = await step("win", contract_amount=money("138000.00"))
    assert (won["status"], won["stage"], won["probability"]) == ("won", "F", 100)
    paid = await step("payments", amount=money("38000.00"))
    assert paid["received"] == money("38000.00")
    moments.append((p.clock.now(), "F", 11))

    for at, stage, version in moments:
        then = await p.http.get(f"/v1/opportunities/{o}", params={"as_of": at.isoformat()},
                                headers=p.auth("rep1"))  # fmt: skip
        assert (then.json()["stage"], then.json()["version"]) == (stage, version), at
    before = await p.http.get(
        f"/v1/opportunities/{o}",
        headers=p.auth("rep1"),
        params={"as_of": (moments[0][0] - timedelta(days=1)).isoformat()},
    )
    assert before.status_code == 404
    far = await p.http.get(f"/v1/opportunities/{o}", headers=p.auth("rep1"),
                           params={"as_of": "9999-12-31T23:00:00-05:00"})  # fmt: skip
    assert far.status_code == 422  # past the calendar's end in UTC: a 500 before

    history = (await p.http.get(f"/v1/opportunities/{o}/history", headers=p.auth("ops"))).json()
    assert [h["version"] for h in history] == list(range(1, 12))
    assert [h["event_type"] for h in history][:4] == [
        "OpportunityOpened",
        "OpportunityScored",
        "OpportunityAssigned",
        "OpportunityStageChanged",
    ]
    assert history[3]["actor"] == "rep1" and history[0]["actor"] == "system"
    refused = await p.pool.fetch("SELECT code, actor FROM refused_command WHERE opportunity_id = $1"
                                 " ORDER BY id", o)  # fmt: skip
    assert [(r["code"], r["actor"]) for r in refused] == [
        ("stage_skip", "rep1"),
        ("stale_version", "rep1"),
        ("exit_criteria_unmet", "rep1"),
    ]


async def test_lost_reopened_and_validation_refusals(pipeline: Pipeline) -> None:  # noqa: F811
    p = pipeline
    o = await p.open()
    await p.post("rep1", o, "stage", expected_version=3, to_stage="B")
    await p.post("rep1", o, "stage", expected_version=4, to_stage="C")
    bad = await p.post("rep1", o, "lose", expected_version=5, reason_code="bad_luck", note="n")
    assert bad.status_code == 422 and bad.json()["code"] == "unknown_reason"
    for note in ({}, {"note": ""}, {"note": " \n"}):  # SPEC §4: a reason code plus a note
        unsaid = await p.post("rep1", o, "lose", expected_version=5, reason_code="price", **note)
        assert unsaid.status_code == 422, unsaid.text
        assert [e["loc"][-1] for e in unsaid.json()["detail"]] == ["note"]
    lost = await p.post("rep1", o, "lose", expected_version=5, reason_code="competitor",
                        competitor="Globex", note="cheaper")  # fmt: skip
    assert (lost.json()["status"], lost.json()["lost_stage"]) == ("lost", "C")
    again = await p.post("rep1", o, "stage", expected_version=6, to_stage="D")
    assert again.json()["code"] == "not_open"
    reopened = await p.post("mgr_xian", o, "reopen", expected_version=6, note="budget is back")
    assert (reopened.json()["status"], reopened.json()["stage"]) == ("open", "C")
    shape = await p.post("rep1", o, "stage", expected_version=7)
    assert shape.status_code == 422  # to_stage missing: field errors from the contract
    # A NUL would go on into reporting's text columns and stop its consumer: refused here.
    nul = await p.post("rep1", o, "lose", expected_version=7, reason_code="competitor",
                       competitor="Glo\x00bex", note="n")  # fmt: skip
    assert nul.status_code == 422 and "NUL" in nul.text
    listed = await p.http.get("/v1/opportunities", params={"owner": "a\x00b"},
                              headers=p.auth("ops"))  # fmt: skip
    assert listed.status_code == 422 and listed.json()["detail"][0]["type"] == "invalid_character"
    beyond = await p.http.get("/v1/opportunities", params={"offset": str(2**70)},
                              headers=p.auth("ops"))  # fmt: skip
    assert beyond.status_code == 422  # found by schemathesis: a 500 before


# Expected status per caller for an opportunity of rep1 in team xian. Commands are sent with a
# stale version, so an allowed caller gets 409 and nothing changes.
ROUTES = [
    "get", "history", "stage", "follow-ups", "win", "lose", "reopen", "assign", "payments",
    "amount", "probability", "reactivate",
]  # fmt: skip
SEES = {
    "rep1": True,
    "rep2": False,
    "mgr_xian": True,
    "mgr_bj": False,
    "ops": True,
    "admin": True,
    "partner": False,
}


def expected(who: str, route: str) -> int:
    if not SEES[who]:
        return 404
    if route in ("get", "history"):
        return 200
    if who == "ops" or (who == "rep1" and route in ("assign", "reactivate")):
        return 403
    return 409


BODIES = {
    "stage": {"to_stage": "B"},
    "follow-ups": {"channel": "call", "summary": "s"},
    "win": {"contract_amount": money("1.00")},
    "lose": {"reason_code": "price", "note": "n"},
    "reopen": {},
    "assign": {"owner": "rep2"},
    "payments": {"amount": money("1.00")},
    "amount": {"kind": "expected", "amount": money("1.00")},
    "probability": {"probability": 40},
    "reactivate": {"owner": "rep1"},
}


@pytest.mark.parametrize("who", list(SEES))
async def test_every_route_under_every_role(pipeline: Pipeline, who: str) -> None:  # noqa: F811
    p = pipeline
    o = await p.open()
    for route in ROUTES:
        if route == "get":
            answer = await p.http.get(f"/v1/opportunities/{o}", headers=p.auth(who))
        elif route == "history":
            answer = await p.http.get(f"/v1/opportunities/{o}/history", headers=p.auth(who))
        else:
            answer = await p.post(who, o, route, expected_version=99, **BODIES[route])
        assert answer.status_code == expected(who, route), (who, route, answer.text)
        if answer.status_code == 409:
            assert answer.json()["code"] == "stale_version"
    assert await p.version(o) == 3  # nothing changed
    missing = await p.http.get(f"/v1/opportunities/{uuid.uuid4()}", headers=p.auth(who))
    assert missing.status_code == 404
    assert (await p.http.get(f"/v1/opportunities/{o}")).status_code == 401


async def test_lists_are_scoped_filtered_and_paged(pipeline: Pipeline) -> None:  # noqa: F811
    p = pipeline
    xian = [await p.open() for _ in range(3)]  # rep1, rep2, rep1 (least loaded first)
    beijing = await p.open(region="CN-BJ")

    async def ids(who: str, **params: object) -> set[uuid.UUID]:
        page = await p.http.get("/v1/opportunities", params=params, headers=p.auth(who))
        assert page.status_code == 200, page.text
        return {uuid.UUID(i["opportunity_id"]) for i in page.json()["items"]}

    mine = await ids("rep1")
    assert mine and mine <= set(xian) and beijing not in mine
    assert await ids("mgr_xian") >= set(xian) and beijing not in await ids("mgr_xian")
    assert await ids("mgr_bj") == {beijing}
    everything = await ids("ops")
    assert set(xian) | {beijing} <= everything
    assert await ids("rep1", owner="rep2") == set()  # a rep cannot look at another's
    assert await ids("ops", team="beijing") == {beijing}
    assert await ids("partner") == set()  # a partner token lists no deal, filtered or not
    assert await ids("partner", team="xian", owner="rep1") == set()
    page = await p.http.get("/v1/opportunities", params={"limit": 2, "offset": 0, "team": "xian"},
                            headers=p.auth("admin"))  # fmt: skip
    assert len(page.json()["items"]) == 2 and page.json()["total"] == 3
    lead_page = await p.http.get(
        "/v1/opportunities",
        headers=p.auth("admin"),
        params={"lead_id": str(await p.app_lead(xian[0]))},
    )
    assert [i["opportunity_id"] for i in lead_page.json()["items"]] == [str(xian[0])]


async def test_racing_writers_one_wins_each_time(pipeline: Pipeline) -> None:  # noqa: F811
    p = pipeline
    o = await p.open()
    for round_number in range(25):
        version = await p.version(o)
        answers = await asyncio.gather(*(
            p.post(who, o, "follow-ups", expected_version=version, channel="call",
                   summary=f"round {round_number} by {who}")
            for who in ("rep1", "mgr_xian")
        ))  # fmt: skip
        assert sorted(a.status_code for a in answers) == [200, 409], [a.text for a in answers]
        loser = next(a for a in answers if a.status_code == 409).json()
        assert loser["current_version"] == version + 1
    assert await p.version(o) == 3 + 25
    history = (await p.http.get(f"/v1/opportunities/{o}/history", headers=p.auth("admin"))).json()
    assert [h["version"] for h in history] == list(range(1, 29))


async def test_idle_opportunities_are_recycled_and_reactivated(pipeline: Pipeline) -> None:  # noqa: F811
    p = pipeline
    idle, busy = await p.open(), await p.open()
    p.clock.set(p.clock.now() + timedelta(days=30))
    got = await p.http.get(f"/v1/opportunities/{busy}", headers=p.auth("admin"))
    assert got.status_code == 200, got.text
    owner = got.json()["owner"]
    logged = await p.post(owner, busy, "follow-ups", expected_version=3, channel="call",
                          summary="still on")  # fmt: skip
    assert logged.status_code == 200, logged.text
    recycled = await asyncio.to_thread(p.app.recycle_idle, p.clock.now() + timedelta(days=31),
                                       p.settings.rules())  # fmt: skip
    assert recycled == [idle]
    view = (await p.http.get(f"/v1/opportunities/{idle}", headers=p.auth("mgr_xian"))).json()
    assert (view["status"], view["owner"]) == ("recycled", None)
    back = await p.post("mgr_xian", idle, "reactivate", expected_version=4, owner="rep2")
    assert (back.json()["status"], back.json()["owner"]) == ("open", "rep2")


async def test_a_merged_lead_joins_the_opportunity_of_the_lead_it_was_merged_into(
    pipeline: Pipeline,  # noqa: F811
) -> None:
    p = pipeline
    o = await p.open()
    first_lead = await p.app_lead(o)
    merged_lead = uuid.uuid4()
    captured, merged = duplicate_lead(merged_lead, first_lead, "email", "2026-11-02T10:00:00Z")
    for _ in range(2):  # delivered twice: attached once, and no second opportunity opened
        await asyncio.to_thread(
            p.app.apply_lead_events, "capture:p1", [(6, captured), (7, merged)], p.settings.rules()
        )

    view = (await p.http.get(f"/v1/opportunities/{o}", headers=p.auth("admin"))).json()
    assert view["lead_ids"] == [str(first_lead), str(merged_lead)] and view["version"] == 4
    page = await p.http.get("/v1/opportunities", params={"lead_id": str(merged_lead)},
                            headers=p.auth("admin"))  # fmt: skip
    assert [i["opportunity_id"] for i in page.json()["items"]] == [str(o)]
    assert await p.pool.fetchval("SELECT count(*) FROM opportunity_index") == 1


async def test_a_merge_listed_before_its_customer_in_one_fetch_of_two_partitions_attaches(
    pipeline: Pipeline,  # noqa: F811
) -> None:
    """One fetch, two partitions, saved together: the merge (partition 4) comes before the
    lead of the customer it joins (partition 2). It waits within the batch, is attached when
    that lead opens, and nothing is left waiting."""
    p = pipeline
    root, duplicate = uuid.uuid4(), uuid.uuid4()
    captured, merged = duplicate_lead(duplicate, root, "phone", "2026-11-02T10:00:00Z")
    fetch = [("capture:p4", 3, captured), ("capture:p4", 4, merged),
             ("capture:p2", 2, lead_captured(root))]  # fmt: skip
    rules = p.settings.rules()
    assert await asyncio.to_thread(p.app.apply_tracked_lead_events, fetch, rules) == 3
    view = await asyncio.to_thread(p.app.get, opportunity_id_for(root))
    assert view.lead_ids == [root, duplicate]
    assert await p.pool.fetchval("SELECT count(*) FROM pending_merge") == 0
    assert await p.pool.fetchval("SELECT count(*) FROM opportunity_index") == 1
    assert p.app.tracked_positions(["capture:p2", "capture:p4"]) == {
        "capture:p2": 2,
        "capture:p4": 4,
    }


async def test_a_merge_waits_for_the_customers_opportunity_without_holding_up_others(
    pipeline: Pipeline,  # noqa: F811
) -> None:
    p = pipeline
    root, duplicate = uuid.uuid4(), uuid.uuid4()
    opened = lead_captured(root)
    captured, merged = duplicate_lead(duplicate, root, "phone", "2026-11-02T10:00:00Z")
    # On its own partition, before the customer's lead is opened: the merge waits, and the
    # partition goes on (it does not hold up every lead behind it).
    later = lead_captured(uuid.uuid4())
    batch = [(3, captured), (4, merged), (5, later)]
    await asyncio.to_thread(p.app.apply_lead_events, "capture:p4", batch, p.settings.rules())
    assert p.app.tracked_position("capture:p4") == 5
    assert await p.pool.fetchval("SELECT into_lead_id FROM pending_merge") == root
    assert await asyncio.to_thread(p.app.opportunity_of_lead, later.stream_id) is not None
    # The customer's lead opens on its partition: the waiting lead is attached with it.
    await asyncio.to_thread(p.app.apply_lead_events, "capture:p2", [(2, opened)],
                            p.settings.rules())  # fmt: skip
    view = await asyncio.to_thread(p.app.get, opportunity_id_for(root))
    assert view.lead_ids == [root, duplicate]
    assert await p.pool.fetchval("SELECT count(*) FROM pending_merge") == 0
    # Both orders leave the same: a merge whose customer is already open attaches at once.
    again = lead_captured(uuid.uuid4())
    merged_again = opportunity_event(again.stream_id, 2, "LeadMerged", {
        "lead_id": str(again.stream_id), "into_lead_id": str(root), "rule": "email",
        "merged_at": "2026-11-03T10:00:00Z",
    })  # fmt: skip
    await asyncio.to_thread(p.app.apply_lead_events, "capture:p4", [(6, merged_again)],
                            p.settings.rules())  # fmt: skip
    view = await asyncio.to_thread(p.app.get, opportunity_id_for(root))
    assert view.lead_ids == [root, duplicate, again.stream_id]
    # The race: a merge that started waiting while the customer's lead was being opened by a
    # batch on another partition (each saw nothing of the other): the sweep settles it.
    raced = uuid.uuid4()
    await p.pool.execute(
        "INSERT INTO pending_merge VALUES ($1, $2, 'phone', now(), 'e-race', 'c-race')", raced, root
    )
    assert await asyncio.to_thread(p.app.settle_pending_merges) == [raced]
    assert await asyncio.to_thread(p.app.settle_pending_merges) == []
    view = await asyncio.to_thread(p.app.get, opportunity_id_for(root))
    assert view.lead_ids[-1] == raced and view.version == 6


async def test_managers_stay_within_their_team(pipeline: Pipeline) -> None:  # noqa: F811
    p = pipeline
    o = await p.open()
    outside = await p.post("mgr_xian", o, "assign", expected_version=3, owner="rep3")
    assert outside.status_code == 403
    inside = await p.post("mgr_xian", o, "assign", expected_version=3, owner="rep2")
    assert inside.status_code == 200 and inside.json()["owner"] == "rep2"
    PRINCIPALS["teamless"] = Principal(role=Role.manager, user="nobody")
    page = await p.http.get("/v1/opportunities", headers=p.auth("teamless"))
    assert page.json()["total"] == 0
    refused = await p.pool.fetch("SELECT code, actor FROM refused_command"
                                 " WHERE opportunity_id = $1", o)  # fmt: skip
    assert [tuple(r) for r in refused] == [("forbidden", "mgr_xian")]  # an attempted bypass


async def test_an_assignment_names_people_and_teams_of_the_directory(pipeline: Pipeline) -> None:  # noqa: F811
    """Even an admin assigns to someone the directory knows, within their team: a deal held by
    an unknown owner, or by an owner of another team, was one nobody saw or was reminded of."""
    p = pipeline
    o = await p.open()
    for body, code in (({"owner": "nobody-here"}, "unknown_owner"),
                       ({"owner": "rep1", "team": "beijing"}, "owner_not_in_team"),
                       ({"team": "no-team"}, "unknown_team")):  # fmt: skip
        answer = await p.post("admin", o, "assign", expected_version=3, **body)
        assert (answer.status_code, answer.json()["code"]) == (422, code), answer.text
    moved = await p.post("admin", o, "assign", expected_version=3, owner="rep3")
    assert moved.status_code == 200, moved.text
    assert (moved.json()["owner"], moved.json()["team"]) == ("rep3", "beijing")  # their team
    pooled = await p.post("admin", o, "assign", expected_version=4, owner=None)
    assert (pooled.json()["owner"], pooled.json()["team"]) == (None, "beijing")
    codes = await p.pool.fetch("SELECT code FROM refused_command WHERE opportunity_id = $1"
                               " ORDER BY id", o)  # fmt: skip
    assert [r["code"] for r in codes] == ["unknown_owner", "owner_not_in_team", "unknown_team"]


async def test_events_carry_the_request_that_began_them(pipeline: Pipeline) -> None:  # noqa: F811
    p = pipeline
    o = await p.open()
    moved = await p.http.post(f"/v1/opportunities/{o}/stage",
                              json={"expected_version": 3, "to_stage": "B"},
                              headers={**p.auth("rep1"), "x-request-id": "req-42"})  # fmt: skip
    assert moved.status_code == 200 and moved.headers["x-request-id"] == "req-42"
    logged = await p.post("rep1", o, "follow-ups", expected_version=4, channel="call", summary="s")
    generated = logged.headers["x-request-id"]
    events = list(p.app.events.get(o))
    assert [(e.correlation_id, e.causation_id) for e in events[3:]] == [
        ("req-42", "req-42"),
        (generated, generated),
    ]
    assert events[0].correlation_id == events[1].correlation_id  # opened, scored: one lead event


async def test_commands_stored_together_and_only_the_raced_one_is_stale(pipeline: Pipeline) -> None:  # noqa: F811
    """One transaction for a batch of commands; when another writer stores first for one of
    them, the others are stored all the same and only that one is stale."""
    p = pipeline
    first, raced, third = [await p.open() for _ in range(3)]
    app, now = p.app, p.clock.now()
    raced_once = []

    def to_b(o: Opportunity) -> None:
        if o.id == raced and not raced_once:  # another writer stores between read and save
            raced_once.append(app.command(raced, 3, lambda other: other.change_stage(
                "B", "rep2", now, p.settings.rules())))  # fmt: skip
        o.change_stage("B", "rep1", now, p.settings.rules())

    outcomes = await asyncio.to_thread(
        app.commands, [Command(o, 3, to_b) for o in (first, raced, third)]
    )
    assert isinstance(outcomes[0], Opportunity) and isinstance(outcomes[2], Opportunity)
    assert isinstance(outcomes[1], StaleVersion) and outcomes[1].current == 4
    for o in (first, raced, third):
        stored = await asyncio.to_thread(app.get, o)
        assert (stored.version, stored.stage) == (4, "B")
    last = (await asyncio.to_thread(app.history, raced))[-1]
    assert last.payload["actor"] == "rep2"  # the other writer's change, none on top of it


async def test_a_batch_of_nothing_but_a_waiting_merge_keeps_it(
    pipeline: Pipeline,  # noqa: F811
) -> None:
    """A batch that stores no event (its one lead is a duplicate whose customer is not opened
    yet) still records the waiting merge with its position: nothing is lost when it settles."""
    p = pipeline
    root, duplicate = uuid.uuid4(), uuid.uuid4()
    captured, merged = duplicate_lead(duplicate, root, "email", "2026-11-02T10:00:00Z")
    await asyncio.to_thread(p.app.apply_lead_events, "capture:p5", [(7, captured), (8, merged)],
                            p.settings.rules())  # fmt: skip
    assert p.app.tracked_position("capture:p5") == 8
    assert await p.pool.fetchval(
        "SELECT into_lead_id FROM pending_merge WHERE lead_id = $1", duplicate
    ) == root  # fmt: skip
    await asyncio.to_thread(p.app.apply_lead_events, "capture:p1", [(9, lead_captured(root))],
                            p.settings.rules())  # fmt: skip
    view = await asyncio.to_thread(p.app.get, opportunity_id_for(root))
    assert view.lead_ids == [root, duplicate]

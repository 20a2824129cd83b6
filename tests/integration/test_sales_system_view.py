"""What a sales system sees: a plain aiokafka consumer on `opportunity.events.v1` receives every
event of two scripted lives (one won A→F, one lost at C and reopened) as v1 envelopes, in order,
with gap-free stream versions (SPEC §2, §4)."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

from services.pipeline.bus import route
from shared.bus.relay import OutboxRelay
from shared.contracts.envelope import Envelope, event_id_for
from shared.contracts.events import EVENT_TYPES, parse_event_data
from tests.integration.pipeline_fixtures import Pipeline, pipeline  # noqa: F401
from tests.support import read_topic


async def test_sales_systems_get_every_event_once_in_order(pipeline: Pipeline, background) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    p = pipeline
    won, lost = await p.open(), await p.open()

    async def do(o: uuid.UUID, route_name: str, **body: object) -> None:
        p.clock.set(p.clock.now() + timedelta(hours=1))
        answer = await p.post("admin", o, route_name, expected_version=await p.version(o), **body)
        assert answer.status_code == 200, answer.text

    for stage in "BCD":
        await do(won, "stage", to_stage=stage)
    await do(won, "amount", kind="proposal", amount={"amount": "90000.00", "currency": "CNY"})
    await do(won, "stage", to_stage="E")
    await do(won, "win", contract_amount={"amount": "88000.00", "currency": "CNY"})
    await do(won, "payments", amount={"amount": "88000.00", "currency": "CNY"})
    await do(lost, "stage", to_stage="B")
    await do(lost, "stage", to_stage="C")
    await do(lost, "lose", reason_code="price", note="too dear")
    await do(lost, "reopen", note="new budget")
    await do(lost, "follow-ups", channel="call", summary="restarted")
    versions = {won: await p.version(won), lost: await p.version(lost)}
    background(OutboxRelay("pipeline", p.app, route, p.settings, p.pool).run)

    def mine(records: list) -> list:  # type: ignore[type-arg]
        return [r for r in records if uuid.UUID(r.key.decode()) in versions]

    records = mine(await read_topic(p.settings.bootstrap_servers(), "opportunity.events.v1",
                                    lambda r: len(mine(r)) >= sum(versions.values())))  # fmt: skip
    assert len(records) == sum(versions.values())
    for opportunity, last in versions.items():
        stream = [r for r in records if r.key == str(opportunity).encode()]
        assert len({r.partition for r in stream}) == 1  # one partition per opportunity
        envelopes = [Envelope.model_validate(json.loads(r.value)) for r in stream]
        assert [e.stream_version for e in envelopes] == list(range(1, last + 1))
        for record, envelope in zip(stream, envelopes, strict=True):
            raw = json.loads(record.value)
            assert set(raw) == {"event_id", "event_type", "schema_version", "stream_id",
                                "stream_version", "occurred_at", "correlation_id",
                                "causation_id", "data"}  # fmt: skip
            assert raw["occurred_at"].endswith("Z")
            assert envelope.stream_id == opportunity
            assert envelope.event_id == event_id_for(opportunity, envelope.stream_version)
            assert envelope.event_type in EVENT_TYPES and envelope.schema_version == 1
            parse_event_data(envelope.event_type, envelope.data)  # the contract validates it
            headers = dict(record.headers)
            assert headers["event-type"] == envelope.event_type.encode()
            assert headers["content-type"] == b"application/json"
        types = [e.event_type for e in envelopes]
        assert types[:3] == ["OpportunityOpened", "OpportunityScored", "OpportunityAssigned"]
        stage_moves = [(e.data["from_stage"], e.data["to_stage"]) for e in envelopes
                       if e.event_type == "OpportunityStageChanged"]  # fmt: skip
        if opportunity == won:
            assert stage_moves == [("A", "B"), ("B", "C"), ("C", "D"), ("D", "E")]
            assert types[-2:] == ["OpportunityWon", "PaymentReceived"]
        else:
            assert types[-3:] == ["OpportunityLost", "OpportunityReopened", "FollowUpLogged"]
            assert envelopes[-2].data["stage"] == "C"

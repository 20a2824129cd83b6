"""The outbox relay on real PostgreSQL and the real broker: stored events are published once in
order with their envelope; a lost position republishes the same events; a fresh, empty broker
gets everything again (ARCHITECTURE decisions 1 and 2)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from eventsourcing.persistence import Notification

from services.capture.app import MIGRATIONS, CaptureApp
from services.capture.bus import CaptureRoute, route
from shared.bus.kafka import create_topics, make_producer
from shared.bus.relay import Outbound, OutboxRelay, send_batched
from shared.bus.relay_process import RelayProcess, RelaySpec
from shared.contracts.envelope import Envelope
from shared.contracts.partner import WebFormLead
from shared.devstack import DevStack
from shared.settings import Settings
from tests.support import eventually, read_topic

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def web_lead(n: int) -> WebFormLead:
    return WebFormLead.model_validate(
        {
            "company": {"name": f"Relay Co {n}", "region": "CN-BJ"},
            "contact": {"name": "Zhao"},
            "budget": {"amount": f"{1000 * (n + 1)}.00", "currency": "CNY"},
        }
    )


def mine(lead_ids: set[uuid.UUID]):  # type: ignore[no-untyped-def]
    def pick(records: list) -> list:  # type: ignore[type-arg]
        return [r for r in records if uuid.UUID(r.key.decode()) in lead_ids]

    return pick


async def test_relay_publishes_once_republishes_on_lost_position_and_on_a_fresh_broker(
    settings: Settings,
    stack: DevStack,
    schema: str,
    open_pool,
    background,  # type: ignore[no-untyped-def]
) -> None:
    pool = await open_pool(schema, MIGRATIONS)
    app = await asyncio.to_thread(CaptureApp, settings.dsn(), schema)
    lead_ids = {
        await asyncio.to_thread(app.capture_web_lead, web_lead(n), NOW, f"req-{n}")
        for n in range(5)
    }
    pick = mine(lead_ids)
    relay = OutboxRelay("capture", app, route, settings, pool)
    stop = background(relay.run)

    records = pick(
        await read_topic(
            settings.bootstrap_servers(), "lead.events.v1", lambda r: len(pick(r)) >= 5
        )
    )
    assert len(records) == 5
    envelopes = [Envelope.model_validate(json.loads(r.value)) for r in records]
    assert {e.stream_id for e in envelopes} == lead_ids
    for record, envelope in zip(records, envelopes, strict=True):
        headers = dict(record.headers)
        assert record.key == str(envelope.stream_id).encode()
        assert (
            headers["event-type"] == b"LeadCaptured"
            and headers["content-type"] == b"application/json"
        )
        assert int(headers["x-notification-id"]) >= 1
        assert envelope.stream_version == 1 and envelope.event_type == "LeadCaptured"
        assert envelope.data["lead_id"] == str(envelope.stream_id)
    first_ids = {e.stream_id: e.event_id for e in envelopes}

    # A relay that lost its position publishes everything again, with the same event ids.
    stop.set()
    await asyncio.sleep(1)
    await pool.execute("UPDATE relay_position SET position = 0 WHERE relay = 'capture'")
    background(relay.run)
    again = pick(
        await read_topic(
            settings.bootstrap_servers(), "lead.events.v1", lambda r: len(pick(r)) >= 10
        )
    )
    assert len(again) == 10
    for record in again:
        envelope = Envelope.model_validate(json.loads(record.value))
        assert first_ids[envelope.stream_id] == envelope.event_id

    # A fresh, empty broker: the relay notices the new cluster id and republishes from the start;
    # events stored afterwards follow once.
    await asyncio.to_thread(stack.restart_broker)
    late = await asyncio.to_thread(app.capture_web_lead, web_lead(9), NOW, "req-9")
    lead_ids.add(late)
    after = pick(
        await read_topic(
            settings.bootstrap_servers(), "lead.events.v1", lambda r: len(pick(r)) >= 6
        )
    )
    assert sorted(str(uuid.UUID(r.key.decode())) for r in after) == sorted(str(i) for i in lead_ids)
    for partition in {r.partition for r in after}:  # in store order within each partition
        positions = [
            int(dict(r.headers)["x-notification-id"]) for r in after if r.partition == partition
        ]
        assert positions == sorted(positions)
    app.close()


async def test_relay_batches_land_where_send_would_put_them_in_order(settings: Settings) -> None:
    """The relay fills a record batch per partition itself (shared.bus.relay.send_batched): each
    message must land on the partition a plain `send` of its key picks, in the order given, also
    across several batches per partition."""
    run = uuid.uuid4().hex[:8]
    ours, plain = f"relay-batches-{run}", f"relay-plain-{run}"
    await create_topics(settings, [ours, plain])
    keys = [str(uuid.uuid4()).encode() for _ in range(40)]
    # 600 messages of 2 KB: more than one 256 KB batch for some partitions.
    messages = [
        Outbound(
            ours,
            keys[n % 40],
            json.dumps({"n": n, "pad": "x" * 2000}).encode(),
            (("x-n", str(n).encode()),),
        )
        for n in range(600)
    ]
    producer = make_producer(settings, linger_ms=0)
    await producer.start()
    try:
        outcomes = await send_batched(producer, messages)
        await asyncio.gather(*[await producer.send(plain, b"", key=k) for k in keys])
    finally:
        await producer.stop()
    assert not [o for o in outcomes if isinstance(o, BaseException)]
    bootstrap = settings.bootstrap_servers()
    batched = await read_topic(bootstrap, ours, lambda r: len(r) >= 600)
    sent = await read_topic(bootstrap, plain, lambda r: len(r) >= 40)
    where = {r.key: r.partition for r in sent}
    assert len(batched) == 600 and len(where) == 40
    assert len(set(where.values())) > 1  # the keys spread over partitions
    for record in batched:
        assert record.partition == where[record.key]
        assert dict(record.headers)["x-n"] == str(json.loads(record.value)["n"]).encode()
    for key in keys:  # each key's messages in the order given
        order = [json.loads(r.value)["n"] for r in sorted(batched, key=lambda r: r.offset)
                 if r.key == key]  # fmt: skip
        assert order == sorted(order) and len(order) == 15


async def test_relay_process_publishes_is_restarted_and_stops_with_the_service(
    settings: Settings,
    schema: str,
    open_pool,
    background,  # type: ignore[no-untyped-def]
) -> None:
    """The relay in a process of its own (as the services run it): it publishes what is stored;
    killed, it is started again and goes on from its position; stopped, its process is gone."""
    await open_pool(schema, MIGRATIONS)
    app = await asyncio.to_thread(CaptureApp, settings.dsn(), schema)
    first = {
        await asyncio.to_thread(app.capture_web_lead, web_lead(n), NOW, f"p-{n}") for n in range(3)
    }
    relay = RelayProcess(RelaySpec(f"proc-{schema}", CaptureApp, schema, route), settings, app)
    stop = background(relay.run)
    pick = mine(first)
    records = pick(
        await read_topic(
            settings.bootstrap_servers(), "lead.events.v1", lambda r: len(pick(r)) >= 3
        )
    )
    assert len(records) == 3
    assert await eventually(lambda: relay.lag(), lambda lag: lag == 0) == 0
    assert relay.leading and relay.published == 3

    killed = relay.pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    await eventually(_value(lambda: relay.restarts), lambda n: n >= 1)
    later = {
        await asyncio.to_thread(app.capture_web_lead, web_lead(n), NOW, f"p-{n}")
        for n in range(3, 5)
    }
    pick = mine(first | later)
    records = pick(
        await read_topic(
            settings.bootstrap_servers(), "lead.events.v1", lambda r: len(pick(r)) >= 5
        )
    )
    # From its recorded position: the first three once more at most, the two new ones surely.
    assert {uuid.UUID(r.key.decode()) for r in records} == first | later
    assert relay.pid not in (None, killed)

    child = relay.pid
    stop.set()
    await eventually(_value(lambda: relay.pid), lambda pid: pid is None)
    assert child is not None and not _alive(child)
    app.close()


class StallingRoute(CaptureRoute):
    """Capture's route, except that it never returns while the file `stall` exists: a relay
    stuck in a call, as one was once after PostgreSQL crashed (the relay process imports this
    class by reference; the path travels with the instance)."""

    def __init__(self, stall: Path) -> None:
        super().__init__()
        self.stall = stall

    def stored(self, notification: Notification) -> Sequence[Outbound] | None:
        while self.stall.exists():
            time.sleep(0.05)
        return super().stored(notification)


async def test_a_stuck_relay_process_exits_and_a_fresh_one_publishes(
    settings: Settings,
    schema: str,
    open_pool,
    background,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    await open_pool(schema, MIGRATIONS)
    app = await asyncio.to_thread(CaptureApp, settings.dsn(), schema)
    stall = tmp_path / "stall"
    spec = RelaySpec(f"stuck-{schema}", CaptureApp, schema, StallingRoute(stall))
    relay = RelayProcess(spec, settings.model_copy(update={"relay_stalled_s": 3.0}), app)
    stop = background(relay.run)
    await eventually(_value(lambda: relay.leading), bool)
    stall.touch()
    lead = await asyncio.to_thread(app.capture_web_lead, web_lead(0), NOW, "stuck-0")
    # Stuck routing the lead's page: the process gives up after 3 s and is started again.
    stuck = relay.pid
    assert await eventually(_value(lambda: relay.restarts), lambda n: n >= 1, within=30) >= 1
    await eventually(_value(lambda: relay.pid), lambda pid: pid not in (None, stuck))
    assert relay.published == 0
    stall.unlink()
    pick = mine({lead})
    records = await read_topic(settings.bootstrap_servers(), "lead.events.v1",
                               lambda r: len(pick(r)) >= 1)  # fmt: skip
    assert [uuid.UUID(r.key.decode()) for r in pick(records)] == [lead]
    stop.set()
    await eventually(_value(lambda: relay.pid), lambda pid: pid is None)
    app.close()


def _value(read):  # type: ignore[no-untyped-def]
    async def probe():  # type: ignore[no-untyped-def]
        return read()

    return probe


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped) counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"

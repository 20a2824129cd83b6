"""The event stores' recorder writes events by COPY (shared.store.recorder): a save of one event
or of many stores them in order, and a version someone stored first fails the whole save — what
every tracked consumer's exactly-once rests on. Saves wait for each other on the events table's
write lock (notification ids in commit order), and for nothing that VACUUM or ANALYZE holds."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import IntegrityError, Tracking

from services.pipeline.app import PipelineApp
from shared.settings import Settings
from shared.store.recorder import write_lock_name


class Note(Aggregate):
    @event("Written")
    def __init__(self, text: str) -> None:
        self.text = text

    @event("Edited")
    def edit(self, text: str) -> None:
        self.text = text


def edited(note: Note, times: int) -> Note:
    for n in range(times):
        note.edit(f"{note.text} {n} 北京")  # text beyond ASCII
    return note


@pytest.mark.parametrize("edits", [0, 2, 600])
async def test_a_save_inserted_or_copied_stores_its_events_in_order(
    pipeline_store: PipelineApp, edits: int
) -> None:
    before = Note("first")  # one event
    pipeline_store.record([before])
    note = edited(Note("second"), edits)  # edits + 1 events
    expected = [e.originator_version for e in note.pending_events]
    pipeline_store.record([note])
    stored = pipeline_store.notifications_after(0, 10_000)
    assert [n.originator_id for n in stored] == [before.id] + [note.id] * (edits + 1)
    assert [n.originator_version for n in stored[1:]] == expected
    ids = [n.id for n in stored]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    again = pipeline_store.repository.get(note.id)
    assert again.version == edits + 1 and again.text == note.text


@pytest.mark.parametrize("edits", [2, 600])
async def test_a_save_repeating_a_stored_version_fails_whole(
    pipeline_store: PipelineApp, edits: int
) -> None:
    note = edited(Note("kept"), 3)
    pipeline_store.record([note])
    stale = edited(pipeline_store.repository.get(note.id, version=2), edits)  # versions 3.. again
    fresh = Note("in the same save")
    with pytest.raises(IntegrityError):
        pipeline_store.record([fresh, stale])
    assert len(pipeline_store.notifications_after(0, 10_000)) == 4  # nothing of the failed save
    assert pipeline_store.repository.get(note.id).text == note.text
    assert pipeline_store.existing_ids([fresh.id]) == set()


async def test_a_save_records_several_upstream_positions_or_none(
    pipeline_store: PipelineApp,
) -> None:
    """A consumer's fetch of several partitions is one save: each partition's position goes
    with it, and one position that is not ahead fails the whole save."""
    pipeline_store.record([], [Tracking("up:p0", 5), Tracking("up:p1", 7)])
    assert pipeline_store.tracked_positions(["up:p0", "up:p1", "up:p2"]) == {
        "up:p0": 5,
        "up:p1": 7,
        "up:p2": 0,
    }
    lost = Note("in a save with a stale position")
    with pytest.raises(IntegrityError):  # p1 is not ahead: someone applied it first
        pipeline_store.record([lost], [Tracking("up:p2", 1), Tracking("up:p1", 7)])
    assert pipeline_store.tracked_positions(["up:p1", "up:p2"]) == {"up:p1": 7, "up:p2": 0}
    assert pipeline_store.existing_ids([lost.id]) == set()
    kept = Note("with positions ahead")
    pipeline_store.record([kept], [Tracking("up:p2", 1), Tracking("up:p1", 8)])
    assert pipeline_store.tracked_positions(["up:p1", "up:p2"]) == {"up:p1": 8, "up:p2": 1}
    assert pipeline_store.existing_ids([kept.id]) == {kept.id}
    assert pipeline_store.tracked_position("up:p0") == 5


async def test_the_librarys_own_tracking_goes_the_same_way(pipeline_store: PipelineApp) -> None:
    """A position passed the library's way (`tracking=`) is recorded by the same statement as
    a consumer's, with them, and a stale one fails the save the same way."""
    recorder = pipeline_store.process_recorder
    recorder.insert_events([], tracking=Tracking("lib:p0", 3), trackings=[Tracking("up:p0", 2)])
    assert pipeline_store.tracked_positions(["lib:p0", "up:p0"]) == {"lib:p0": 3, "up:p0": 2}
    with pytest.raises(IntegrityError):
        recorder.insert_events([], tracking=Tracking("lib:p0", 3), trackings=[Tracking("up:p0", 5)])
    assert pipeline_store.tracked_positions(["lib:p0", "up:p0"]) == {"lib:p0": 3, "up:p0": 2}


def events_table(store: PipelineApp) -> str:
    return f"{store.schema}.{store.process_recorder.events_table_name}"


async def test_a_save_goes_on_while_vacuum_or_analyze_holds_the_events_table(
    pipeline_store: PipelineApp, settings: Settings
) -> None:
    """VACUUM and ANALYZE (autovacuum's too) hold SHARE UPDATE EXCLUSIVE on a table while they
    run. The library's EXCLUSIVE table lock waited for it: each autovacuum of an events table
    stopped every save of its service until PostgreSQL cancelled the vacuum."""
    vacuum = await asyncpg.connect(settings.dsn())
    try:
        async with vacuum.transaction():
            await vacuum.execute(
                f"LOCK TABLE {events_table(pipeline_store)} IN SHARE UPDATE EXCLUSIVE MODE"
            )
            note = Note("saved while the table is being vacuumed")
            # The recorder's lock timeout is 10 s (then retried): a save waiting on the table
            # would still be waiting when this gives up.
            await asyncio.wait_for(asyncio.to_thread(pipeline_store.record, [note]), 5)
            assert pipeline_store.existing_ids([note.id]) == {note.id}
    finally:
        await vacuum.close()


async def test_saves_wait_for_the_events_tables_write_lock(
    pipeline_store: PipelineApp, settings: Settings
) -> None:
    """A save takes the write lock before it draws notification ids, and holds it until it
    commits: one that finds the lock held waits, with no id drawn, until it has it."""
    holder = await asyncpg.connect(settings.dsn())
    recorder = pipeline_store.process_recorder
    name = write_lock_name(pipeline_store.schema, recorder.events_table_name)
    ids = f"{events_table(pipeline_store)}_notification_id_seq"
    drawn = f"SELECT last_value, is_called FROM {ids}"
    saving: asyncio.Future[None] | None = None
    try:
        key = await holder.fetchval("SELECT hashtextextended($1, 0)", name)
        before = await holder.fetchrow(drawn)
        holding = holder.transaction()
        await holding.start()
        await holder.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", name)
        note = Note("saved after the holder commits")
        saving = asyncio.ensure_future(asyncio.to_thread(pipeline_store.record, [note]))
        waiting = 0
        for _ in range(200):  # until the save's backend waits on the lock (at most 10 s)
            waiting = await holder.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND classid::int8 = $1 AND objid::int8 = $2 AND objsubid = 1",
                (key >> 32) & 0xFFFFFFFF,
                key & 0xFFFFFFFF,
            )  # a bigint key's halves, as pg_locks shows them
            if waiting:
                break
            await asyncio.sleep(0.05)
        assert waiting == 1 and not saving.done()
        assert await holder.fetchrow(drawn) == before  # the waiting save drew no id
        await holding.commit()
        await asyncio.wait_for(saving, 10)
        assert [n.originator_id for n in pipeline_store.notifications_after(0, 10)] == [note.id]
    finally:
        await holder.close()  # lets go of the lock, if a check failed while it was held
        if saving is not None:
            await asyncio.wait_for(saving, 30)

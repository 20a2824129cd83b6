"""The event stores' recorder writes a small save by INSERT and a batch by COPY
(shared.store.recorder): both store the same events, in order, and a version someone stored
first fails the whole save either way — what every tracked consumer's exactly-once rests on."""

from __future__ import annotations

import asyncio

import pytest
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import IntegrityError

from services.pipeline.app import MIGRATIONS, PipelineApp
from shared.settings import Settings
from shared.store.recorder import COPY_FROM


class Note(Aggregate):
    @event("Written")
    def __init__(self, text: str) -> None:
        self.text = text

    @event("Edited")
    def edit(self, text: str) -> None:
        self.text = text


def edited(note: Note, times: int) -> Note:
    for n in range(times):
        note.edit(f"{note.text} {n} 北京")  # text beyond ASCII, through both paths
    return note


@pytest.mark.parametrize("edits", [0, COPY_FROM - 2, COPY_FROM - 1, 3 * COPY_FROM])
async def test_a_save_inserted_or_copied_stores_its_events_in_order(
    settings: Settings,
    schema: str,
    open_pool,
    edits: int,  # type: ignore[no-untyped-def]
) -> None:
    await open_pool(schema, MIGRATIONS)
    app = await asyncio.to_thread(PipelineApp, settings.dsn(), schema)
    try:
        before = Note("first")  # one event: inserted
        app.record([before])
        note = edited(Note("second"), edits)  # edits + 1 events: copied from COPY_FROM on
        expected = [e.originator_version for e in note.pending_events]
        app.record([note])
        stored = app.notifications_after(0, 10_000)
        assert [n.originator_id for n in stored] == [before.id] + [note.id] * (edits + 1)
        assert [n.originator_version for n in stored[1:]] == expected
        ids = [n.id for n in stored]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        again = app.repository.get(note.id)
        assert again.version == edits + 1 and again.text == note.text
    finally:
        app.close()


@pytest.mark.parametrize("edits", [2, 2 * COPY_FROM])
async def test_a_save_repeating_a_stored_version_fails_whole(
    settings: Settings,
    schema: str,
    open_pool,
    edits: int,  # type: ignore[no-untyped-def]
) -> None:
    await open_pool(schema, MIGRATIONS)
    app = await asyncio.to_thread(PipelineApp, settings.dsn(), schema)
    try:
        note = edited(Note("kept"), 3)
        app.record([note])
        stale = edited(app.repository.get(note.id, version=2), edits)  # versions 3.. again
        fresh = Note("in the same save")
        with pytest.raises(IntegrityError):
            app.record([fresh, stale])
        assert len(app.notifications_after(0, 10_000)) == 4  # nothing of the failed save
        assert app.repository.get(note.id).text == note.text
        assert app.existing_ids([fresh.id]) == set()
    finally:
        app.close()

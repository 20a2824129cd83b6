"""The event stores' recorder writes events by COPY (shared.store.recorder): a save of one event
or of many stores them in order, and a version someone stored first fails the whole save — what
every tracked consumer's exactly-once rests on."""

from __future__ import annotations

import pytest
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import IntegrityError, Tracking

from services.pipeline.app import PipelineApp


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

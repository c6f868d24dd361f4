"""Webhook events survive in SQLite and read back as a cursor for the trainer."""

from __future__ import annotations

from pathlib import Path

from core.events import ANNOTATION_ACTIONS, EventStore
from core.settings import Settings

ANNOTATION = {
    "action": "ANNOTATION_CREATED",
    "project": {"id": 7, "title": "parts"},
    "task": {"id": 42, "data": {"image": "/data/upload/7/a.png"}},
    "annotation": {"id": 5, "task": 42, "result": []},
}


def test_events_are_durable_and_read_in_order(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite"
    first = EventStore(path).append(ANNOTATION)
    second = EventStore(path).append({"action": "PROJECT_UPDATED", "project": {"id": 7}})
    third = EventStore(path).append({"action": "ANNOTATIONS_DELETED", "project": "7.1700000000"})
    store = EventStore(path)  # a fresh reader, as the trainer process would open it
    assert [e.id for e in store.since()] == [first.id, second.id, third.id]
    assert store.last_id() == third.id
    event = store.since()[0]
    assert (event.action, event.project_id, event.task_id) == ("ANNOTATION_CREATED", 7, 42)
    assert event.payload == ANNOTATION
    assert event.received_at.tzinfo is not None
    assert [e.id for e in store.since(first.id)] == [second.id, third.id]
    assert [e.action for e in store.since(actions=ANNOTATION_ACTIONS)] == ["ANNOTATION_CREATED", "ANNOTATIONS_DELETED"]
    assert store.since(third.id) == [] and store.since(actions=[]) == []
    assert [e.project_id for e in store.since(limit=3)] == [7, 7, 7]
    assert len(store.since(limit=1)) == 1


def test_task_id_falls_back_to_the_annotation(tmp_path: Path) -> None:
    event = EventStore(tmp_path / "e.sqlite").append({"action": "ANNOTATION_UPDATED", "annotation": {"task": 9}})
    assert (event.project_id, event.task_id) == (None, 9)


def test_empty_store_and_settings_path(tmp_path: Path) -> None:
    store = EventStore.for_settings(Settings(state_dir=tmp_path / "state"))
    assert store.path == tmp_path / "state" / "bridge" / "events.sqlite"
    assert not store.path.exists()  # nothing is created before the first use
    assert store.last_id() == 0 and store.since() == []

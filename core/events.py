"""Label Studio webhook events, kept durably in SQLite for the trainer (the bridge never trains).

The bridge appends every event it acknowledges; a 201 means the row is committed (WAL,
``synchronous=FULL``). Rows are never changed or deleted and ids only grow, so an id is a cursor.

Read API for the trainer::

    store = EventStore.for_settings(settings)      # <state_dir>/bridge/events.sqlite
    for event in store.since(last_id, actions=ANNOTATION_ACTIONS):
        event.id, event.action, event.project_id, event.task_id, event.received_at, event.payload
    last_id = store.last_id()

``payload`` is the JSON body exactly as Label Studio sent it (``action``, ``project``, ``task``,
``annotation``, ...). ``project_id`` / ``task_id`` are pulled out of it when present.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.settings import Settings

__all__ = ["ANNOTATION_ACTIONS", "EventStore", "StoredEvent"]

ANNOTATION_ACTIONS = frozenset(
    {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING"}
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    action TEXT NOT NULL,
    project_id INTEGER,
    task_id INTEGER,
    received_at TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_action ON events (action, id);
"""


@dataclass(frozen=True)
class StoredEvent:
    """One acknowledged webhook call."""

    id: int
    action: str
    project_id: int | None
    task_id: int | None
    received_at: datetime
    payload: dict[str, Any]


def _id_of(value: Any) -> int | None:
    """An id from ``{"id": 3}``, ``3`` or Label Studio's ``"3.1700000000"`` project uid."""
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.split(".", 1)[0].isdigit():
        return int(value.split(".", 1)[0])
    return None


class EventStore:
    """Append-only event log in one SQLite file; safe to use from several threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_settings(cls, settings: Settings) -> EventStore:
        return cls(settings.state_dir / "bridge" / "events.sqlite")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.path, timeout=30.0)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            with conn:
                yield conn

    def append(self, payload: Mapping[str, Any]) -> StoredEvent:
        """Store one webhook body (it must carry ``action``); returns it with its id."""
        action = str(payload["action"])
        task = payload.get("task")
        if task is None and isinstance(payload.get("annotation"), Mapping):
            task = payload["annotation"].get("task")
        event = StoredEvent(
            id=0,
            action=action,
            project_id=_id_of(payload.get("project")),
            task_id=_id_of(task),
            received_at=datetime.now(timezone.utc),
            payload=dict(payload),
        )
        with self._connect() as conn:
            cursor = conn.execute(
                "INSERT INTO events (action, project_id, task_id, received_at, payload) VALUES (?, ?, ?, ?, ?)",
                (
                    event.action,
                    event.project_id,
                    event.task_id,
                    event.received_at.isoformat(),
                    json.dumps(event.payload, separators=(",", ":")),
                ),
            )
            new_id = int(cursor.lastrowid or 0)
        return replace(event, id=new_id)

    def since(
        self, after_id: int = 0, *, actions: Collection[str] | None = None, limit: int | None = None
    ) -> list[StoredEvent]:
        """Events with an id above ``after_id``, oldest first, optionally only some actions."""
        query = "SELECT id, action, project_id, task_id, received_at, payload FROM events WHERE id > ?"
        args: list[Any] = [after_id]
        if actions is not None:
            if not actions:
                return []
            query += f" AND action IN ({','.join('?' * len(actions))})"
            args += sorted(actions)
        query += " ORDER BY id"
        if limit is not None:
            query += " LIMIT ?"
            args.append(limit)
        with self._connect() as conn:
            rows = conn.execute(query, args).fetchall()
        return [
            StoredEvent(
                id=row[0],
                action=row[1],
                project_id=row[2],
                task_id=row[3],
                received_at=datetime.fromisoformat(row[4]),
                payload=json.loads(row[5]),
            )
            for row in rows
        ]

    def last_id(self) -> int:
        """The newest event id, 0 when there is none."""
        with self._connect() as conn:
            row = conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()
        return int(row[0])

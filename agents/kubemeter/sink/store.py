"""The local billing API's storage: accepted events, deduplicated per API, and usage queries."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubemeter.output.sqlite_worker import SqliteWorker, open_connection

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    api TEXT NOT NULL,            -- openmeter | flexprice | lago | cloudevents
    dedup_key TEXT NOT NULL,      -- what that API deduplicates on
    event_id TEXT NOT NULL,
    source TEXT NOT NULL,
    subject TEXT NOT NULL,        -- customer (OpenMeter subject, Flexprice customer, Lago subscription)
    type TEXT NOT NULL,           -- event type / event name / billable metric code
    time TEXT NOT NULL,
    time_s REAL NOT NULL,
    value REAL,
    dimensions TEXT NOT NULL,     -- JSON object: every other data/properties key
    received_at_s REAL NOT NULL,
    PRIMARY KEY (api, dedup_key)
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class BilledEvent:
    """One event in the API-neutral form the store keeps."""

    api: str
    dedup_key: str
    event_id: str
    source: str
    subject: str
    type: str
    time: str
    time_s: float
    value: float | None
    dimensions: dict[str, Any]


class UsageStore:
    def __init__(self, worker: SqliteWorker) -> None:
        self._worker = worker

    @classmethod
    async def open(cls, path: Path) -> UsageStore:
        # synchronous=NORMAL: the emulator must survive being killed, not a power cut.
        connection = open_connection(path, synchronous="NORMAL")
        connection.executescript(SCHEMA)
        return cls(SqliteWorker(connection, name=f"sink:{path.name}"))

    async def close(self) -> None:
        self._worker.close()

    async def add(self, events: Sequence[BilledEvent]) -> int:
        """Insert all, ignoring ones already stored; returns how many were duplicates."""
        rows = [_row(event) for event in events]

        def insert(connection: sqlite3.Connection) -> int:
            cursor = connection.executemany(f"INSERT OR IGNORE INTO events VALUES ({_MARKS})", rows)
            duplicates = len(rows) - cursor.rowcount
            _bump(connection, "duplicate_events", duplicates)
            return duplicates

        return await self._worker.write(insert)

    async def add_unless_stored(self, events: Sequence[BilledEvent]) -> list[int]:
        """Lago semantics: if any event's key is already stored, store nothing and return the
        indices of those events; duplicates inside the request are ignored."""
        rows = [_row(event) for event in events]

        def insert(connection: sqlite3.Connection) -> list[int]:
            stored = []
            for index, event in enumerate(events):
                found = connection.execute(
                    "SELECT 1 FROM events WHERE api = ? AND dedup_key = ?", (event.api, event.dedup_key)
                ).fetchone()
                if found:
                    stored.append(index)
            if stored:
                _bump(connection, "duplicate_events", len(stored))
                return stored
            cursor = connection.executemany(f"INSERT OR IGNORE INTO events VALUES ({_MARKS})", rows)
            _bump(connection, "duplicate_events", len(rows) - cursor.rowcount)
            return []

        return await self._worker.write(insert)

    async def bump(self, name: str, by: int = 1) -> None:
        await self._worker.write(lambda connection: _bump(connection, name, by))

    async def counters(self) -> dict[str, int]:
        def read(connection: sqlite3.Connection) -> dict[str, int]:
            values = dict(connection.execute("SELECT name, value FROM counters").fetchall())
            (stored,) = connection.execute("SELECT COUNT(*) FROM events").fetchone()
            (distinct_ids,) = connection.execute(
                "SELECT COUNT(*) FROM (SELECT DISTINCT source, event_id FROM events)"
            ).fetchone()
            values.update(stored_events=stored, distinct_event_ids=distinct_ids)
            return values

        return await self._worker.read(read)

    async def events(self, *, api: str | None, limit: int) -> list[dict[str, Any]]:
        def read(connection: sqlite3.Connection) -> list[dict[str, Any]]:
            where, parameters = ("WHERE api = ?", [api]) if api else ("", [])
            rows = connection.execute(
                "SELECT api, event_id, source, subject, type, time, value, dimensions FROM events "
                f"{where} ORDER BY time_s, event_id LIMIT ?",
                (*parameters, limit),
            ).fetchall()
            return [
                {
                    "api": row[0],
                    "eventId": row[1],
                    "source": row[2],
                    "subject": row[3],
                    "type": row[4],
                    "time": row[5],
                    "value": row[6],
                    "dimensions": json.loads(row[7]),
                }
                for row in rows
            ]

        return await self._worker.read(read)

    async def usage(
        self,
        *,
        subject: str | None,
        event_type: str | None,
        api: str | None,
        from_s: float | None,
        to_s: float | None,
        window_s: float | None,
        group_by: Sequence[str],
    ) -> list[dict[str, Any]]:
        """Sum of ``value`` and count of events per (subject, type, window, dimensions)."""
        clauses: list[str] = []
        parameters: list[Any] = []
        for column, value in (("subject", subject), ("type", event_type), ("api", api)):
            if value is not None:
                clauses.append(f"{column} = ?")
                parameters.append(value)
        if from_s is not None:
            clauses.append("time_s >= ?")
            parameters.append(from_s)
        if to_s is not None:
            clauses.append("time_s < ?")
            parameters.append(to_s)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""

        def read(connection: sqlite3.Connection) -> list[Any]:
            return connection.execute(
                f"SELECT subject, type, time_s, value, dimensions FROM events {where}", parameters
            ).fetchall()

        rows = await self._worker.read(read)
        buckets: dict[tuple[Any, ...], dict[str, Any]] = {}
        for row_subject, row_type, time_s, value, dimensions_json in rows:
            dimensions = json.loads(dimensions_json)
            window_start = None if not window_s else time_s - (time_s % window_s)
            grouped = {name: dimensions.get(name) for name in group_by}
            key = (row_subject, row_type, window_start, json.dumps(grouped, sort_keys=True))
            bucket = buckets.setdefault(
                key,
                {
                    "subject": row_subject,
                    "type": row_type,
                    "windowStart": window_start,
                    "windowEnd": None if window_start is None else window_start + (window_s or 0),
                    "groupBy": grouped,
                    "value": 0.0,
                    "events": 0,
                },
            )
            bucket["value"] += value or 0.0
            bucket["events"] += 1
        return sorted(buckets.values(), key=lambda b: (b["subject"], b["type"], b["windowStart"] or 0))


_MARKS = ",".join("?" * 11)


def _row(event: BilledEvent) -> tuple[Any, ...]:
    return (
        event.api,
        event.dedup_key,
        event.event_id,
        event.source,
        event.subject,
        event.type,
        event.time,
        event.time_s,
        event.value,
        json.dumps(event.dimensions, sort_keys=True),
        time.time(),
    )


def _bump(connection: sqlite3.Connection, name: str, by: int) -> None:
    if by:
        connection.execute(
            "INSERT INTO counters VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

"""The durable event queue: SQLite on disk, fsync'd group commits, capped, with a dead-letter table.

Used twice with the same code: as the agent's spool on the node and as the gateway's buffer on the
PersistentVolume. ``enqueue`` returns only after the events are committed (``synchronous=FULL``);
rows leave the ``events`` table only when the billing API (or the gateway) acknowledged them, or
into ``dead_letters`` with the response that refused them.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from kubemeter.output import OutputFullError
from kubemeter.output.sqlite_worker import SqliteWorker, open_connection

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- delivery order; never reused, so leases only move on
    source TEXT NOT NULL,
    event_id TEXT NOT NULL,
    enqueued_at_s REAL NOT NULL,
    payload BLOB NOT NULL,            -- the CloudEvent, JSON
    UNIQUE (source, event_id)         -- the same event enqueued twice is stored once
);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    event_id TEXT NOT NULL,
    enqueued_at_s REAL NOT NULL,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    response TEXT NOT NULL,
    dead_lettered_at_s REAL NOT NULL,
    UNIQUE (source, event_id)
);
"""

# The highest bound-parameter count we put in one statement (SQLite allows 32766).
_MAX_PARAMETERS = 500
_SQLITE_FULL = 13
# After a checkpoint the WAL is cut back to this size, so a drained queue gives disk space back.
_WAL_SIZE_LIMIT_BYTES = 16 * 1024 * 1024


class WhenFull(StrEnum):
    """What a full buffer does: push back (the default, loses nothing) or drop the oldest events."""

    BLOCK = "Block"
    DROP_OLDEST = "DropOldest"


class QueueFullError(OutputFullError):
    """The queue is at its cap; nothing of this write was stored. Retry after ``retry_after_s``."""

    def __init__(self, reason: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class QueueLimits:
    """Caps on the queue. ``None`` means no cap of that kind."""

    max_bytes: int | None = None
    max_age_s: float | None = None
    when_full: WhenFull = WhenFull.BLOCK


@dataclass(frozen=True)
class QueueRecord:
    """One event as it is stored: its dedup key and its CloudEvent JSON."""

    source: str
    event_id: str
    payload: bytes


@dataclass(frozen=True)
class QueuedEvent:
    """A stored event handed to a consumer; ``seq`` is its place in delivery order."""

    seq: int
    source: str
    event_id: str
    payload: bytes
    enqueued_at_s: float


@dataclass(frozen=True)
class QueueStats:
    events: int
    payload_bytes: int
    oldest_age_s: float
    dropped_events_total: int
    dead_letters: int


@dataclass
class _Totals:
    events: int = 0
    payload_bytes: int = 0
    dropped_events: int = 0
    dead_letters: int = 0


class DurableQueue:
    """An on-disk FIFO of CloudEvents with group commit, caps and dead letters.

    Open with ``await DurableQueue.open(path, limits)``; one process owns a file at a time for
    consuming (``kubemeter dlq`` may change it alongside; the queue notices and recounts).
    """

    def __init__(self, path: Path, limits: QueueLimits, connection: sqlite3.Connection) -> None:
        self.path = path
        self.limits = limits
        self._committed = _Totals()
        self._pending = _Totals()
        self._oldest_enqueued_at_s: float | None = None
        self._pending_oldest: float | None = None
        self._pending_oldest_changed = False
        self._data_version = -1
        self._lease_cursor = 0
        self._enqueue_generation = 0  # bumped by every insert, so a lease never misses a wake-up
        self._lease_lock = asyncio.Lock()
        self._has_events = asyncio.Event()
        self._recount(connection)
        self._worker = SqliteWorker(
            connection,
            name=f"queue:{path.name}",
            idle=self._maintain,
            on_commit=self._apply_pending,
            on_rollback=self._discard_pending,
        )
        self._loop = asyncio.get_running_loop()
        if self._committed.events:
            self._has_events.set()

    @classmethod
    async def open(cls, path: Path, limits: QueueLimits | None = None) -> DurableQueue:
        def connect() -> sqlite3.Connection:
            connection = open_connection(path, synchronous="FULL")
            connection.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT_BYTES}")
            connection.executescript(SCHEMA)
            return connection

        try:
            connection = await asyncio.to_thread(connect)
        except sqlite3.Error as error:
            raise RuntimeError(
                f"cannot open the event queue at {path}: {error}; check that the volume is mounted "
                "and writable and that no other process is consuming this file"
            ) from error
        return cls(path, limits or QueueLimits(), connection)

    async def close(self) -> None:
        await asyncio.to_thread(self._worker.close)

    @property
    def accepting(self) -> bool:
        return self._worker.alive

    def stats(self) -> QueueStats:
        oldest = self._oldest_enqueued_at_s
        return QueueStats(
            events=self._committed.events,
            payload_bytes=self._committed.payload_bytes,
            oldest_age_s=0.0 if oldest is None else max(0.0, time.time() - oldest),
            dropped_events_total=self._committed.dropped_events,
            dead_letters=self._committed.dead_letters,
        )

    # -- producing ---------------------------------------------------------------------------

    async def enqueue(self, records: Sequence[QueueRecord]) -> int:
        """Store ``records`` (all or none) and return after the commit; the count newly stored.

        Raises :class:`QueueFullError` when the cap is reached and the policy is ``Block``, or when
        the volume itself is full.
        """
        if not records:
            return 0
        rows = [(r.source, r.event_id, r.payload) for r in records]
        need_bytes = sum(len(r.payload) for r in records)

        def insert(connection: sqlite3.Connection) -> int:
            self._make_room(connection, need_bytes)
            now_s = time.time()
            connection.execute("SAVEPOINT enqueue")
            cursor = connection.executemany(
                "INSERT OR IGNORE INTO events (source, event_id, enqueued_at_s, payload) VALUES (?, ?, ?, ?)",
                [(source, event_id, now_s, payload) for source, event_id, payload in rows],
            )
            if cursor.rowcount == len(rows):
                stored, stored_bytes = len(rows), need_bytes
            else:
                # Some were already queued (a retried request): redo row by row to count exactly.
                connection.execute("ROLLBACK TO enqueue")
                stored = stored_bytes = 0
                for source, event_id, payload in rows:
                    one = connection.execute(
                        "INSERT OR IGNORE INTO events (source, event_id, enqueued_at_s, payload) "
                        "VALUES (?, ?, ?, ?)",
                        (source, event_id, now_s, payload),
                    )
                    if one.rowcount:
                        stored += 1
                        stored_bytes += len(payload)
            connection.execute("RELEASE enqueue")
            self._enqueue_generation += 1
            self._pending.events += stored
            self._pending.payload_bytes += stored_bytes
            if stored and self._committed.events + self._pending.events == stored:
                self._set_pending_oldest(now_s)
            return stored

        try:
            stored = await self._worker.write(insert)
        except sqlite3.OperationalError as error:
            if getattr(error, "sqlite_errorcode", None) == _SQLITE_FULL:
                raise QueueFullError(
                    f"the volume holding {self.path} is full; events wait upstream until deliveries free "
                    "space (give the buffer a byte cap below the volume size to avoid this)",
                    retry_after_s=5.0,
                ) from error
            raise
        if stored:
            self._has_events.set()
        return stored

    def _make_room(self, connection: sqlite3.Connection, need_bytes: int) -> None:
        limits = self.limits
        held_bytes = self._committed.payload_bytes + self._pending.payload_bytes
        over_bytes = 0 if limits.max_bytes is None else held_bytes + need_bytes - limits.max_bytes
        too_old = self._oldest_is_too_old()
        if over_bytes <= 0 and not too_old:
            return
        if limits.when_full is WhenFull.BLOCK:
            if limits.max_bytes is not None and need_bytes > limits.max_bytes:
                raise QueueFullError(
                    f"this write is {need_bytes} bytes, more than the whole buffer cap "
                    f"({limits.max_bytes} bytes); send smaller batches or raise buffer.size"
                )
            if over_bytes > 0:
                raise QueueFullError(
                    f"the buffer holds {held_bytes} of its {limits.max_bytes} bytes; retry when the billing "
                    "API has drained it (or raise buffer.size)"
                )
            raise QueueFullError(
                f"the oldest buffered event is older than the retention of {limits.max_age_s:.0f} s; "
                "retry when the billing API has drained it (or raise buffer.retentionHours)"
            )
        self._drop_oldest(connection, need_bytes=max(over_bytes, 0))

    def _oldest_is_too_old(self) -> bool:
        if self.limits.max_age_s is None or self._oldest_enqueued_at_s is None:
            return False
        return time.time() - self._oldest_enqueued_at_s > self.limits.max_age_s

    def _drop_oldest(self, connection: sqlite3.Connection, *, need_bytes: int) -> None:
        """Policy DropOldest: delete from the head until ``need_bytes`` are free and nothing is
        older than the retention. Every dropped event is counted and logged."""
        cutoff_s = None if self.limits.max_age_s is None else time.time() - self.limits.max_age_s
        freed_bytes = 0
        dropped = 0
        while True:
            head = connection.execute(
                "SELECT seq, enqueued_at_s, length(payload) FROM events ORDER BY seq LIMIT ?",
                (_MAX_PARAMETERS,),
            ).fetchall()
            doomed: list[int] = []
            for seq, enqueued_at_s, size in head:
                old = cutoff_s is not None and enqueued_at_s < cutoff_s
                if freed_bytes >= need_bytes and not old:
                    break
                doomed.append(seq)
                freed_bytes += size
            if doomed:
                connection.execute("DELETE FROM events WHERE seq <= ?", (doomed[-1],))
                dropped += len(doomed)
            if not doomed or len(doomed) < len(head):
                break
        if dropped:
            log.warning(
                "buffer full (policy DropOldest): dropped the %d oldest events (%d bytes)",
                dropped,
                freed_bytes,
            )
        self._pending.events -= dropped
        self._pending.payload_bytes -= freed_bytes
        self._pending.dropped_events += dropped
        self._set_pending_oldest(self._head_enqueued_at(connection))

    # -- consuming ---------------------------------------------------------------------------

    async def wait_for_events(self, timeout_s: float | None = None) -> bool:
        """Wait until the queue may hold events not yet leased; False on timeout."""
        try:
            await asyncio.wait_for(self._has_events.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def lease(self, max_events: int) -> list[QueuedEvent]:
        """The next ``max_events`` events in order that no one in this process holds yet.

        Leases live in memory: a process that dies leaves its events in the queue, and the next one
        delivers them again (the billing API deduplicates on the event id).
        """
        async with self._lease_lock:
            cursor = self._lease_cursor

            def select(connection: sqlite3.Connection) -> tuple[int, list[QueuedEvent]]:
                generation = self._enqueue_generation
                rows = connection.execute(
                    "SELECT seq, source, event_id, payload, enqueued_at_s FROM events "
                    "WHERE seq > ? ORDER BY seq LIMIT ?",
                    (cursor, max_events),
                ).fetchall()
                return generation, [QueuedEvent(*row) for row in rows]

            generation, events = await self._worker.read(select)
            if events:
                self._lease_cursor = events[-1].seq
            if len(events) < max_events and generation == self._enqueue_generation:
                self._has_events.clear()
            return events

    def rewind(self) -> None:
        """Forget every lease: the next lease starts again from the oldest stored event."""
        self._lease_cursor = 0
        self._has_events.set()

    async def ack(self, events: Sequence[QueuedEvent]) -> int:
        """Delete delivered events; returns after the commit."""
        seqs = [event.seq for event in events]

        def delete(connection: sqlite3.Connection) -> int:
            removed, removed_bytes = _delete_by_seq(connection, "events", seqs)
            self._pending.events -= removed
            self._pending.payload_bytes -= removed_bytes
            self._set_pending_oldest(self._head_enqueued_at(connection))
            return removed

        return await self._worker.write(delete)

    async def dead_letter(self, events: Sequence[QueuedEvent], *, reason: str, response: str) -> None:
        """Move refused events into the dead-letter table with the reason and the API's response."""
        seqs = [event.seq for event in events]

        def move(connection: sqlite3.Connection) -> None:
            now_s = time.time()
            for chunk in _chunks(seqs):
                marks = ",".join("?" * len(chunk))
                connection.execute(
                    "INSERT OR REPLACE INTO dead_letters "
                    "(source, event_id, enqueued_at_s, payload, reason, response, dead_lettered_at_s) "
                    "SELECT source, event_id, enqueued_at_s, payload, ?, ?, ? FROM events "
                    f"WHERE seq IN ({marks})",
                    (reason, response, now_s, *chunk),
                )
            removed, removed_bytes = _delete_by_seq(connection, "events", seqs)
            self._pending.events -= removed
            self._pending.payload_bytes -= removed_bytes
            self._pending.dead_letters += removed
            self._set_pending_oldest(self._head_enqueued_at(connection))

        await self._worker.write(move)

    # -- bookkeeping (worker thread) ------------------------------------------------------------

    def _apply_pending(self) -> None:
        self._committed.events += self._pending.events
        self._committed.payload_bytes += self._pending.payload_bytes
        self._committed.dropped_events += self._pending.dropped_events
        self._committed.dead_letters += self._pending.dead_letters
        if self._pending_oldest_changed:
            self._oldest_enqueued_at_s = self._pending_oldest
        self._discard_pending()

    def _set_pending_oldest(self, enqueued_at_s: float | None) -> None:
        self._pending_oldest, self._pending_oldest_changed = enqueued_at_s, True

    def _discard_pending(self) -> None:
        self._pending = _Totals()
        self._pending_oldest, self._pending_oldest_changed = None, False

    @staticmethod
    def _head_enqueued_at(connection: sqlite3.Connection) -> float | None:
        row = connection.execute("SELECT enqueued_at_s FROM events ORDER BY seq LIMIT 1").fetchone()
        return None if row is None else float(row[0])

    def _recount(self, connection: sqlite3.Connection) -> None:
        events, payload_bytes = connection.execute(
            "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0) FROM events"
        ).fetchone()
        (dead_letters,) = connection.execute("SELECT COUNT(*) FROM dead_letters").fetchone()
        self._committed.events = int(events)
        self._committed.payload_bytes = int(payload_bytes)
        self._committed.dead_letters = int(dead_letters)
        self._oldest_enqueued_at_s = self._head_enqueued_at(connection)
        self._data_version = int(connection.execute("PRAGMA data_version").fetchone()[0])

    def _maintain(self, connection: sqlite3.Connection) -> None:
        # data_version changes only when ANOTHER connection commits (``kubemeter dlq replay``).
        version = int(connection.execute("PRAGMA data_version").fetchone()[0])
        if version != self._data_version:
            had_events = self._committed.events
            self._recount(connection)
            if self._committed.events > had_events:
                self._loop.call_soon_threadsafe(self._has_events.set)
        if self.limits.when_full is WhenFull.DROP_OLDEST and self._oldest_is_too_old():
            connection.execute("BEGIN IMMEDIATE")
            try:
                self._drop_oldest(connection, need_bytes=0)
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                self._discard_pending()
                raise
            self._apply_pending()


def _chunks(seqs: Sequence[int]) -> list[Sequence[int]]:
    return [seqs[start : start + _MAX_PARAMETERS] for start in range(0, len(seqs), _MAX_PARAMETERS)]


def _delete_by_seq(connection: sqlite3.Connection, table: str, seqs: Sequence[int]) -> tuple[int, int]:
    removed = removed_bytes = 0
    for chunk in _chunks(seqs):
        marks = ",".join("?" * len(chunk))
        sizes = connection.execute(
            f"DELETE FROM {table} WHERE seq IN ({marks}) RETURNING length(payload)", tuple(chunk)
        ).fetchall()
        removed += len(sizes)
        removed_bytes += sum(size for (size,) in sizes)
    return removed, removed_bytes

"""The durable event queue: SQLite on disk, fsync'd group commits, capped, with a dead-letter table.

Used twice with the same code: as the agent's spool on the node and as the gateway's buffer on the
PersistentVolume. ``enqueue`` returns only after the events are committed (``synchronous=FULL``);
rows leave the ``events`` table only when the billing API (or the gateway) acknowledged them, or
into ``dead_letters`` with the response that refused them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple, TypeVar

import msgspec

from kubemeter.output import OutputFullError
from kubemeter.output.sqlite_worker import RunAlone, SqliteWorker, open_connection

log = logging.getLogger(__name__)

T = TypeVar("T")
_Operation = Callable[[sqlite3.Connection], None]

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
_PAGE_BYTES = 4096
_VACUUM_MIN_PAGES = 256
_VACUUM_STEP_PAGES = 2048
_SMALL_TRANSACTION_EVENTS = 16


@dataclass(frozen=True)
class VolumeBudget:
    """Disk held back so a full volume can still drain.

    Deleting delivered rows writes to the WAL, so on a volume filled to the last byte even acks
    would fail. A reserve file is kept beside the queue and removed the moment an ack hits
    SQLITE_FULL; the WAL is checkpointed often enough (relative to the volume) that it never holds
    more than a small part of it.
    """

    reserve_bytes: int
    wal_checkpoint_pages: int

    @classmethod
    def for_volume(cls, directory: Path) -> VolumeBudget:
        volume = os.statvfs(directory)
        volume_bytes = volume.f_blocks * volume.f_frsize
        reserve_bytes = min(64 * 2**20, max(256 * 2**10, volume_bytes // 50))
        wal_checkpoint_pages = min(1000, max(16, volume_bytes // _PAGE_BYTES // 32))
        return cls(reserve_bytes, wal_checkpoint_pages)


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


class QueueRecord(NamedTuple):
    """One event as it is stored: its dedup key and its CloudEvent JSON.

    A tuple, because ingest builds one per event on the hot path."""

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
    commits_total: int = 0  # transactions committed (one fsync each): events / commits is the grouping


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

    def __init__(
        self, path: Path, limits: QueueLimits, connection: sqlite3.Connection, budget: VolumeBudget
    ) -> None:
        self.path = path
        self.limits = limits
        self.budget = budget
        self._reserve_path = path.with_name(path.name + ".reserve")
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
        # Bytes of the last batch refused under Block for want of room (0 once a batch is stored):
        # the buffer is full for that sender before it reaches the cap (the gateway's readiness).
        self.refused_batch_bytes = 0
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
        def connect() -> tuple[sqlite3.Connection, VolumeBudget]:
            path.parent.mkdir(parents=True, exist_ok=True)
            budget = VolumeBudget.for_volume(path.parent)
            # incremental vacuum lets maintenance hand freed pages back to the volume.
            connection = open_connection(path, synchronous="FULL", incremental_vacuum=True)
            connection.execute(f"PRAGMA wal_autocheckpoint={budget.wal_checkpoint_pages}")
            # After a checkpoint the WAL is cut back, so a drained queue gives the disk back.
            connection.execute(f"PRAGMA journal_size_limit={2 * budget.wal_checkpoint_pages * _PAGE_BYTES}")
            connection.executescript(SCHEMA)
            return connection, budget

        try:
            connection, budget = await asyncio.to_thread(connect)
        except sqlite3.Error as error:
            raise RuntimeError(
                f"cannot open the event queue at {path}: {error}; check that the volume is mounted "
                "and writable and that no other process is consuming this file"
            ) from error
        queue = cls(path, limits or QueueLimits(), connection, budget)
        await asyncio.to_thread(queue._keep_reserve)
        return queue

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
            commits_total=self._worker.commits_total,
        )

    # -- producing ---------------------------------------------------------------------------

    async def enqueue(self, records: Sequence[QueueRecord]) -> int:
        """Store ``records`` (all or none) and return after the commit; the count newly stored.

        Raises :class:`QueueFullError` when the cap is reached and the policy is ``Block``, or when
        the volume itself is full.
        """
        if not records:
            return 0
        rows = records
        # Built here, on the caller's side, so the SQLite thread holds the GIL as little as it can.
        payloads, index = _bulk_rows(records)
        need_bytes = len(payloads)

        exact = False  # set when the batch held events already queued; then counted row by row

        def insert(connection: sqlite3.Connection) -> int:
            nonlocal exact
            self._make_room(connection, need_bytes)
            now_s = time.time()
            if not exact:
                # One statement for the whole batch: executemany would run a statement per row and
                # take the GIL back after each, waiting on the HTTP thread every time.
                cursor = connection.execute(_BULK_INSERT, (now_s, payloads, index))
                if cursor.rowcount != len(rows):
                    # Some were already queued (a retried request). Undo and count exactly, alone:
                    # a savepoint per batch would cost every batch two more statements.
                    exact = True
                    raise RunAlone
                stored, stored_bytes = len(rows), need_bytes
            else:
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
        self.refused_batch_bytes = 0
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
                self.refused_batch_bytes = need_bytes
                raise QueueFullError(
                    f"the queue at {self.path} holds {held_bytes} of its {limits.max_bytes} bytes; retry "
                    "when deliveries have drained it (or raise the cap: buffer.size on the gateway)"
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

    async def ack(self, events: Sequence[QueuedEvent]) -> None:
        """Delete delivered events; returns after the commit."""

        def delete(seqs: Sequence[int]) -> Callable[[sqlite3.Connection], None]:
            def operation(connection: sqlite3.Connection) -> None:
                removed, removed_bytes = _delete_by_seq(connection, "events", seqs)
                self._pending.events -= removed
                self._pending.payload_bytes -= removed_bytes
                self._set_pending_oldest(self._head_enqueued_at(connection))

            return operation

        await self._write_freeing_space([event.seq for event in events], delete)

    async def dead_letter(self, events: Sequence[QueuedEvent], *, reason: str, response: str) -> None:
        """Move refused events into the dead-letter table with the reason and the API's response."""

        def move(seqs: Sequence[int]) -> Callable[[sqlite3.Connection], None]:
            def operation(connection: sqlite3.Connection) -> None:
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

            return operation

        await self._write_freeing_space([event.seq for event in events], move)

    async def _write_freeing_space(
        self,
        seqs: Sequence[int],
        operation_for: Callable[[Sequence[int]], Callable[[sqlite3.Connection], None]],
    ) -> None:
        """Run a write that frees space (ack, dead-letter). On a full volume, give up the reserve and
        go on in small transactions: each needs only a few WAL pages, and the checkpoints between
        them let the WAL be reused, so delivery can always make room."""
        try:
            await self._worker.write(operation_for(seqs))
            return
        except sqlite3.OperationalError as error:
            if getattr(error, "sqlite_errorcode", None) != _SQLITE_FULL:
                raise
        if self._reserve_path.exists():
            log.warning(
                "the volume is full; releasing the %d-byte reserve so deliveries can free space",
                self.budget.reserve_bytes,
            )
            self._reserve_path.unlink(missing_ok=True)
        for start in range(0, len(seqs), _SMALL_TRANSACTION_EVENTS):
            await self._worker.write(operation_for(seqs[start : start + _SMALL_TRANSACTION_EVENTS]))

    def _keep_reserve(self) -> None:
        """Create the reserve file when it is missing and the volume has room for it again."""
        if self._reserve_path.exists():
            return
        free_bytes = shutil.disk_usage(self._reserve_path.parent).free
        if free_bytes < 4 * self.budget.reserve_bytes:
            return
        try:
            with self._reserve_path.open("wb") as reserve:
                chunk = b"\0" * (1 << 16)
                for _ in range(0, self.budget.reserve_bytes, len(chunk)):
                    reserve.write(chunk)
                reserve.flush()
                os.fsync(reserve.fileno())
        except OSError as error:
            log.warning("cannot keep the %s reserve: %s", self._reserve_path, error)
            with contextlib.suppress(OSError):
                self._reserve_path.unlink()

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
        (free_pages,) = connection.execute("PRAGMA freelist_count").fetchone()
        if free_pages >= _VACUUM_MIN_PAGES:
            # Delivered rows leave free pages; give them back so the volume (and the reserve) recover.
            # The file shrinks only when the WAL is checkpointed, so do that now rather than waiting for
            # a write that a full volume would refuse.
            connection.execute(f"PRAGMA incremental_vacuum({_VACUUM_STEP_PAGES})").fetchall()
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        self._keep_reserve()
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


# Rows from two parameters: every payload in one blob, and a JSON array of [source, event_id,
# offset, length] (offsets 1-based, as substr counts). SQLite splits them in C, in one step.
_BULK_INSERT = (
    "INSERT OR IGNORE INTO events (source, event_id, enqueued_at_s, payload) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), ?1, "
    "substr(?2, json_extract(value, '$[2]'), json_extract(value, '$[3]')) FROM json_each(?3)"
)
_encode_json = msgspec.json.Encoder().encode


def _bulk_rows(records: Sequence[QueueRecord]) -> tuple[bytes, str]:
    """The two parameters of :data:`_BULK_INSERT` for ``records``."""
    lengths = [len(payload) for _, _, payload in records]
    offsets = itertools.accumulate(lengths, initial=1)
    index = [
        (source, event_id, offset, length)
        for (source, event_id, _), offset, length in zip(records, offsets, lengths, strict=False)
    ]
    return b"".join([payload for _, _, payload in records]), _encode_json(index).decode()


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

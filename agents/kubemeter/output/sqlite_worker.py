"""One SQLite connection owned by one thread, with group commit.

sqlite3 blocks, so it is wrapped once here: coroutines submit operations, the worker thread runs
every operation that is waiting in ONE transaction and commits once, so a single fsync covers all
concurrent writers. Each caller's future resolves only after that commit.

If the thread dies (a bug, an error outside any operation), every waiting caller and every later
one gets :class:`SqliteWorkerDied` instead of a future that never resolves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

Operation = Callable[[sqlite3.Connection], Any]

# How long the worker waits for work before running its idle hook (age caps, gauges).
_IDLE_TICK_S = 0.5


@dataclass
class _Job:
    operation: Operation
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    write: bool


def open_connection(
    path: Path, *, synchronous: str = "FULL", incremental_vacuum: bool = False
) -> sqlite3.Connection:
    """A connection in WAL mode; autocommit off at the driver level (we issue BEGIN ourselves).

    ``incremental_vacuum`` applies to a new file only (it must be set before anything is written).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    if incremental_vacuum:
        connection.execute("PRAGMA auto_vacuum=INCREMENTAL")
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute(f"PRAGMA synchronous={synchronous}")
    # Temporary tables and indices (an IN list of 500 seqs in an ack) in memory: the pods' root
    # filesystem is read-only with no /tmp, where SQLite's temp files failed every ack with "disk I/O
    # error" on real-0, so the gateway resent delivered batches and never drained.
    connection.execute("PRAGMA temp_store=MEMORY")
    return connection


class SqliteWorkerDied(RuntimeError):
    """The worker thread stopped on an unexpected error; nothing submitted to it will run."""


class RunAlone(Exception):
    """Raised by a write operation that needs a transaction of its own (e.g. to count exactly what
    it stored): the group is rolled back and every operation of it runs again, each alone."""


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class SqliteWorker:
    """Runs operations on one connection in one thread; write operations are group-committed.

    ``idle`` (optional) runs inside the worker thread when there is no work and at least every half
    second under load, outside any transaction; it gets the connection and opens its own
    transaction if it writes.
    ``on_commit`` and ``on_rollback`` run in the worker thread after each transaction, so in-memory
    bookkeeping done by operations is made final or undone together with the data.
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        *,
        name: str,
        idle: Callable[[sqlite3.Connection], None] | None = None,
        on_commit: Callable[[], None] | None = None,
        on_rollback: Callable[[], None] | None = None,
    ) -> None:
        self._connection = connection
        self._idle = idle
        self._on_commit = on_commit or (lambda: None)
        self._on_rollback = on_rollback or (lambda: None)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._died: BaseException | None = None
        self._in_flight: list[_Job] = []  # the group being run, failed together if the thread dies
        self._submit_lock = threading.Lock()  # a job is queued before death is declared, or refused
        self.commits_total = 0  # transactions committed; one fsync each with synchronous=FULL
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed and self._died is None

    async def write(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``operation`` inside a group transaction; returns after the commit."""
        return await self._submit(operation, write=True)

    async def read(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``operation`` outside any transaction (a consistent WAL snapshot per statement)."""
        return await self._submit(operation, write=False)

    async def _submit(self, operation: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        if self._closed:
            raise RuntimeError("the SQLite worker is closed; open the queue again")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._submit_lock:
            if self._died is not None:
                raise SqliteWorkerDied(f"the SQLite worker thread died: {self._died!r}") from self._died
            self._jobs.put(_Job(operation, future, loop, write))
        return await future

    def close(self) -> None:
        """Finish queued work, then stop the thread and close the connection."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self._thread.join()
        self._connection.close()

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as error:
            log.exception("SQLite worker %s died; failing its callers", self._thread.name)
            with self._submit_lock:
                self._died = error
            died = SqliteWorkerDied(f"the SQLite worker thread died: {error!r}")
            died.__cause__ = error
            for job in self._in_flight:
                self._call_soon(job, None, died)
            while True:
                try:
                    queued = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if queued is not None:
                    self._call_soon(queued, None, died)

    def _serve(self) -> None:
        stopping = False
        idle_due_s = 0.0
        while not stopping:
            try:
                first = self._jobs.get(timeout=_IDLE_TICK_S)
            except queue.Empty:
                self._run_idle()
                idle_due_s = time.monotonic() + _IDLE_TICK_S
                continue
            group: list[_Job] = []
            if first is None:
                stopping = True
            else:
                group.append(first)
            # Everything that queued up while we were fsyncing rides in this group.
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    continue
                group.append(job)
            self._in_flight = group
            self._run_group(group)
            self._in_flight = []
            # Between groups only when due: under load its statements would delay every commit.
            if time.monotonic() >= idle_due_s or stopping:
                self._run_idle()
                idle_due_s = time.monotonic() + _IDLE_TICK_S

    def _run_group(self, group: list[_Job]) -> None:
        for job in group:
            if not job.write:
                self._run_alone(job, transaction=False)
        writes = [job for job in group if job.write]
        if not writes:
            return
        if len(writes) == 1:
            self._run_alone(writes[0], transaction=True)
            return
        results: list[Any] = []
        try:
            self._connection.execute("BEGIN IMMEDIATE")
            for job in writes:
                results.append(job.operation(self._connection))
            self._connection.execute("COMMIT")
            self.commits_total += 1
        except BaseException:
            # One operation failed (disk full, cap reached): undo the group and run each alone, so
            # the error reaches only the caller that caused it.
            self._rollback()
            for job in writes:
                self._run_alone(job, transaction=True)
            return
        self._on_commit()
        for job, result in zip(writes, results, strict=True):
            self._call_soon(job, result, None)

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._connection.execute("ROLLBACK")
        self._on_rollback()

    def _run_alone(self, job: _Job, *, transaction: bool) -> None:
        for attempt in (1, 2):
            try:
                if transaction:
                    self._connection.execute("BEGIN IMMEDIATE")
                result = job.operation(self._connection)
                if transaction:
                    self._connection.execute("COMMIT")
                    self.commits_total += 1
            except RunAlone as error:
                if transaction:
                    self._rollback()
                if attempt == 1 and transaction:
                    continue  # it is alone now; the operation knows to take its exact path
                self._call_soon(job, None, error)
                return
            except BaseException as error:
                if transaction:
                    self._rollback()
                self._call_soon(job, None, error)
                return
            break
        if transaction:
            self._on_commit()
        self._call_soon(job, result, None)

    def _call_soon(self, job: _Job, result: Any, error: BaseException | None) -> None:
        try:
            job.loop.call_soon_threadsafe(_resolve, job.future, result, error)
        except RuntimeError:
            log.debug("event loop closed before a SQLite result was delivered")

    def _run_idle(self) -> None:
        if self._idle is None:
            return
        try:
            self._idle(self._connection)
        except sqlite3.Error as error:
            with contextlib.suppress(sqlite3.Error):
                if self._connection.in_transaction:
                    self._connection.execute("ROLLBACK")
            log.warning("SQLite maintenance failed: %s", error)

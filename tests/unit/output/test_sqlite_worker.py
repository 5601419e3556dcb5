"""The SQLite worker thread: a thread that dies fails its callers instead of leaving them waiting."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from kubemeter.output.sqlite_worker import SqliteWorker, SqliteWorkerDied, open_connection


def insert(value: int):  # type: ignore[no-untyped-def]
    def operation(connection: sqlite3.Connection) -> int:
        connection.execute("INSERT INTO t (v) VALUES (?)", (value,))
        return value

    return operation


async def test_a_dead_worker_thread_fails_the_waiting_and_the_later_callers(tmp_path: Path) -> None:
    connection = open_connection(tmp_path / "w.db")
    connection.execute("CREATE TABLE t (v INTEGER)")
    release = threading.Event()
    commits = 0

    def on_commit() -> None:
        nonlocal commits
        commits += 1
        if commits == 2:
            release.wait(5)  # hold the thread so more callers queue behind this group
            raise MemoryError("the worker's own bookkeeping failed")  # not an operation's error

    worker = SqliteWorker(connection, name="test worker", on_commit=on_commit)
    assert await worker.write(insert(1)) == 1
    doomed = asyncio.ensure_future(worker.write(insert(2)))
    await asyncio.sleep(0.2)
    queued = [asyncio.ensure_future(worker.write(insert(n))) for n in (3, 4)]
    await asyncio.sleep(0.1)
    release.set()
    results = await asyncio.wait_for(asyncio.gather(doomed, *queued, return_exceptions=True), 5)
    assert [type(r) for r in results] == [SqliteWorkerDied] * 3, results
    assert isinstance(results[0].__cause__, MemoryError)
    assert not worker.alive
    with pytest.raises(SqliteWorkerDied, match="died"):
        await asyncio.wait_for(worker.write(insert(5)), 5)


async def test_an_operation_error_reaches_only_its_caller_and_the_worker_lives_on(tmp_path: Path) -> None:
    connection = open_connection(tmp_path / "w.db")
    connection.execute("CREATE TABLE t (v INTEGER NOT NULL)")
    worker = SqliteWorker(connection, name="test worker")
    bad = worker.write(insert(None))  # type: ignore[arg-type]
    good = worker.write(insert(7))
    results = await asyncio.gather(bad, good, return_exceptions=True)
    assert isinstance(results[0], sqlite3.IntegrityError) and results[1] == 7
    assert worker.alive
    assert await worker.read(lambda c: c.execute("SELECT v FROM t").fetchall()) == [(7,)]
    worker.close()


ACK_WITHOUT_TEMP_DIR = """
import asyncio, json, sys
from pathlib import Path
from kubemeter.output.queue import DurableQueue, QueueLimits, QueueRecord

async def main() -> None:
    queue = await DurableQueue.open(Path(sys.argv[1]) / "queue.db", QueueLimits(max_bytes=64 * 2**20))
    payload = json.dumps({"pad": "x" * 900}).encode()
    await queue.enqueue([QueueRecord("s", f"e{i}", payload) for i in range(4000)])
    await queue.ack(await queue.lease(500))
    print(queue.stats().events)
    await queue.close()

asyncio.run(main())
"""


def test_a_queue_acks_without_a_writable_temp_directory(tmp_path: Path) -> None:
    # The pods' root filesystem is read-only and has no /tmp; SQLite's temp directory here is one
    # nobody (root included) can create files in. Without temp_store=MEMORY the ack fails.
    environment = {**os.environ, "SQLITE_TMPDIR": "/proc", "TMPDIR": "/proc"}
    result = subprocess.run(
        [sys.executable, "-c", ACK_WITHOUT_TEMP_DIR, str(tmp_path)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "3500"

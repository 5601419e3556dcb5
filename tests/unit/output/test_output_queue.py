"""The durable queue: committed before enqueue returns, idempotent per (source, id), capped, with
dead letters and the ``kubemeter dlq`` operations."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from kubemeter.output import OutputFullError
from kubemeter.output.dead_letters import list_dead_letters, purge, replay
from kubemeter.output.queue import DurableQueue, QueueFullError, QueueLimits, QueueRecord, WhenFull


def records(count: int, *, prefix: str = "e", size: int = 100) -> list[QueueRecord]:
    return [
        QueueRecord(
            source="kubemeter/test", event_id=f"{prefix}-{n}", payload=b'{"p":"' + b"x" * (size - 8) + b'"}'
        )
        for n in range(count)
    ]


def stored_ids(path: Path) -> list[str]:
    """Read the file with a separate connection: what another process would see after a crash."""
    with sqlite3.connect(path) as connection:
        return [row[0] for row in connection.execute("SELECT event_id FROM events ORDER BY seq")]


async def test_enqueue_returns_after_commit_and_another_connection_sees_it(tmp_path: Path) -> None:
    queue = await DurableQueue.open(tmp_path / "q.db")
    await queue.enqueue(records(3))
    assert stored_ids(tmp_path / "q.db") == ["e-0", "e-1", "e-2"]
    await queue.close()


async def test_queue_runs_with_wal_and_full_fsync(tmp_path: Path) -> None:
    queue = await DurableQueue.open(tmp_path / "q.db")
    with sqlite3.connect(tmp_path / "q.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert queue._worker._connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    await queue.close()


async def test_the_same_event_enqueued_twice_is_stored_once(tmp_path: Path) -> None:
    queue = await DurableQueue.open(tmp_path / "q.db")
    assert await queue.enqueue(records(5)) == 5
    assert await queue.enqueue(records(7)) == 2  # e-0..e-4 are already there
    stats = queue.stats()
    assert (stats.events, stats.payload_bytes) == (7, 700)
    await queue.close()


async def test_a_retried_batch_among_new_ones_is_counted_exactly_and_the_others_are_stored(
    tmp_path: Path,
) -> None:
    queue = await DurableQueue.open(tmp_path / "q.db")
    await queue.enqueue(records(5, prefix="old"))
    # One commit group: a retried batch (half already queued, one event twice) beside new batches.
    retried = [*records(10, prefix="old"), records(1, prefix="old")[0]]
    stored = await asyncio.gather(
        queue.enqueue(records(4, prefix="a")), queue.enqueue(retried), queue.enqueue(records(3, prefix="b"))
    )
    assert stored == [4, 5, 3]
    stats = queue.stats()
    assert (stats.events, stats.payload_bytes) == (17, 1700)
    assert len(stored_ids(tmp_path / "q.db")) == 17
    await queue.close()


async def test_concurrent_writers_share_commits(tmp_path: Path) -> None:
    queue = await DurableQueue.open(tmp_path / "q.db")
    writers = 100
    await asyncio.gather(*(queue.enqueue(records(10, prefix=f"w{n}")) for n in range(writers)))
    commits = queue._worker.commits_total
    print(f"{writers} concurrent writers, {commits} commits")
    assert queue.stats().events == writers * 10
    assert commits < writers / 2
    await queue.close()


async def test_full_buffer_pushes_back_and_stores_nothing_of_the_write(tmp_path: Path) -> None:
    queue = await DurableQueue.open(tmp_path / "q.db", QueueLimits(max_bytes=1000))
    await queue.enqueue(records(8))
    with pytest.raises(OutputFullError) as refused:
        await queue.enqueue(records(3, prefix="late"))
    assert "800 of its 1000 bytes" in str(refused.value)
    assert queue.stats().events == 8
    assert queue.stats().dropped_events_total == 0
    await queue.close()


async def test_drop_oldest_is_explicit_and_counted(tmp_path: Path) -> None:
    limits = QueueLimits(max_bytes=1000, when_full=WhenFull.DROP_OLDEST)
    queue = await DurableQueue.open(tmp_path / "q.db", limits)
    await queue.enqueue(records(8))
    await queue.enqueue(records(3, prefix="late"))
    assert stored_ids(tmp_path / "q.db") == [f"e-{n}" for n in range(1, 8)] + ["late-0", "late-1", "late-2"]
    stats = queue.stats()
    assert (stats.events, stats.payload_bytes, stats.dropped_events_total) == (10, 1000, 1)
    await queue.close()


async def test_events_older_than_the_retention_push_back(tmp_path: Path) -> None:
    queue = await DurableQueue.open(tmp_path / "q.db", QueueLimits(max_age_s=0.05))
    await queue.enqueue(records(1))
    await asyncio.sleep(0.1)  # the retention itself is the thing under test
    with pytest.raises(QueueFullError, match="retention"):
        await queue.enqueue(records(1, prefix="new"))
    await queue.close()


async def test_volume_full_is_push_back_not_an_error(tmp_path: Path) -> None:
    queue = await DurableQueue.open(tmp_path / "q.db")
    # SQLite's own page cap stands in for a full volume here; the gateway test fills a real tmpfs.
    queue._worker._connection.execute(
        "PRAGMA max_page_count = 1"
    )  # smaller than the file: every growth fails
    with pytest.raises(QueueFullError, match="volume"):
        await queue.enqueue(records(200, size=1000))
    await queue.close()


async def test_lease_ack_and_dead_letter(tmp_path: Path) -> None:
    queue = await DurableQueue.open(tmp_path / "q.db")
    await queue.enqueue(records(5))
    first = await queue.lease(3)
    second = await queue.lease(3)
    assert [e.event_id for e in first] == ["e-0", "e-1", "e-2"]
    assert [e.event_id for e in second] == ["e-3", "e-4"]
    await queue.ack(first)
    await queue.dead_letter(second[:1], reason="HTTP 400: bad value", response='{"detail":"bad"}')
    stats = queue.stats()
    assert (stats.events, stats.dead_letters) == (1, 1)
    await queue.close()
    with sqlite3.connect(tmp_path / "q.db") as connection:
        letters = list_dead_letters(connection, 10)
    assert letters[0]["id"] == "e-3"
    assert letters[0]["reason"] == "HTTP 400: bad value"
    assert letters[0]["response"] == '{"detail":"bad"}'


async def test_events_enqueued_after_a_drain_are_leased(tmp_path: Path) -> None:
    queue = await DurableQueue.open(tmp_path / "q.db")
    await queue.enqueue(records(3))
    await queue.ack(await queue.lease(10))
    await queue.enqueue(records(2, prefix="after"))
    assert [e.event_id for e in await queue.lease(10)] == ["after-0", "after-1"]
    await queue.close()


async def test_reopened_queue_delivers_everything_not_acked(tmp_path: Path) -> None:
    queue = await DurableQueue.open(tmp_path / "q.db")
    await queue.enqueue(records(4))
    await queue.ack(await queue.lease(1))
    await queue.lease(10)  # leased but never acked: the process "died"
    await queue.close()
    reopened = await DurableQueue.open(tmp_path / "q.db")
    assert reopened.stats().events == 3
    assert [e.event_id for e in await reopened.lease(10)] == ["e-1", "e-2", "e-3"]
    await reopened.close()


async def test_dlq_replay_while_the_queue_runs(tmp_path: Path) -> None:
    queue = await DurableQueue.open(tmp_path / "q.db")
    await queue.enqueue(records(2))
    leased = await queue.lease(10)
    await queue.dead_letter(leased, reason="refused", response="")
    with sqlite3.connect(tmp_path / "q.db", isolation_level=None) as connection:
        assert replay(connection, "event_id IN (?)", ["e-1"]) == 1
    assert await queue.wait_for_events(timeout_s=5)
    assert [e.event_id for e in await queue.lease(10)] == ["e-1"]
    stats = queue.stats()
    assert (stats.events, stats.dead_letters) == (1, 1)
    with sqlite3.connect(tmp_path / "q.db", isolation_level=None) as connection:
        assert purge(connection, "1 = 1", []) == 1
    for _ in range(100):  # the queue recounts within its half-second maintenance tick
        if queue.stats().dead_letters == 0:
            break
        await asyncio.sleep(0.05)
    assert queue.stats().dead_letters == 0
    await queue.close()

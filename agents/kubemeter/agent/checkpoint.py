"""How far each meter has emitted, per (meter, pod), in one SQLite file on the node (hostPath).

A window's events are written to the output first; only after ``write`` returns is the cursor moved,
in one transaction with the per-pod rows and the source's state. A crash between the two re-emits the
same window with the same ids and values, which the billing API drops; nothing is lost.

The pod watch's state is saved here too, every second: the pods that changed since the last save and
the watch's resume point (its resourceVersion), in one transaction, so after a restart the watch
resumes exactly where the saved pods were. Writes go through one worker thread
(:class:`SqliteWorker`): the event loop never waits on an fsync, and writes that meet (windows of
several meters, the pod save) share one transaction.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubemeter.output.sqlite_worker import SqliteWorker, open_connection
from kubemeter.sources.informer import CachedObject

CHECKPOINT_FILENAME = "checkpoints.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meters (
    meter TEXT PRIMARY KEY,          -- the Meter's uid
    cursor_ms INTEGER NOT NULL,      -- every window before this is on disk in the output
    source_state TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS meter_pods (
    meter TEXT NOT NULL,
    pod_uid TEXT NOT NULL,
    emitted_through_ms INTEGER NOT NULL,
    PRIMARY KEY (meter, pod_uid)
);
CREATE TABLE IF NOT EXISTS pods (     -- last known state of every pod still to be metered
    uid TEXT PRIMARY KEY,
    object TEXT NOT NULL,
    resource_version TEXT NOT NULL,
    deleted_at_ms INTEGER,
    vanished INTEGER NOT NULL DEFAULT 0,
    deletion_requested_ms INTEGER    -- the earliest deletion request seen (re-stamped by later deletes)
);
CREATE TABLE IF NOT EXISTS agent (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS resume_points (  -- where each watch resumes; saved with its objects
    watch TEXT PRIMARY KEY,
    resource_version TEXT NOT NULL   -- opaque, as the API server gave it
);
"""


@dataclass(frozen=True)
class WatchSave:
    """What changed in a watch cache since the last save, taken on the event loop in one go."""

    rows: list[tuple[str, dict[str, Any], str, int | None, int, int | None]]
    resource_version: str | None
    heartbeat_ms: int | None


def _version(cached: CachedObject) -> str:
    resource_version = cached.object.get("metadata", {}).get("resourceVersion")
    return f"{resource_version}/{cached.deleted_at_ms}/{cached.deletion_requested_ms}/{int(cached.vanished)}"


class CheckpointStore:
    def __init__(self, directory: str | Path) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / CHECKPOINT_FILENAME
        # Autocommit mode; transactions are explicit. synchronous=FULL: a cursor on disk is on disk.
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(pods)")}
        if "deletion_requested_ms" not in columns:  # a checkpoint written by an older agent
            self.db.execute("ALTER TABLE pods ADD COLUMN deletion_requested_ms INTEGER")
        # Reads (at start) and a new meter's first row use self.db; every other write the worker.
        self._writer = SqliteWorker(open_connection(self.path), name="checkpoint")

    def close(self) -> None:
        self._writer.close()
        self.db.close()

    # ---- meters ---------------------------------------------------------------------------------
    def meter(self, meter: str) -> tuple[int, dict[str, Any]] | None:
        row = self.db.execute(
            "SELECT cursor_ms, source_state FROM meters WHERE meter = ?", (meter,)
        ).fetchone()
        return None if row is None else (int(row[0]), json.loads(row[1]))

    def start_meter(self, meter: str, cursor_ms: int) -> None:
        self.db.execute("INSERT OR IGNORE INTO meters (meter, cursor_ms) VALUES (?, ?)", (meter, cursor_ms))

    async def commit_window(
        self, meter: str, window_end_ms: int, pod_uids: Iterable[str], source_state: Mapping[str, Any]
    ) -> None:
        state = json.dumps(source_state, separators=(",", ":"))
        rows = [(meter, uid, window_end_ms) for uid in pod_uids]

        def commit(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE meters SET cursor_ms = ?, source_state = ? WHERE meter = ?",
                (window_end_ms, state, meter),
            )
            db.executemany(
                "INSERT INTO meter_pods (meter, pod_uid, emitted_through_ms) VALUES (?, ?, ?) "
                "ON CONFLICT (meter, pod_uid) DO UPDATE SET emitted_through_ms = excluded.emitted_through_ms",
                rows,
            )

        await self._writer.write(commit)

    def emitted_through_ms(self, meter: str, pod_uid: str) -> int | None:
        row = self.db.execute(
            "SELECT emitted_through_ms FROM meter_pods WHERE meter = ? AND pod_uid = ?", (meter, pod_uid)
        ).fetchone()
        return None if row is None else int(row[0])

    # ---- the pod watch ---------------------------------------------------------------------------
    @staticmethod
    def changed_pods(
        pods: Mapping[str, CachedObject],
        saved_versions: Mapping[str, str],
        resource_version: str | None,
        heartbeat_ms: int | None,
    ) -> WatchSave:
        """What to save: the pods whose state changed since the last save, with the resume point."""
        rows = []
        for uid, cached in pods.items():
            version = _version(cached)
            if saved_versions.get(uid) != version:
                row = (uid, cached.object, version, cached.deleted_at_ms, int(cached.vanished))
                rows.append((*row, cached.deletion_requested_ms))
        return WatchSave(rows, resource_version, heartbeat_ms)

    async def save_watch(self, save: WatchSave, saved_versions: dict[str, str], watch: str = "pods") -> None:
        """Persist ``save`` in one transaction (off the event loop); then ``saved_versions`` says so."""

        def write(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT OR REPLACE INTO pods "
                "(uid, object, resource_version, deleted_at_ms, vanished, deletion_requested_ms) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(uid, json.dumps(obj), *rest) for uid, obj, *rest in save.rows],
            )
            if save.resource_version is not None:
                db.execute(
                    "INSERT OR REPLACE INTO resume_points (watch, resource_version) VALUES (?, ?)",
                    (watch, save.resource_version),
                )
            if save.heartbeat_ms is not None:
                db.execute(
                    "INSERT OR REPLACE INTO agent (key, value) VALUES ('heartbeat_ms', ?)",
                    (save.heartbeat_ms,),
                )

        await self._writer.write(write)
        for uid, _obj, version, *_rest in save.rows:
            saved_versions[uid] = version

    def resume_point(self, watch: str = "pods") -> str | None:
        query = "SELECT resource_version FROM resume_points WHERE watch = ?"
        row = self.db.execute(query, (watch,)).fetchone()
        return None if row is None else str(row[0])

    def load_pods(self) -> tuple[dict[str, CachedObject], dict[str, str]]:
        """The saved pods, and their saved versions (so they are not saved again unchanged)."""
        pods = {
            uid: CachedObject(json.loads(obj), deleted_at_ms, bool(vanished), requested_ms)
            for uid, obj, deleted_at_ms, vanished, requested_ms in self.db.execute(
                "SELECT uid, object, deleted_at_ms, vanished, deletion_requested_ms FROM pods"
            )
        }
        return pods, {uid: _version(cached) for uid, cached in pods.items()}

    async def forget_pods(self, uids: Iterable[str]) -> None:
        keys = [(uid,) for uid in uids]

        def forget(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM pods WHERE uid = ?", keys)
            db.executemany("DELETE FROM meter_pods WHERE pod_uid = ?", keys)

        await self._writer.write(forget)

    # ---- liveness -------------------------------------------------------------------------------
    def last_heartbeat_ms(self) -> int | None:
        row = self.db.execute("SELECT value FROM agent WHERE key = 'heartbeat_ms'").fetchone()
        return None if row is None else int(row[0])

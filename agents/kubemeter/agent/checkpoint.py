"""How far each meter has emitted, per (meter, pod), in one SQLite file on the node (hostPath).

A window's events are written to the output first; only after ``write`` returns is the cursor moved,
in one transaction with the per-pod rows and the source's state. A crash between the two re-emits the
same window with the same ids and values, which the billing API drops; nothing is lost.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

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
"""


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

    def close(self) -> None:
        self.db.close()

    # ---- meters ---------------------------------------------------------------------------------
    def meter(self, meter: str) -> tuple[int, dict[str, Any]] | None:
        row = self.db.execute(
            "SELECT cursor_ms, source_state FROM meters WHERE meter = ?", (meter,)
        ).fetchone()
        return None if row is None else (int(row[0]), json.loads(row[1]))

    def start_meter(self, meter: str, cursor_ms: int) -> None:
        self.db.execute("INSERT OR IGNORE INTO meters (meter, cursor_ms) VALUES (?, ?)", (meter, cursor_ms))

    def commit_window(
        self, meter: str, window_end_ms: int, pod_uids: Iterable[str], source_state: Mapping[str, Any]
    ) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "UPDATE meters SET cursor_ms = ?, source_state = ? WHERE meter = ?",
                (window_end_ms, json.dumps(source_state, separators=(",", ":")), meter),
            )
            self.db.executemany(
                "INSERT INTO meter_pods (meter, pod_uid, emitted_through_ms) VALUES (?, ?, ?) "
                "ON CONFLICT (meter, pod_uid) DO UPDATE SET emitted_through_ms = excluded.emitted_through_ms",
                [(meter, uid, window_end_ms) for uid in pod_uids],
            )

    def emitted_through_ms(self, meter: str, pod_uid: str) -> int | None:
        row = self.db.execute(
            "SELECT emitted_through_ms FROM meter_pods WHERE meter = ? AND pod_uid = ?", (meter, pod_uid)
        ).fetchone()
        return None if row is None else int(row[0])

    # ---- pods -----------------------------------------------------------------------------------
    def save_pods(self, pods: Mapping[str, CachedObject], saved_versions: dict[str, str]) -> None:
        """Persist pods whose object changed since the last save (``saved_versions`` is updated)."""
        rows = []
        for uid, cached in pods.items():
            resource_version = cached.object.get("metadata", {}).get("resourceVersion")
            version = f"{resource_version}/{cached.deleted_at_ms}/{cached.deletion_requested_ms}"
            if saved_versions.get(uid) != version:
                rows.append(
                    (
                        uid,
                        json.dumps(cached.object),
                        version,
                        cached.deleted_at_ms,
                        int(cached.vanished),
                        cached.deletion_requested_ms,
                    )
                )
                saved_versions[uid] = version
        if rows:
            with self.db:
                self.db.executemany(
                    "INSERT OR REPLACE INTO pods "
                    "(uid, object, resource_version, deleted_at_ms, vanished, deletion_requested_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )

    def load_pods(self) -> dict[str, CachedObject]:
        return {
            uid: CachedObject(json.loads(obj), deleted_at_ms, bool(vanished), requested_ms)
            for uid, obj, deleted_at_ms, vanished, requested_ms in self.db.execute(
                "SELECT uid, object, deleted_at_ms, vanished, deletion_requested_ms FROM pods"
            )
        }

    def forget_pods(self, uids: Iterable[str]) -> None:
        keys = [(uid,) for uid in uids]
        with self.db:
            self.db.executemany("DELETE FROM pods WHERE uid = ?", keys)
            self.db.executemany("DELETE FROM meter_pods WHERE pod_uid = ?", keys)

    # ---- liveness -------------------------------------------------------------------------------
    def heartbeat(self, moment_ms: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO agent (key, value) VALUES ('heartbeat_ms', ?)", (moment_ms,))

    def last_heartbeat_ms(self) -> int | None:
        row = self.db.execute("SELECT value FROM agent WHERE key = 'heartbeat_ms'").fetchone()
        return None if row is None else int(row[0])

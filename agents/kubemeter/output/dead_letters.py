"""``kubemeter dlq list|replay|purge``: inspect and act on events the billing API refused.

Works on the queue file directly (``kubectl exec`` into the gateway pod); a running gateway notices
the change and delivers replayed events.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from kubemeter.output.queue import SCHEMA
from kubemeter.output.sqlite_worker import open_connection

DEFAULT_QUEUE = Path("/var/lib/kubemeter/queue.db")


def _connect(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise SystemExit(f"kubemeter dlq: no queue at {path}; pass --queue <data dir>/queue.db")
    connection = open_connection(path)
    connection.executescript(SCHEMA)
    return connection


def list_dead_letters(connection: sqlite3.Connection, limit: int) -> list[dict[str, object]]:
    rows = connection.execute(
        "SELECT seq, source, event_id, dead_lettered_at_s, reason, response, payload FROM dead_letters "
        "ORDER BY seq LIMIT ?",
        (limit,),
    ).fetchall()
    return [
        {
            "seq": seq,
            "source": source,
            "id": event_id,
            "deadLetteredAt": datetime.fromtimestamp(at_s, UTC).isoformat().replace("+00:00", "Z"),
            "reason": reason,
            "response": response,
            "event": json.loads(payload),
        }
        for seq, source, event_id, at_s, reason, response, payload in rows
    ]


def _selection(args: argparse.Namespace) -> tuple[str, list[object]]:
    if args.all:
        return "1 = 1", []
    if args.id:
        return f"event_id IN ({','.join('?' * len(args.id))})", list(args.id)
    if getattr(args, "older_than_hours", None) is not None:
        return "dead_lettered_at_s < ?", [time.time() - args.older_than_hours * 3600]
    raise SystemExit("kubemeter dlq: say which events: --id ID (repeatable), --all, or --older-than-hours N")


def replay(connection: sqlite3.Connection, where: str, parameters: Sequence[object]) -> int:
    """Move dead letters back into the queue (at its tail); returns how many."""
    connection.execute("BEGIN IMMEDIATE")
    connection.execute(
        "INSERT OR IGNORE INTO events (source, event_id, enqueued_at_s, payload) "
        f"SELECT source, event_id, ?, payload FROM dead_letters WHERE {where} ORDER BY seq",
        (time.time(), *parameters),
    )
    moved = connection.execute(f"DELETE FROM dead_letters WHERE {where}", tuple(parameters)).rowcount
    connection.execute("COMMIT")
    return int(moved)


def purge(connection: sqlite3.Connection, where: str, parameters: Sequence[object]) -> int:
    connection.execute("BEGIN IMMEDIATE")
    removed = connection.execute(f"DELETE FROM dead_letters WHERE {where}", tuple(parameters)).rowcount
    connection.execute("COMMIT")
    return int(removed)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="kubemeter dlq", description=__doc__)
    parser.add_argument(
        "--queue", type=Path, default=DEFAULT_QUEUE, help=f"queue file (default {DEFAULT_QUEUE})"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="show dead letters with the reason and the API's response")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument(
        "--json", action="store_true", help="one JSON object per line, with event and response"
    )
    for name, summary in (("replay", "send again (after fixing the cause)"), ("purge", "delete for good")):
        command = commands.add_parser(name, help=summary)
        command.add_argument("--id", action="append", help="event id; repeat for several")
        command.add_argument("--all", action="store_true")
        if name == "purge":
            command.add_argument("--older-than-hours", type=float)
    args = parser.parse_args(list(argv))
    connection = _connect(args.queue)
    try:
        if args.command == "list":
            for letter in list_dead_letters(connection, args.limit):
                if args.json:
                    print(json.dumps(letter))
                else:
                    print(
                        f"{letter['deadLetteredAt']}  {letter['source']}  {letter['id']}  {letter['reason']}"
                    )
            return 0
        where, parameters = _selection(args)
        count = (
            replay(connection, where, parameters)
            if args.command == "replay"
            else purge(connection, where, parameters)
        )
        verb = "replayed" if args.command == "replay" else "purged"
        print(f"{verb} {count} dead-lettered event(s)", file=sys.stderr)
        return 0
    finally:
        connection.close()

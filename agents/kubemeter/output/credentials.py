"""Secrets read from files (a mounted Kubernetes Secret), re-read when the file changes.

Kubernetes updates a mounted Secret by swapping a symlink, so the file's identity (inode, size,
mtime) changes; checking it with ``stat`` on use makes rotation take effect without a restart.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from pathlib import Path

_POLL_INTERVAL_S = 0.25


class SecretFile:
    """One secret per file; the first non-empty line is the value (a trailing newline is ignored).

    Extra lines are further accepted values for :meth:`accepts`, so a gateway token can be rotated
    with an overlap: add the new token, roll the agents, remove the old one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity: tuple[int, int, int] | None = None
        self._values: list[str] = []

    def _refresh(self) -> None:
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            self._identity, self._values = None, []
            return
        identity = (status.st_ino, status.st_size, status.st_mtime_ns)
        if identity == self._identity:
            return
        text = self.path.read_text(encoding="utf-8")
        self._values = [line.strip() for line in text.splitlines() if line.strip()]
        self._identity = identity

    def value(self) -> str | None:
        """The current secret, or None when the file is missing or empty."""
        self._refresh()
        return self._values[0] if self._values else None

    def version(self) -> tuple[int, int, int] | None:
        """Changes whenever the file is replaced or rewritten."""
        self._refresh()
        return self._identity

    def accepts(self, presented: str) -> bool:
        self._refresh()
        # compare_digest for every candidate so timing does not reveal which one matched.
        matches = [hmac.compare_digest(presented.encode(), value.encode()) for value in self._values]
        return any(matches)

    async def wait_for_change(self, since: tuple[int, int, int] | None, timeout_s: float) -> bool:
        """Wait until the file differs from ``since``; False after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if self.version() != since:
                return True
            await asyncio.sleep(min(_POLL_INTERVAL_S, max(0.0, deadline - loop.time())))
        return self.version() != since

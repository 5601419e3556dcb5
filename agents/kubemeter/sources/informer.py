"""List-then-watch caches of Kubernetes objects (pods of this node, namespaces), asyncio only.

A dropped watch is retried with backoff; while it is down the cache says so (``healthy`` is False and
``healthy_through_ms`` stops advancing), so meters can hold or flag the windows that depend on it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from kubemeter.sources.kube import KubeApi, KubeApiError, WatchExpired

log = logging.getLogger(__name__)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class CachedObject:
    object: dict[str, Any]
    # Set when the API server reported the object deleted (or it vanished during a relist).
    deleted_at_ms: int | None = None
    # True when it vanished without the agent seeing its final state (watch gap or agent downtime).
    vanished: bool = False


@dataclass
class Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0
    attempt: int = 0

    def next_delay_s(self) -> float:
        delay: float = min(self.max_s, self.initial_s * float(2**self.attempt))
        self.attempt += 1
        return delay * (0.5 + random.random() / 2)  # jitter so agents do not reconnect in lockstep

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class Informer:
    """Keeps ``objects`` (keyed by ``key_of``) equal to what the API server holds at ``path``."""

    api: KubeApi
    path: str
    params: Mapping[str, str]
    key_of: Callable[[Mapping[str, Any]], str]
    name: str
    on_error: Callable[[str, BaseException], None] = lambda source, error: None
    objects: dict[str, CachedObject] = field(default_factory=dict)
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    healthy: bool = False
    healthy_through_ms: int = 0
    last_error: str | None = None
    relists: int = 0

    def touch(self) -> None:
        if self.healthy:
            self.healthy_through_ms = now_ms()

    async def run(self) -> None:
        backoff = Backoff()
        resource_version: str | None = None
        while True:
            try:
                if resource_version is None:
                    resource_version = await self._relist()
                    self.healthy = True
                    self.synced.set()
                    backoff.reset()
                async for event_type, obj in self.api.watch(self.path, self.params, resource_version):
                    resource_version = obj.get("metadata", {}).get("resourceVersion", resource_version)
                    self._apply(event_type, obj)
                    self.touch()
                    backoff.reset()
                # The server closed the watch normally (timeoutSeconds); resume from resource_version.
            except WatchExpired:
                resource_version = None
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, KubeApiError, OSError, ValueError, TimeoutError) as error:
                self.touch()
                self.healthy = False
                self.last_error = f"{type(error).__name__}: {error}"
                self.on_error(self.name, error)
                log.warning("watch of %s failed (%s); retrying", self.name, self.last_error)
                resource_version = None  # relist: objects may have vanished meanwhile
                await asyncio.sleep(backoff.next_delay_s())

    async def _relist(self) -> str:
        listing = await self.api.get(self.path, self.params)
        seen_ms = now_ms()
        last_known_ms = self.healthy_through_ms or seen_ms
        fresh = {self.key_of(item): item for item in listing.get("items") or []}
        for key, cached in self.objects.items():
            if key not in fresh and cached.deleted_at_ms is None:
                # Gone while nobody watched: it existed until last_known_ms; its end is unknown.
                cached.deleted_at_ms = last_known_ms
                cached.vanished = True
        for key, item in fresh.items():
            self.objects[key] = CachedObject(item)
        self.relists += 1
        self.healthy_through_ms = seen_ms
        return str(listing.get("metadata", {}).get("resourceVersion", ""))

    def _apply(self, event_type: str, obj: dict[str, Any]) -> None:
        if event_type == "BOOKMARK":
            return
        key = self.key_of(obj)
        if event_type == "DELETED":
            self.objects[key] = CachedObject(obj, deleted_at_ms=now_ms())
        else:
            self.objects[key] = CachedObject(obj)

    def forget(self, key: str) -> None:
        self.objects.pop(key, None)

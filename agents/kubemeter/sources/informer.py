"""List-then-watch caches of Kubernetes objects (pods of this node, namespaces), asyncio only.

A dropped watch is retried with backoff; while it is down the cache says so (``healthy`` is False and
``healthy_through_ms`` stops advancing), so meters can hold or flag the windows that depend on it.

A healthy watch can still lag the API server (a slow link, a busy API server, a busy agent). Before a
window closes, :meth:`Informer.catch_up` runs a barrier: a consistent LIST taken at ``t0``, newer
objects from it applied, and pods it no longer has waited for until their DELETED event (their final
state) arrives. Only then is the cache known to hold every change made before ``t0``
(``consistent_through_ms``). Stale events that the watch delivers after the barrier never overwrite the
newer objects the LIST gave (resourceVersions are compared).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from kubemeter.metering.pods import deletion_requested_ms
from kubemeter.sources.kube import KubeApi, KubeApiError, WatchExpired

log = logging.getLogger(__name__)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# After a barrier's LIST answer, the watch gets this long to deliver what the API server sent on it
# before answering the LIST (both travel the same way; the watch is on another connection).
BARRIER_DRAIN_S = 0.1
# A pod the LIST no longer has is waited for this long; past it the watch is stuck, not lagging.
BARRIER_DELETE_WAIT_S = 30.0


def resource_version(obj: Mapping[str, Any]) -> int | None:
    """etcd's revision as an int, to order two versions of one object; None if not numeric."""
    text = (obj.get("metadata") or {}).get("resourceVersion")
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def is_newer(candidate: Mapping[str, Any], cached: Mapping[str, Any]) -> bool:
    new, old = resource_version(candidate), resource_version(cached)
    return new is None or old is None or new > old


@dataclass
class CachedObject:
    object: dict[str, Any]
    # Set when the API server reported the object deleted (or it vanished during a relist).
    deleted_at_ms: int | None = None
    # True when it vanished without the agent seeing its final state (watch gap or agent downtime).
    vanished: bool = False
    # The earliest deletion request seen in any version of the object (see deletion_requested_ms).
    deletion_requested_ms: int | None = None


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
    # Every change the API server made before this moment is in ``objects`` (set by LISTs).
    consistent_through_ms: int = 0
    last_error: str | None = None
    relists: int = 0
    barriers: int = 0
    # Watch events older than the last barrier's LIST for objects the LIST did not show: the barrier
    # missed a pod that was created and gone before the LIST (see docs/metering.md).
    missed_by_barrier: int = 0
    _barrier_rv: int = 0
    _barrier: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

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
            except (
                httpx.HTTPError,
                httpx.StreamError,
                KubeApiError,
                OSError,
                ValueError,
                TimeoutError,
            ) as error:
                self.touch()
                self.healthy = False
                self.last_error = f"{type(error).__name__}: {error}"
                self.on_error(self.name, error)
                log.warning("watch of %s failed (%s); retrying", self.name, self.last_error)
                resource_version = None  # relist: objects may have vanished meanwhile
                await asyncio.sleep(backoff.next_delay_s())

    async def _relist(self) -> str:
        started_ms = now_ms()
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
            self._store(key, item)
        self.relists += 1
        self.healthy_through_ms = seen_ms
        self.consistent_through_ms = max(self.consistent_through_ms, started_ms)
        self._changed.set()
        return str(listing.get("metadata", {}).get("resourceVersion", ""))

    def _apply(self, event_type: str, obj: dict[str, Any]) -> None:
        if event_type == "BOOKMARK":
            return
        key = self.key_of(obj)
        cached = self.objects.get(key)
        if cached is None and self._barrier_rv and (resource_version(obj) or 0) <= self._barrier_rv:
            self.missed_by_barrier += 1
            log.warning("%s %s arrived after a barrier that should have seen it", self.name, key)
        if event_type == "DELETED":
            self._store(key, obj, deleted_at_ms=now_ms())
        elif cached is None or (cached.deleted_at_ms is None and is_newer(obj, cached.object)):
            self._store(key, obj)
        self._changed.set()

    def _store(self, key: str, obj: dict[str, Any], deleted_at_ms: int | None = None) -> None:
        """Replace the cached version, keeping the earliest deletion request any version showed."""
        # managedFields is about half of a pod object and nothing meters it: not kept in memory.
        (obj.get("metadata") or {}).pop("managedFields", None)
        requests = [deletion_requested_ms(obj)]
        if (previous := self.objects.get(key)) is not None:
            requests.append(previous.deletion_requested_ms)
        known = [moment for moment in requests if moment is not None]
        self.objects[key] = CachedObject(obj, deleted_at_ms, deletion_requested_ms=min(known, default=None))

    async def catch_up(self, through_ms: int, timeout_s: float = 5.0) -> bool:
        """Make the cache consistent through ``through_ms`` (a past moment) if the API answers in time.

        Concurrent callers share one barrier. Returns whether ``consistent_through_ms`` got there.
        """
        deadline = time.monotonic() + timeout_s
        while self.consistent_through_ms < through_ms and self.healthy:
            if self._barrier is None or self._barrier.done():
                self._barrier = asyncio.create_task(self._run_barrier(), name=f"{self.name} barrier")
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                break
            try:
                await asyncio.wait_for(asyncio.shield(self._barrier), left_s)
            except TimeoutError:
                break
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the LIST failed: windows wait; the watch loop reports faults
                log.warning("barrier on %s failed: %s", self.name, error)
                break
        return self.consistent_through_ms >= through_ms

    async def _run_barrier(self) -> None:
        started_ms = now_ms()
        listing = await self.api.get(self.path, self.params)
        listed = {self.key_of(item): item for item in listing.get("items") or []}
        for key, item in listed.items():
            cached = self.objects.get(key)
            if cached is None or (cached.deleted_at_ms is None and is_newer(item, cached.object)):
                self._store(key, item)
        list_rv = resource_version(listing)
        self._barrier_rv = max(self._barrier_rv, list_rv or 0)
        await asyncio.sleep(BARRIER_DRAIN_S)
        # Gone from the LIST but not yet DELETED here: the final state is on its way on the watch.
        # Objects newer than the LIST (created after it was answered) are not waited for.
        pending = {
            key
            for key, cached in self.objects.items()
            if key not in listed
            and cached.deleted_at_ms is None
            and (list_rv is None or (resource_version(cached.object) or 0) <= list_rv)
        }
        deadline = time.monotonic() + BARRIER_DELETE_WAIT_S
        while pending := {key for key in pending if self._still_pending(key)}:
            left_s = deadline - time.monotonic()
            if left_s <= 0 or not self.healthy:
                log.warning(
                    "%s: %d objects gone from the list never arrived as DELETED", self.name, len(pending)
                )
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left_s)
            except TimeoutError:
                continue
        self.barriers += 1
        self.consistent_through_ms = max(self.consistent_through_ms, started_ms)

    def _still_pending(self, key: str) -> bool:
        cached = self.objects.get(key)
        return cached is not None and cached.deleted_at_ms is None

    def forget(self, key: str) -> None:
        self.objects.pop(key, None)

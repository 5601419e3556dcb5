"""Watch caches of Kubernetes objects (pods of this node, namespaces), asyncio only.

Like client-go's reflector, the watch *resumes*: the resourceVersion of the last event (or bookmark)
applied is kept (and checkpointed by the agent), and after a broken watch or an agent restart the
watch starts again from it. The API server's watch cache then delivers what happened meanwhile,
DELETED events with each pod's final state included. Only when that point is too old (``410 Gone``)
is the list read again, and only then can an object have vanished unseen (``vanished``: its end is
unknown). resourceVersions are opaque: they are compared for equality only, never ordered.

A healthy watch can still lag the API server (a slow link, a busy API server, a busy agent). Before a
window closes, :meth:`Informer.catch_up` runs a barrier: a LIST (a consistent read: the API server's
watch cache is at least as new as its answer), then a fresh watch stream from the resume point,
whose first bookmark the API server sends after that answer. Events reach a watch in
resourceVersion order, so once that bookmark is applied every change the LIST reflected is in the
cache, including the ADDED/DELETED pair of a pod that lived and ended entirely inside the lag. Only
then is the cache known to hold every change made before the barrier began
(``consistent_through_ms``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from kubemeter.metering.pods import deletion_requested_ms, parse_time_ms, released_at_ms
from kubemeter.sources.kube import KubeApi, KubeApiError, WatchExpired

log = logging.getLogger(__name__)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# How long a watch stream runs before the API server ends it (it is then resumed from where it was).
WATCH_TIMEOUT_S = 300
# A stream opened for a barrier ends this soon: the API server sends a watcher a bookmark 2 s before
# its deadline, so this one carries a bookmark about a second after it opens.
BARRIER_WATCH_TIMEOUT_S = 3
# A barrier waits at least this long for a bookmark before it LISTs again, and this long in all; past
# it the watch is stuck, not lagging.
BARRIER_ROUND_S = 10.0
BARRIER_WAIT_S = 60.0
# creationTimestamp has whole seconds: an object created this long before a barrier began must
# have been in it.
_TIMESTAMP_PRECISION_MS = 1_000


def resource_version(obj: Mapping[str, Any]) -> str | None:
    """The object's (or list's) resourceVersion: opaque text, compared only for equality."""
    value = (obj.get("metadata") or {}).get("resourceVersion")
    return str(value) if value else None


# How long a watch stream must have been open for the heartbeat to say "nothing changed before
# now minus this": events still in flight on the stream (normally milliseconds) are later than that.
HEARTBEAT_MARGIN_MS = 250


class BookmarkNotSent(Exception):
    """A watch stream ended before the bookmark a barrier waited for."""


@dataclass
class CachedObject:
    object: dict[str, Any]
    # Set when the API server reported the object deleted (or it vanished during a relist).
    deleted_at_ms: int | None = None
    # True when it is gone without the agent knowing when it ended (a relist after 410 Gone, or a
    # DELETED replayed after a gap whose object carries no end of its own).
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


_TOO_OLD = re.compile(r"too old resource version: \d+ \((\d+)\)")


def oldest_kept_version(message: str) -> str | None:
    """From a 410's message, the oldest resourceVersion the API server's watch cache can still
    resume from ("too old resource version: <asked> (<oldest kept>)"), or None if it does not say."""
    match = _TOO_OLD.search(message)
    return match.group(1) if match else None


def _ends_itself(obj: Mapping[str, Any]) -> bool:
    """Whether the object's final state says when it released what it held (pods only)."""
    return (obj.get("kind") or "Pod") != "Pod" or released_at_ms(obj) is not None


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
    # Every change the API server made before this moment is in ``objects`` (set by barriers).
    consistent_through_ms: int = 0
    # Where the watch resumes: the resourceVersion of the last event or bookmark applied. The
    # agent checkpoints it with the objects; None means the list must be read.
    resource_version: str | None = None
    last_error: str | None = None
    relists: int = 0
    resumes: int = 0  # watches started again from a kept resourceVersion after a gap
    expired: int = 0  # resume points the API server no longer had (410 Gone)
    vanished_total: int = 0
    barriers: int = 0
    # Objects that arrived after a barrier that began when they already existed: a barrier missed
    # them (their windows may have closed without them). Kept at 0 by the bookmark; counted to know.
    missed_by_barrier: int = 0
    # Set while the watch replays a gap (after a restart or a broken watch): when it began.
    _gap_since_ms: int | None = None
    _stream_open_since_ms: int | None = None  # while a watch stream is open: since when
    _stream: int = 0
    _restart: asyncio.Event = field(default_factory=asyncio.Event)
    # Futures resolved by the first bookmark of a stream numbered at least the int.
    _bookmark_waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)
    _barrier: asyncio.Task[None] | None = None

    def touch(self) -> None:
        if self.healthy:
            self.healthy_through_ms = now_ms()

    def heartbeat(self) -> None:
        """Advance ``healthy_through_ms`` on a quiet watch: an open stream has delivered every change
        made more than :data:`HEARTBEAT_MARGIN_MS` ago (the API server sends a watch's events in
        order and at once). Without it a quiet node's resume point
        would say only when its last event came, and a pod that vanishes past a 410 would be billed
        short by all the quiet time since. Not while a gap replays: until its bookmark, the stream
        may still answer 410 for a resume point the API server no longer has."""
        if self.healthy and self._stream_open_since_ms is not None and self._gap_since_ms is None:
            # Whole seconds, as the API server's timestamps: a pod deleted after this moment has a
            # deletionTimestamp (less its grace) of this second or later, never earlier.
            through_ms = (now_ms() - HEARTBEAT_MARGIN_MS) // 1000 * 1000
            if through_ms >= self._stream_open_since_ms:
                self.healthy_through_ms = max(self.healthy_through_ms, through_ms)

    def resume_from(self, resource_version: str | None, objects: Mapping[str, CachedObject]) -> None:
        """Start from a checkpoint: the objects as they were at ``resource_version``."""
        self.objects.update(objects)
        self.resource_version = resource_version
        if resource_version is not None:
            self._gap_since_ms = self.healthy_through_ms or now_ms()
            self.resumes += 1

    async def run(self) -> None:
        backoff = Backoff()
        oldest_kept: str | None = None  # what the API server said it still has, after a 410
        while True:
            try:
                if self.resource_version is None:
                    self.resource_version = await self._relist(oldest_kept)
                    oldest_kept = None
                    backoff.reset()
                elif self._gap_since_ms is not None:
                    # Catching up is over at the first bookmark sent after the stream opened.
                    self._track_gap_end()
                await self._watch_once()
                backoff.reset()
            except WatchExpired as error:
                self.expired += 1
                oldest_kept = oldest_kept_version(str(error))
                log.warning(
                    "%s: resume point %s is gone (%s); listing again", self.name, self.resource_version, error
                )
                self.resource_version = None
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
                if self._gap_since_ms is None and self.resource_version is not None:
                    self._gap_since_ms = self.healthy_through_ms or now_ms()
                    self.resumes += 1  # the watch goes on from where it was
                self.last_error = f"{type(error).__name__}: {error}"
                self.on_error(self.name, error)
                log.warning("watch of %s failed (%s); resuming", self.name, self.last_error)
                await asyncio.sleep(backoff.next_delay_s())

    def _track_gap_end(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._bookmark_waiters.append((self._stream + 1, future))

        def ended(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and done.exception() is None:
                self._gap_since_ms = None

        future.add_done_callback(ended)

    async def _watch_once(self) -> None:
        """One watch stream, until the server ends it or a barrier wants a fresh one."""
        self._stream += 1
        stream = self._stream
        self._restart.clear()
        timeout_s = BARRIER_WATCH_TIMEOUT_S if self._bookmark_waiters else WATCH_TIMEOUT_S
        consume = asyncio.create_task(self._consume(stream, timeout_s), name=f"{self.name} watch")
        restart = asyncio.create_task(self._restart.wait())
        try:
            await asyncio.wait({consume, restart}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            restart.cancel()
            if not consume.done():
                consume.cancel()  # a barrier wants a fresh stream: drop what is in flight on this one
                with contextlib.suppress(asyncio.CancelledError):
                    await consume
        if not consume.cancelled():
            self._ended_without_bookmark(stream)
            consume.result()

    async def _consume(self, stream: int, timeout_s: int) -> None:
        assert self.resource_version is not None

        def opened() -> None:
            self.healthy = True
            self.last_error = None
            self.synced.set()
            self._stream_open_since_ms = now_ms()

        try:
            async for event_type, obj in self.api.watch(
                self.path, self.params, self.resource_version, timeout_s, on_open=opened
            ):
                self._apply(event_type, obj)
                self.resource_version = resource_version(obj) or self.resource_version
                self.touch()
                if event_type == "BOOKMARK":
                    log.debug("%s: bookmark %s on stream %d", self.name, self.resource_version, stream)
                    self._bookmarked(stream)
        finally:
            self._stream_open_since_ms = None

    def _ended_without_bookmark(self, stream: int) -> None:
        """The server ended ``stream`` before a bookmark: it sends one only once its cache is past
        where the stream began, so whoever waits on it asks again (a LIST moves the cache on)."""
        waiting = []
        for wanted, future in self._bookmark_waiters:
            if stream >= wanted:
                if not future.done():
                    future.set_exception(BookmarkNotSent(f"{self.name}: stream {stream} ended first"))
            else:
                waiting.append((wanted, future))
        self._bookmark_waiters = waiting

    def _bookmarked(self, stream: int) -> None:
        waiting = []
        for wanted, future in self._bookmark_waiters:
            if stream >= wanted:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((wanted, future))
        self._bookmark_waiters = waiting

    async def _relist(self, at: str | None = None) -> str:
        """Read the list; ``at`` (the oldest version the watch cache still has) lists the state then,
        so that the watch resumed from it still delivers every final state the API server kept."""
        listing = None
        if at is not None:
            try:
                exact = {**self.params, "resourceVersion": at, "resourceVersionMatch": "Exact"}
                listing = await self.api.get(self.path, exact)
            except (WatchExpired, KubeApiError) as error:  # compacted meanwhile: the list as of now
                log.warning("%s: cannot list as of %s (%s); listing now", self.name, at, error)
        if listing is None:
            listing = await self.api.get(self.path, self.params)
        seen_ms = now_ms()
        last_known_ms = self.healthy_through_ms or seen_ms
        fresh = {self.key_of(item): item for item in listing.get("items") or []}
        for key, cached in self.objects.items():
            if key not in fresh and cached.deleted_at_ms is None:
                # Gone while nobody watched: it existed until last_known_ms; its end is unknown.
                cached.deleted_at_ms = last_known_ms
                cached.vanished = True
                self.vanished_total += 1
        for key, item in fresh.items():
            self._store(key, item)
        self.relists += 1
        if at is None or resource_version(listing) != at:
            self._gap_since_ms = None  # current as of now; else the watch replays from ``at`` first
        self.healthy = True
        self.synced.set()
        self.healthy_through_ms = seen_ms
        version = resource_version(listing)
        if version is None:
            raise KubeApiError(500, f"LIST {self.path} answered without a resourceVersion")
        return version

    def _apply(self, event_type: str, obj: dict[str, Any]) -> None:
        if event_type == "BOOKMARK":
            return
        key = self.key_of(obj)
        cached = self.objects.get(key)
        if cached is None and self.consistent_through_ms:
            created = (obj.get("metadata") or {}).get("creationTimestamp")
            if created and parse_time_ms(created) + _TIMESTAMP_PRECISION_MS <= self.consistent_through_ms:
                self.missed_by_barrier += 1
                log.warning("%s %s arrived after a barrier that should have seen it", self.name, key)
        if cached is not None and cached.deleted_at_ms is not None:
            return  # already final (a uid is never reused)
        if event_type == "DELETED":
            if self._gap_since_ms is not None and not _ends_itself(obj):
                # Deleted during the gap with nothing in its final state saying when: it held its
                # resources at least until the gap began, the rest is unknown.
                self._store(key, obj, deleted_at_ms=self._gap_since_ms, vanished=True)
                self.vanished_total += 1
            else:
                self._store(key, obj, deleted_at_ms=now_ms())
        else:
            self._store(key, obj)

    def _store(
        self, key: str, obj: dict[str, Any], deleted_at_ms: int | None = None, vanished: bool = False
    ) -> None:
        """Replace the cached version, keeping the earliest deletion request any version showed."""
        # managedFields is about half of a pod object and nothing meters it: not kept in memory.
        (obj.get("metadata") or {}).pop("managedFields", None)
        requests = [deletion_requested_ms(obj)]
        if (previous := self.objects.get(key)) is not None:
            requests.append(previous.deletion_requested_ms)
        known = [moment for moment in requests if moment is not None]
        self.objects[key] = CachedObject(
            obj, deleted_at_ms, vanished, deletion_requested_ms=min(known, default=None)
        )

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
        deadline = time.monotonic() + BARRIER_WAIT_S
        while True:
            asked = time.monotonic()
            listing = await self.api.get(self.path, self.params)
            # The bookmark comes on a new stream, which costs about what the LIST did (a slow or
            # lagging link delays both): a round waits for that as well as for the fixed minimum.
            round_s = max(BARRIER_ROUND_S, 2 * (time.monotonic() - asked) + BARRIER_WATCH_TIMEOUT_S)
            log.debug(
                "%s barrier: LIST at %s, watch at %s (stream %d)",
                self.name,
                resource_version(listing),
                self.resource_version,
                self._stream,
            )
            if resource_version(listing) == self.resource_version:
                break  # the watch has applied exactly what the LIST reflects
            # The watch may not have delivered everything the LIST reflects: wait for a bookmark on
            # a stream opened after the answer.
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._bookmark_waiters.append((self._stream + 1, future))
            self._restart.set()
            try:
                await asyncio.wait_for(future, min(round_s, max(0.1, deadline - time.monotonic())))
                break
            except BookmarkNotSent:
                if time.monotonic() >= deadline:
                    raise
                log.debug("%s barrier: the stream ended without a bookmark; another round", self.name)
            except TimeoutError:
                # The API server sends a bookmark only past what the stream has seen; on a quiet
                # cluster that takes a change anywhere in etcd, which the next consistent LIST makes
                # its watch cache catch up with.
                if time.monotonic() >= deadline:
                    log.warning(
                        "%s: no bookmark within %.0f s; the watch is stuck", self.name, BARRIER_WAIT_S
                    )
                    raise
        self.barriers += 1
        log.debug("%s barrier done: consistent through %d", self.name, started_ms)
        self.consistent_through_ms = max(self.consistent_through_ms, started_ms)
        if self.healthy:
            self._gap_since_ms = None  # whatever a gap left to replay is applied now

    def forget(self, key: str) -> None:
        self.objects.pop(key, None)

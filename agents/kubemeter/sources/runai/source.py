"""A Run:ai metric per pod on this node, fetched for each closed window ``[start, end)``.

The source walks windows in order with a cursor. A window is fetched once it has ended (plus a lag
for Run:ai's metric pipeline) and only then does the cursor move, so an outage of any length is
back-filled window by window when Run:ai answers again, instead of skipped.

Run:ai returns point samples; the value is their step integral over the window (``GPU_ALLOCATION``
of 0.5 for a whole 60 s window is 30 GPU-seconds). A spacing wider than 2.5 expected steps is a gap:
flagged, not filled.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from kubemeter.metering.windows import Window, window_containing
from kubemeter.sources.base import PodRecord, Progress, Reading, poll_with_backoff
from kubemeter.sources.informer import Backoff, now_ms
from kubemeter.sources.runai.client import (
    RunaiAuthError,
    RunaiClient,
    RunaiCredentials,
    RunaiError,
    RunaiUnavailableError,
    parse_iso_ms,
)

log = logging.getLogger(__name__)


def _held(record: Mapping[str, Any], start_ms: int, end_ms: int) -> bool:
    created = record.get("createdAt")
    completed = record.get("completedAt")
    if created and parse_iso_ms(created) >= end_ms:
        return False
    return not (completed and parse_iso_ms(completed) <= start_ms)


def integrate(
    samples: list[tuple[int, Decimal]], start_ms: int, end_ms: int, max_step_ms: int
) -> tuple[Decimal, int]:
    """Step integral (value·seconds) of point samples over ``[start, end)``, and the gap in ms."""
    total = Decimal(0)
    gap_ms = 0
    points = [(t, v) for t, v in samples if start_ms <= t <= end_ms]
    for (time_ms, value), (next_ms, _) in itertools.pairwise(points):
        held_ms = min(next_ms - time_ms, max_step_ms)
        total += value * held_ms
        gap_ms += next_ms - time_ms - held_ms
    return total / 1000, gap_ms


RUNAI_HOLD_LIMIT_MS = 3_600_000


class RunaiSource(Progress):
    """Readings carry the Run:ai organisation they belong to as dimensions: ``project``,
    ``department`` and ``workload``."""

    # Run:ai keeps the metrics: after an outage the windows are fetched late, not closed empty. The
    # agent holds this meter's windows for up to this long before closing them flagged.
    hold_limit_ms: int | None = RUNAI_HOLD_LIMIT_MS

    def __init__(
        self,
        metric: str,
        node: str,
        client: RunaiClient,
        window_ms: int,
        not_before_ms: int,
        sample_step_ms: int = 15_000,
        lag_ms: int = 30_000,
        poll_interval_ms: int = 15_000,
        clock_ms: Callable[[], int] = now_ms,
        on_error: Callable[[str, BaseException], None] = lambda source, error: None,
    ) -> None:
        self.metric = metric
        self.node = node
        self.client = client
        self.window_ms = window_ms
        self.sample_step_ms = sample_step_ms
        self.lag_ms = lag_ms
        self.poll_interval_ms = poll_interval_ms
        self.clock_ms = clock_ms
        self.on_error = on_error
        self.cursor_ms = (
            window_containing(not_before_ms, window_ms).end_ms if not_before_ms % window_ms else not_before_ms
        )
        self.fetched: dict[int, list[Reading]] = {}  # window start → readings
        self.holders: set[str] = set()  # pod uids seen on this node in the last listing

    # ---- observing ------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await poll_with_backoff(
                self.poll,
                self.poll_interval_ms / 1000,
                Backoff(initial_s=self.poll_interval_ms / 1000, max_s=300.0),
                (RunaiError,),
                self._unexpected,
            )
        finally:
            await self.close()

    async def close(self) -> None:
        await self.client.close()

    def _unexpected(self, error: Exception) -> None:
        self.last_error = f"Run:ai: {type(error).__name__}: {error}"
        self.on_error("runai", error)

    async def poll(self) -> None:
        """Fetch every window that has ended, oldest first; stop at the first failure (it is retried,
        with everything after it, on the next poll)."""
        try:
            while self.cursor_ms + self.window_ms + self.lag_ms <= self.clock_ms():
                window = Window(self.cursor_ms, self.cursor_ms + self.window_ms)
                self.fetched[window.start_ms] = await self.fetch(window)
                self.cursor_ms = window.end_ms
        except RunaiError as error:
            kind = "credentials refused" if isinstance(error, RunaiAuthError) else "unavailable"
            self.last_error = f"Run:ai {kind}: {error}"
            self.on_error("runai", error)
            log.warning(
                "%s; windows from %s ms will be fetched when it answers", self.last_error, self.cursor_ms
            )
            raise
        self.last_error = None

    async def fetch(self, window: Window) -> list[Reading]:
        workloads = {w["id"]: w for w in await self.client.workloads()}
        pods = [p for p in await self.client.pods() if p.get("nodeName") == self.node]
        self.holders = {str(p["id"]) for p in pods}
        samples = window.duration_ms // self.sample_step_ms + 1
        readings: list[Reading] = []
        for pod in sorted(pods, key=lambda p: str(p["id"])):
            if not _held(pod, window.start_ms, window.end_ms):
                continue
            workload = workloads.get(pod.get("workloadId"), {})
            dimensions = {
                "project": str(pod.get("projectName") or workload.get("projectName") or ""),
                "department": str(workload.get("departmentName") or ""),
                "workload": str(pod.get("workloadName") or workload.get("name") or ""),
            }
            try:
                points = await self.client.pod_metric(
                    str(pod["workloadId"]),
                    str(pod["id"]),
                    self.metric,
                    window.start_ms,
                    window.end_ms,
                    samples,
                )
            except (RunaiAuthError, RunaiUnavailableError):
                raise  # the API is down or refuses us: the whole window is retried later
            except RunaiError as error:
                readings.append(
                    Reading(
                        str(pod["id"]),
                        Decimal(0),
                        complete=False,
                        incomplete_reason=f"Run:ai metric request failed: {error}",
                        dimensions=dimensions,
                    )
                )
                continue
            value, gap_ms = integrate(points, window.start_ms, window.end_ms, self.sample_step_ms * 5 // 2)
            reason = (
                f"Run:ai returned no {self.metric} samples for {gap_ms} ms of the window" if gap_ms else None
            )
            readings.append(
                Reading(
                    str(pod["id"]),
                    value.normalize() if value else Decimal(0),
                    complete=reason is None,
                    incomplete_reason=reason,
                    dimensions=dimensions,
                )
            )
        return readings

    # ---- the Source interface (fault from Progress) -----------------------------------------------
    def observed_through_ms(self) -> int:
        return self.cursor_ms

    def readings(self, window: Window, pods: Mapping[str, PodRecord]) -> list[Reading]:
        if window.start_ms in self.fetched:
            return list(self.fetched[window.start_ms])
        # Closed before Run:ai answered: every pod last seen here is flagged with the reason.
        reason = f"Run:ai not read for this window ({self.last_error or 'not fetched yet'})"
        return [
            Reading(uid, Decimal(0), complete=False, incomplete_reason=reason) for uid in sorted(self.holders)
        ]

    def committed(self, window: Window) -> None:
        self.fetched = {k: v for k, v in self.fetched.items() if k >= window.end_ms}
        self.cursor_ms = max(self.cursor_ms, window.end_ms)

    def snapshot(self) -> dict[str, Any]:
        return {"cursor_ms": self.cursor_ms}

    def restore(self, state: Mapping[str, Any]) -> None:
        # Fetched but uncommitted windows are simply fetched again: Run:ai keeps the history.
        if state:
            self.cursor_ms = (
                min(self.cursor_ms, int(state["cursor_ms"])) if self.fetched else int(state["cursor_ms"])
            )


def read_credentials(credentials_dir: str) -> RunaiCredentials:
    """The Secret mounted at ``credentials_dir``: keys ``clientId``/``clientSecret`` (or the older
    ``appId``/``appSecret`` names of a Run:ai application)."""
    directory = Path(credentials_dir)
    for id_key, secret_key in (("clientId", "clientSecret"), ("appId", "appSecret")):
        if (directory / id_key).exists() and (directory / secret_key).exists():
            return RunaiCredentials(
                (directory / id_key).read_text().strip(), (directory / secret_key).read_text().strip()
            )
    raise RunaiAuthError(
        f"no Run:ai credentials in {credentials_dir}: the Secret named by "
        "spec.source.runai.credentialsSecretRef needs keys clientId and clientSecret"
    )

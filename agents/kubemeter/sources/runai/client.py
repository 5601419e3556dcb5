"""The Run:ai REST API: client-credentials token, paged listings, metrics for explicit windows."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx

log = logging.getLogger(__name__)

MAX_SAMPLES = 1000  # the API's cap on numberOfSamples


class RunaiError(Exception):
    """Run:ai did not answer usefully; the message says what to fix."""


class RunaiUnavailableError(RunaiError):
    """Run:ai did not answer after every retry (network, 429, 5xx): try the same window later."""


class RunaiAuthError(RunaiError):
    """The credentials were refused: retrying will not help until they change."""


@dataclass(frozen=True)
class RunaiCredentials:
    client_id: str
    client_secret: str


def iso(moment_ms: int) -> str:
    return (
        datetime.fromtimestamp(moment_ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def parse_iso_ms(text: str) -> int:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(moment.timestamp()) * 1000 + moment.microsecond // 1000


class RunaiClient:
    def __init__(
        self,
        url: str,
        credentials: RunaiCredentials | Callable[[], RunaiCredentials],
        page_size: int = 500,
        max_attempts: int = 5,
        initial_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        refresh_margin_s: float = 60.0,
        timeout_s: float = 30.0,
        clock_s: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.url = url.rstrip("/")
        self.credentials = credentials
        self.page_size = max(1, min(page_size, 500))
        self.max_attempts = max_attempts
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.refresh_margin_s = refresh_margin_s
        self.clock_s = clock_s
        self.sleep = sleep
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout_s)
        self._token: str | None = None
        self._token_expires_s = 0.0
        self.tokens_fetched = 0

    async def close(self) -> None:
        await self._http.aclose()

    # ---- token ------------------------------------------------------------------------------------
    async def _access_token(self) -> str:
        # Refreshed a margin before expiry, so a request never leaves with a token about to lapse.
        if self._token is None or self.clock_s() >= self._token_expires_s - self.refresh_margin_s:
            # Read at every token request, so a rotated Secret is picked up without a restart.
            credentials = self.credentials() if callable(self.credentials) else self.credentials
            response = await self._http.post(
                "/api/v2/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": credentials.client_id,
                    "client_secret": credentials.client_secret,
                },
            )
            if response.status_code in (400, 401, 403):
                raise RunaiAuthError(
                    f"Run:ai at {self.url} refused the client credentials ({response.status_code}); check "
                    "the clientId/clientSecret in the meter's credentials Secret and that the application "
                    "or service account is still active"
                )
            if response.status_code >= 300:
                raise RunaiUnavailableError(f"Run:ai token endpoint answered {response.status_code}")
            body = response.json()
            self._token = str(body["access_token"])
            self._token_expires_s = self.clock_s() + float(body.get("expires_in", 3600))
            self.tokens_fetched += 1
        return self._token

    # ---- requests ---------------------------------------------------------------------------------
    async def get(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        """GET with a bearer token; a 401 fetches a new token once, 429/5xx/network errors back off."""
        backoff_s = self.initial_backoff_s
        refreshed = False
        last_error = ""
        for attempt in range(1, self.max_attempts + 1):
            try:
                token = await self._access_token()
                response = await self._http.get(
                    path, params=params, headers={"Authorization": f"Bearer {token}"}
                )
            except (httpx.HTTPError, RunaiUnavailableError) as error:
                last_error = f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 401 and not refreshed:
                    # Revoked or expired early (clock skew): one fresh token, then try again now.
                    self._token, refreshed = None, True
                    continue
                if response.status_code in (401, 403):
                    raise RunaiAuthError(
                        f"Run:ai refused {path} with a fresh token ({response.status_code}); grant the "
                        "application a role that can read workloads and metrics"
                    )
                if response.status_code == 429 or response.status_code >= 500:
                    last_error = f"HTTP {response.status_code}"
                elif response.status_code >= 400:
                    raise RunaiError(
                        f"Run:ai rejected {path} {params}: {response.status_code} {response.text[:300]}"
                    )
                else:
                    body: dict[str, Any] = response.json()
                    return body
            if attempt < self.max_attempts:
                await self.sleep(backoff_s * (0.5 + random.random() / 2))
                backoff_s = min(self.max_backoff_s, backoff_s * 2)
        raise RunaiUnavailableError(
            f"Run:ai at {self.url} unavailable for {path} after {self.max_attempts} attempts ({last_error})"
        )

    async def _paged(self, path: str, key: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Every item, page by page. The next offset is the server's (or the raw page length), never a
        count of items kept after filtering, so no page is skipped or read twice."""
        items: list[dict[str, Any]] = []
        offset = 0
        while True:
            body = await self.get(path, {**params, "offset": offset, "limit": self.page_size})
            page = body.get(key) or []
            items.extend(page)
            next_offset = body.get("next")
            if next_offset is None:
                if len(page) < self.page_size:
                    return items
                next_offset = offset + len(page)
            if int(next_offset) <= offset:
                return items
            offset = int(next_offset)

    async def workloads(self) -> list[dict[str, Any]]:
        return await self._paged("/api/v1/workloads", "workloads", {"deleted": "true"})

    async def pods(self) -> list[dict[str, Any]]:
        # Completed pods too: their last window must still be billed.
        return await self._paged("/api/v1/workloads/pods", "pods", {})

    async def pod_metric(
        self, workload_id: str, pod_id: str, metric: str, start_ms: int, end_ms: int, samples: int
    ) -> list[tuple[int, Decimal]]:
        body = await self.get(
            f"/api/v1/workloads/{workload_id}/pods/{pod_id}/metrics",
            {
                "metricType": metric,
                "start": iso(start_ms),
                "end": iso(end_ms),
                "numberOfSamples": max(2, min(MAX_SAMPLES, samples)),
            },
        )
        for measurement in body.get("measurements") or []:
            if measurement.get("type") == metric:
                return sorted(
                    (parse_iso_ms(v["timestamp"]), Decimal(str(v["value"])))
                    for v in measurement.get("values") or []
                )
        return []

"""Usage rows from a billing API, at the finest grain the report needs: one row per (subject, event
type, unit, namespace, GPU model, day). Prices apply to these rows, before any grouping, so a GPU-hour
is priced by its own GPU model even when the report is grouped by customer only."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

SECONDS_PER_DAY = 86_400
NAMESPACE_KEY = "namespace"
UNIT_KEY = "unit"
COMPLETE_KEY = "complete"
DEFAULT_GPU_MODEL_KEY = "gpu_model"


@dataclass(frozen=True)
class UsageRow:
    subject: str
    event_type: str
    unit: str  # as the events carry it (data.unit); "" when the API does not say
    namespace: str
    gpu_model: str
    day: str  # UTC, YYYY-MM-DD
    value: float
    events: int
    incomplete_events: int  # events flagged complete=false: usage the agent could not fully read


class UsageApiError(RuntimeError):
    """The usage API could not be read; the message says what to check."""


@dataclass(frozen=True)
class Period:
    start: datetime | None = None
    end: datetime | None = None

    def query(self) -> dict[str, str]:
        params = {}
        if self.start is not None:
            params["from"] = _rfc3339(self.start)
        if self.end is not None:
            params["to"] = _rfc3339(self.end)
        return params


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _day(window_start: str | None) -> str:
    if not window_start:
        return ""
    return datetime.fromisoformat(window_start.replace("Z", "+00:00")).astimezone(UTC).date().isoformat()


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _is_incomplete(value: Any) -> bool:
    return value is False or (isinstance(value, str) and value.lower() == "false")


class UsageApi:
    """One billing API. ``kind``: ``sink`` (kubemeter sink's ``/api/v1/usage``), ``openmeter`` (the
    meters' ``/query``), or ``auto`` (the sink's endpoint if it answers, OpenMeter otherwise)."""

    def __init__(
        self,
        url: str,
        *,
        kind: str = "auto",
        token: str | None = None,
        gpu_model_key: str = DEFAULT_GPU_MODEL_KEY,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.url = url.rstrip("/")
        self.kind = kind
        self.gpu_model_key = gpu_model_key
        self._client = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout_s, transport=transport
        )

    def close(self) -> None:
        self._client.close()

    def _get(self, path: str, params: Sequence[tuple[str, str]]) -> httpx.Response:
        try:
            return self._client.get(path, params=list(params))
        except httpx.HTTPError as error:
            raise UsageApiError(
                f"cannot reach the usage API at {self.url}{path}: {error}; check --url and that it is running"
            ) from error

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code in {401, 403}:
            raise UsageApiError(
                f"{response.request.url} answered {response.status_code}; pass an API token with --token-file"
            )
        if response.status_code >= 400:
            raise UsageApiError(
                f"{response.request.url} answered {response.status_code}: {response.text[:300]}"
            )
        return response.json()

    def rows(self, period: Period) -> list[UsageRow]:
        if self.kind == "sink":
            return list(self._sink_rows(period, self._sink_response(period)))
        if self.kind == "openmeter":
            return list(self._openmeter_rows(period))
        if self.kind != "auto":
            raise UsageApiError(f"unknown API kind {self.kind!r}; use sink, openmeter or auto")
        response = self._sink_response(period)
        if response.status_code == 404:
            return list(self._openmeter_rows(period))
        return list(self._sink_rows(period, response))

    # -- kubemeter sink ---------------------------------------------------------------------------

    def _sink_response(self, period: Period) -> httpx.Response:
        params = [("windowSeconds", str(SECONDS_PER_DAY)), *period.query().items()]
        for key in (NAMESPACE_KEY, self.gpu_model_key, UNIT_KEY, COMPLETE_KEY):
            params.append(("groupBy", key))
        return self._get("/api/v1/usage", params)

    def _sink_rows(self, period: Period, response: httpx.Response) -> Iterator[UsageRow]:
        del period
        for row in self._json(response).get("data") or []:
            dimensions: Mapping[str, Any] = row.get("groupBy") or {}
            events = int(row.get("events") or 0)
            yield UsageRow(
                subject=_text(row.get("subject")),
                event_type=_text(row.get("type")),
                unit=_text(dimensions.get(UNIT_KEY)),
                namespace=_text(dimensions.get(NAMESPACE_KEY)),
                gpu_model=_text(dimensions.get(self.gpu_model_key)),
                day=_day(row.get("windowStart")),
                value=float(row.get("value") or 0.0),
                events=events,
                incomplete_events=events if _is_incomplete(dimensions.get(COMPLETE_KEY)) else 0,
            )

    # -- OpenMeter --------------------------------------------------------------------------------

    def _openmeter_rows(self, period: Period) -> Iterator[UsageRow]:
        meters = self._json(self._get("/api/v1/meters", []))
        if isinstance(meters, dict):  # paginated form
            meters = meters.get("items") or []
        for meter in meters:
            slug = meter.get("slug") or meter.get("key") or meter.get("id")
            available = set((meter.get("groupBy") or {}).keys())
            wanted = [
                k for k in (NAMESPACE_KEY, self.gpu_model_key, UNIT_KEY, COMPLETE_KEY) if k in available
            ]
            params = [("windowSize", "DAY"), ("windowTimeZone", "UTC"), ("groupBy", "subject")]
            params += [("groupBy", key) for key in wanted] + list(period.query().items())
            result = self._json(self._get(f"/api/v1/meters/{slug}/query", params))
            for row in result.get("data") or []:
                dimensions: Mapping[str, Any] = row.get("groupBy") or {}
                yield UsageRow(
                    subject=_text(row.get("subject")),
                    event_type=_text(meter.get("eventType") or slug),
                    unit=_text(dimensions.get(UNIT_KEY)),
                    namespace=_text(dimensions.get(NAMESPACE_KEY)),
                    gpu_model=_text(dimensions.get(self.gpu_model_key)),
                    day=_day(row.get("windowStart")),
                    value=float(row.get("value") or 0.0),
                    events=0,  # OpenMeter's query returns sums, not counts
                    incomplete_events=0,
                )

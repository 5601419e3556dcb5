"""Usage rows from a billing API, at the finest grain the report needs: one row per (subject, event
type, unit, namespace, GPU model, time bucket). Prices apply to these rows, before any grouping, so a
GPU-hour is priced by its own GPU model even when the report is grouped by customer only.

The bucket is a day for tables; charts over time ask for the bucket that gives a readable number of
bars over the period (:func:`choose_bucket_seconds`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

SECONDS_PER_DAY = 86_400
SECONDS_PER_HOUR = 3_600
NAMESPACE_KEY = "namespace"
UNIT_KEY = "unit"
COMPLETE_KEY = "complete"
INCOMPLETE_REASON_KEY = "incomplete_reason"
DEFAULT_GPU_MODEL_KEY = "gpu_model"

# Buckets a chart over time may use, finest first: a minute at least, since meter windows are
# usually a minute and a finer bucket would show gaps between the windows. The sink serves any of
# them; OpenMeter serves MINUTE, HOUR and DAY, and the others are summed from those.
BUCKET_LADDER_S = (60, 300, 900, SECONDS_PER_HOUR, 6 * SECONDS_PER_HOUR, SECONDS_PER_DAY)
OPENMETER_WINDOWS_S = {60: "MINUTE", SECONDS_PER_HOUR: "HOUR", SECONDS_PER_DAY: "DAY"}
MAX_BUCKETS = 60  # bars in one chart: more is unreadable at page width


def choose_bucket_seconds(span_s: float, ladder: Sequence[int] = BUCKET_LADDER_S) -> int:
    """The finest bucket that splits ``span_s`` into at most :data:`MAX_BUCKETS` bars; a day past that
    (a 90-day period is 90 daily bars, still readable as a trend)."""
    for bucket_s in ladder:
        if span_s <= bucket_s * MAX_BUCKETS:
            return bucket_s
    return ladder[-1]


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
    bucket_start: str = ""  # RFC 3339, UTC; "" when the API did not window the rows
    incomplete_reason: str = ""  # data.incomplete_reason of the incomplete events, when given

    @property
    def bucket_start_s(self) -> float:
        return _seconds(self.bucket_start) if self.bucket_start else 0.0


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


def _seconds(moment: str) -> float:
    return datetime.fromisoformat(moment.replace("Z", "+00:00")).timestamp()


def _day(window_start: str | None) -> str:
    if not window_start:
        return ""
    return datetime.fromisoformat(window_start.replace("Z", "+00:00")).astimezone(UTC).date().isoformat()


def _bucket(window_start: str | None, bucket_s: int) -> str:
    """The start of the ``bucket_s`` bucket holding ``window_start`` (buckets aligned to the epoch, so
    to UTC midnight for every bucket that divides a day)."""
    if not window_start:
        return ""
    start_s = _seconds(window_start)
    return _rfc3339(datetime.fromtimestamp(start_s - start_s % bucket_s, UTC))


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

    def rows(self, period: Period, bucket_s: int = SECONDS_PER_DAY) -> list[UsageRow]:
        """Usage per ``bucket_s`` bucket (a day unless told)."""
        if self.kind == "sink":
            return list(self._sink_rows(self._sink_response(period, bucket_s), bucket_s))
        if self.kind == "openmeter":
            return list(self._openmeter_rows(period, bucket_s))
        if self.kind != "auto":
            raise UsageApiError(f"unknown API kind {self.kind!r}; use sink, openmeter or auto")
        response = self._sink_response(period, bucket_s)
        if response.status_code == 404:
            self.kind = "openmeter"
            return list(self._openmeter_rows(period, bucket_s))
        self.kind = "sink"
        return list(self._sink_rows(response, bucket_s))

    def rows_over_time(self, period: Period, now: datetime | None = None) -> tuple[list[UsageRow], int]:
        """Usage in the bucket that suits a chart of the period, and that bucket in seconds.

        A period with both ends fixes the bucket. Otherwise the data's own extent does: read per day,
        then, while the extent asks for a finer bucket, read again at it (at most a few reads, each
        one smaller than the last)."""
        ladder = BUCKET_LADDER_S
        if period.start is not None and (period.end is not None or now is not None):
            end = period.end or now
            assert end is not None
            bucket_s = choose_bucket_seconds((end - period.start).total_seconds(), ladder)
            return self.rows(period, bucket_s), bucket_s
        bucket_s = SECONDS_PER_DAY
        rows = self.rows(period, bucket_s)
        for _ in range(len(ladder)):
            starts = [row.bucket_start_s for row in rows if row.bucket_start]
            if not starts:
                break
            finer = choose_bucket_seconds(max(starts) + bucket_s - min(starts), ladder)
            if finer >= bucket_s:
                break
            bucket_s = finer
            rows = self.rows(period, bucket_s)
        return rows, bucket_s

    # -- kubemeter sink ---------------------------------------------------------------------------

    def _sink_response(self, period: Period, bucket_s: int) -> httpx.Response:
        params = [("windowSeconds", str(bucket_s)), *period.query().items()]
        for key in (NAMESPACE_KEY, self.gpu_model_key, UNIT_KEY, COMPLETE_KEY, INCOMPLETE_REASON_KEY):
            params.append(("groupBy", key))
        return self._get("/api/v1/usage", params)

    def _sink_rows(self, response: httpx.Response, bucket_s: int) -> Iterator[UsageRow]:
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
                bucket_start=_bucket(row.get("windowStart"), bucket_s),
                incomplete_reason=_text(dimensions.get(INCOMPLETE_REASON_KEY)),
            )

    # -- OpenMeter --------------------------------------------------------------------------------

    def _openmeter_rows(self, period: Period, bucket_s: int) -> Iterator[UsageRow]:
        # The coarsest window OpenMeter serves that divides the bucket; rows are re-bucketed below.
        window_s = max(w for w in OPENMETER_WINDOWS_S if bucket_s % w == 0)
        meters = self._json(self._get("/api/v1/meters", []))
        if isinstance(meters, dict):  # paginated form
            meters = meters.get("items") or []
        for meter in meters:
            slug = meter.get("slug") or meter.get("key") or meter.get("id")
            available = set((meter.get("groupBy") or {}).keys())
            keys = (NAMESPACE_KEY, self.gpu_model_key, UNIT_KEY, COMPLETE_KEY, INCOMPLETE_REASON_KEY)
            wanted = [k for k in keys if k in available]
            params = [
                ("windowSize", OPENMETER_WINDOWS_S[window_s]),
                ("windowTimeZone", "UTC"),
                ("groupBy", "subject"),
            ]
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
                    bucket_start=_bucket(row.get("windowStart"), bucket_s),
                    incomplete_reason=_text(dimensions.get(INCOMPLETE_REASON_KEY)),
                )

"""The Prometheus HTTP API, as much of it as exact metering needs: one instant query at a time."""

from __future__ import annotations

import ast
import asyncio
import json
import re
import ssl
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any


class PrometheusError(Exception):
    """Prometheus could not answer the query; the message says what to fix."""


class PrometheusQueryError(PrometheusError):
    """Prometheus rejected the query itself (HTTP 400/422): retrying will not help."""


@dataclass(frozen=True)
class Sample:
    time_ms: int
    value: Decimal


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    samples: list[Sample]

    @property
    def key(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(self.labels.items()))


@dataclass(frozen=True)
class PrometheusConnection:
    """Where Prometheus is and how to authenticate to it (Thanos/Mimir query frontends included)."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)  # e.g. X-Scope-OrgID for Mimir
    bearer_token: str | None = None
    basic_auth: tuple[str, str] | None = None
    # Credentials in files (a mounted Secret), read at every query so a rotated Secret applies at once.
    bearer_token_file: str | None = None
    basic_auth_dir: str | None = None  # holds files username and password
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    insecure_skip_verify: bool = False
    timeout_s: float = 10.0

    def credentials(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        """Authorization header and basic-auth pair for the next query; raises
        :class:`PrometheusError` when a credentials file cannot be read."""
        try:
            token = self.bearer_token
            if self.bearer_token_file:
                token = Path(self.bearer_token_file).read_text().strip()
            basic = self.basic_auth
            if self.basic_auth_dir:
                directory = Path(self.basic_auth_dir)
                basic = (
                    (directory / "username").read_text().strip(),
                    (directory / "password").read_text().strip(),
                )
        except OSError as error:
            raise PrometheusError(
                f"cannot read the Prometheus credentials ({error}); check the Secret named by "
                "spec.source.prometheus.bearerTokenSecretRef or basicAuthSecretRef"
            ) from error
        return ({"Authorization": f"Bearer {token}"} if token else {}), basic

    def verify(self) -> ssl.SSLContext | bool:
        if self.insecure_skip_verify:
            return False
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.client_cert_file:
                context.load_cert_chain(self.client_cert_file, self.client_key_file)
        except (OSError, ssl.SSLError) as error:
            raise PrometheusError(
                f"cannot load the CA bundle {self.ca_file} (spec.source.prometheus.tls.caFile) or client "
                f"certificate: {error}; mount the file into the agent or fix the path"
            ) from error
        return context


def _sample(pair: list[Any]) -> Sample:
    time_s, text = pair
    # Prometheus sends "<seconds>.<millis>" and the value as a string; both are exact as decimals.
    return Sample(int(Decimal(str(time_s)).scaleb(3)), Decimal(text))


def parse_matrix(body: dict[str, Any]) -> list[Series]:
    """The ``data`` of a range-selector instant query (``resultType: matrix``)."""
    data = body.get("data") or {}
    if data.get("resultType") != "matrix":
        raise PrometheusQueryError(
            f"expected a matrix of raw samples, got {data.get('resultType')!r}; the query must be a "
            "plain series selector"
        )
    series: list[Series] = []
    for item in data.get("result") or []:
        try:
            samples = [_sample(pair) for pair in item.get("values") or []]
        except (InvalidOperation, ValueError, TypeError) as error:
            raise PrometheusError(f"Prometheus sent a sample that is not a number: {error}") from error
        # NaN (a staleness marker leaking through, or an exporter's NaN) is not usage.
        samples = [s for s in samples if s.value.is_finite()]
        series.append(Series(dict(item.get("metric") or {}), samples))
    return series


class PrometheusClient:
    """Instant queries through ``prometheus-api-client`` (blocking ``requests``), in a worker thread so
    the agent's event loop never waits on Prometheus. Imported only when a Prometheus meter exists."""

    def __init__(self, connection: PrometheusConnection) -> None:
        from prometheus_api_client import PrometheusConnect
        from urllib3.util.retry import Retry

        self.connection = connection
        connection.verify()  # a missing CA or client certificate fails here, with the fix
        # No retries inside the library: the source's poll loop retries with backoff and reports.
        self._prometheus = PrometheusConnect(
            url=connection.url.rstrip("/"),
            headers=dict(connection.headers),
            disable_ssl=connection.insecure_skip_verify,
            retry=Retry(total=0, raise_on_status=False),
            timeout=connection.timeout_s,
        )
        if connection.ca_file and not connection.insecure_skip_verify:
            self._prometheus._session.verify = connection.ca_file
        if connection.client_cert_file:
            self._prometheus._session.cert = (connection.client_cert_file, connection.client_key_file)

    async def close(self) -> None:
        await asyncio.to_thread(self._prometheus._session.close)

    async def raw_samples(self, query: str, at_ms: int) -> list[Series]:
        """Evaluate a range-selector ``query`` at ``at_ms``: the stored samples, untouched."""
        headers, basic_auth = self.connection.credentials()
        result = await asyncio.to_thread(self._query, query, at_ms, headers, basic_auth)
        return parse_result(result)

    def _query(
        self, query: str, at_ms: int, headers: dict[str, str], basic_auth: tuple[str, str] | None
    ) -> list[dict[str, Any]]:
        import requests
        from prometheus_api_client.exceptions import PrometheusApiClientException

        # One query at a time per source (its poll loop), so setting these per call is safe.
        self._prometheus.headers = {**self.connection.headers, **headers}
        self._prometheus.auth = basic_auth
        try:
            result: list[dict[str, Any]] = self._prometheus.custom_query(
                query, params={"time": str(Decimal(at_ms).scaleb(-3))}
            )
            return result
        except requests.RequestException as error:
            raise PrometheusError(
                f"Prometheus at {self.connection.url} is unreachable ({type(error).__name__}: {error}); "
                "check spec.source.prometheus.url and that the agent's network policy allows it"
            ) from error
        except (PrometheusApiClientException, ValueError, KeyError) as error:
            raise classify_failure(self.connection.url, query, str(error)) from error


_STATUS = re.compile(r"HTTP Status Code (\d+) \((.*)\)$", re.DOTALL)


def classify_failure(url: str, query: str, message: str) -> PrometheusError:
    """prometheus-api-client reports a non-200 answer as ``HTTP Status Code N (b'body')``."""
    match = _STATUS.search(message)
    if match is None:
        return PrometheusError(f"Prometheus at {url} answered something unreadable: {message[:300]}")
    status = int(match[1])
    body: dict[str, Any] = {}
    try:
        raw = ast.literal_eval(match[2])
        body = json.loads(raw) if isinstance(raw, bytes | str) else {}
    except (ValueError, SyntaxError):
        pass
    if status in (401, 403):
        return PrometheusError(
            f"Prometheus at {url} refused the query ({status}); "
            "check the bearer token / basic auth / headers configured for this meter"
        )
    if status in (400, 422) or body.get("errorType") in ("bad_data", "execution"):
        return PrometheusQueryError(f"Prometheus rejected {query!r}: {body.get('error') or message[:300]}")
    return PrometheusError(f"Prometheus answered {status}: {body.get('error') or message[:300]}")


def parse_result(result: list[dict[str, Any]]) -> list[Series]:
    """The ``result`` list of a query answer; only a matrix (raw samples) is accepted."""
    if any("value" in item and "values" not in item for item in result):
        return parse_matrix({"data": {"resultType": "vector", "result": result}})
    return parse_matrix({"data": {"resultType": "matrix", "result": result}})

"""Reading usage: the OpenMeter meter query (shapes from the OpenMeter v1 spec) and API errors."""

from __future__ import annotations

import json

import httpx
import pytest
from kubemeter.report.usage import Period, UsageApi, UsageApiError

METERS = [
    {
        "id": "01J",
        "slug": "gpu-seconds",
        "eventType": "gpu-seconds",
        "aggregation": "SUM",
        "valueProperty": "$.value",
        "groupBy": {"namespace": "$.namespace", "gpu_model": "$.gpu_model"},
        "createdAt": "2026-11-01T00:00:00Z",
        "updatedAt": "2026-11-01T00:00:00Z",
    },
    {
        "id": "01K",
        "slug": "cpu",
        "eventType": "cpu-core-seconds",
        "aggregation": "SUM",
        "createdAt": "2026-11-01T00:00:00Z",
        "updatedAt": "2026-11-01T00:00:00Z",
    },
]


def openmeter(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/api/v1/usage":
        return httpx.Response(404)
    if request.url.path == "/api/v1/meters":
        return httpx.Response(200, json=METERS)
    slug = request.url.path.split("/")[4]
    group_by = request.url.params.get_list("groupBy")
    assert request.url.params["windowSize"] == "DAY"
    assert request.headers["Authorization"] == "Bearer t0ken"
    if slug == "gpu-seconds":
        assert group_by == ["subject", "namespace", "gpu_model"]  # only keys the meter defines
        rows = [
            {
                "value": 7200,
                "windowStart": "2026-11-01T00:00:00Z",
                "windowEnd": "2026-11-02T00:00:00Z",
                "subject": "team-a",
                "groupBy": {"namespace": "a", "gpu_model": "NVIDIA-H200"},
            }
        ]
    else:
        assert group_by == ["subject"]
        rows = [
            {
                "value": 3600,
                "windowStart": "2026-11-01T00:00:00Z",
                "windowEnd": "2026-11-02T00:00:00Z",
                "subject": "team-a",
                "groupBy": {},
            }
        ]
    body = {"from": "2026-11-01T00:00:00Z", "to": "2026-11-02T00:00:00Z", "windowSize": "DAY", "data": rows}
    return httpx.Response(200, content=json.dumps(body), headers={"Content-Type": "application/json"})


def test_openmeter_meters_are_queried_per_day_grouped_by_what_each_defines() -> None:
    api = UsageApi("http://om", token="t0ken", transport=httpx.MockTransport(openmeter))
    rows = api.rows(Period())
    assert [(r.event_type, r.gpu_model, r.namespace, r.day, r.value) for r in rows] == [
        ("gpu-seconds", "NVIDIA-H200", "a", "2026-11-01", 7200.0),
        ("cpu-core-seconds", "", "", "2026-11-01", 3600.0),
    ]


def test_unauthorized_says_to_pass_a_token() -> None:
    api = UsageApi("http://om", kind="sink", transport=httpx.MockTransport(lambda r: httpx.Response(401)))
    with pytest.raises(UsageApiError, match="--token-file"):
        api.rows(Period())


def test_unreachable_says_to_check_the_url() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    api = UsageApi("http://nowhere:1", transport=httpx.MockTransport(refuse))
    with pytest.raises(UsageApiError, match="check --url"):
        api.rows(Period())

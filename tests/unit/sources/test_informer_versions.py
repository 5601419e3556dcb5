"""resourceVersions are opaque: only what the API server says about them is used."""

from __future__ import annotations

from kubemeter.sources.informer import (
    HEARTBEAT_MARGIN_MS,
    Informer,
    now_ms,
    oldest_kept_version,
    resource_version,
)


def test_the_oldest_kept_version_is_read_from_the_api_servers_410_message() -> None:
    # The Status message kube-apiserver's watch cache sends (storage/cacher/watch_cache.go).
    status = "{'type': 'ERROR', 'object': {'code': 410, 'message': 'too old resource version: 811 (5096)'}}"
    assert oldest_kept_version(status) == "5096"
    assert oldest_kept_version("Expired: The resourceVersion for the provided watch is too old.") is None


def test_resource_versions_are_kept_as_text() -> None:
    assert resource_version({"metadata": {"resourceVersion": "000123"}}) == "000123"
    assert resource_version({"metadata": {}}) is None


def quiet_informer(open_for_ms: int, gap: bool = False) -> Informer:
    informer = Informer(None, "/api/v1/pods", {}, lambda obj: "", "pods")  # type: ignore[arg-type]
    informer.healthy, informer.healthy_through_ms = True, 1
    informer._stream_open_since_ms = now_ms() - open_for_ms
    informer._gap_since_ms = 1 if gap else None
    return informer


def test_a_quiet_open_watch_moves_the_heartbeat_to_its_margin_before_now() -> None:
    informer = quiet_informer(open_for_ms=5_000)
    before_ms = now_ms()
    informer.heartbeat()
    # The last whole second before the margin, as the API server's timestamps count.
    assert informer.healthy_through_ms % 1000 == 0
    assert (
        before_ms - HEARTBEAT_MARGIN_MS - 1000 < informer.healthy_through_ms <= now_ms() - HEARTBEAT_MARGIN_MS
    )


def test_the_heartbeat_stays_while_a_gap_replays_or_the_stream_just_opened_or_is_closed() -> None:
    for informer in (quiet_informer(5_000, gap=True), quiet_informer(open_for_ms=0)):
        informer.heartbeat()
        assert informer.healthy_through_ms == 1
    closed = quiet_informer(5_000)
    closed._stream_open_since_ms = None
    closed.heartbeat()
    assert closed.healthy_through_ms == 1

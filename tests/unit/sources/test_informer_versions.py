"""resourceVersions are opaque: only what the API server says about them is used."""

from __future__ import annotations

from kubemeter.sources.informer import oldest_kept_version, resource_version


def test_the_oldest_kept_version_is_read_from_the_api_servers_410_message() -> None:
    # The Status message kube-apiserver's watch cache sends (storage/cacher/watch_cache.go).
    status = "{'type': 'ERROR', 'object': {'code': 410, 'message': 'too old resource version: 811 (5096)'}}"
    assert oldest_kept_version(status) == "5096"
    assert oldest_kept_version("Expired: The resourceVersion for the provided watch is too old.") is None


def test_resource_versions_are_kept_as_text() -> None:
    assert resource_version({"metadata": {"resourceVersion": "000123"}}) == "000123"
    assert resource_version({"metadata": {}}) is None

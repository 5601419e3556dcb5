"""Deterministic event ids: the same usage gets the same id wherever and however often it is emitted."""

from __future__ import annotations

import hashlib

_ID_VERSION = "kubemeter/1"


def event_id(cluster: str, meter: str, pod_uid: str, window_start_ms: int, part: str = "") -> str:
    """hash(cluster, meter, pod uid, part (container or device, "" for the whole pod), window start).

    The subject, value and dimensions are deliberately not hashed: a window re-emitted after a crash
    must collide with the first emission so the billing API drops it.
    """
    key = "\x1f".join((_ID_VERSION, cluster, meter, pod_uid, part, str(window_start_ms)))
    return hashlib.sha256(key.encode()).hexdigest()[:32]

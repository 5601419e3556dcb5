"""The agent's pieces without a cluster: CEL shaping, processors, selectors, checkpoints, kubelet folding."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from kubemeter.agent.checkpoint import CheckpointStore
from kubemeter.agent.meters import json_number, selector_matches
from kubemeter.api.common import LabelSelector
from kubemeter.api.pipeline import ProcessorSpec
from kubemeter.metering.windows import Window
from kubemeter.pipeline import CelError, EventShaper, Expression, compile_processors, run_processors
from kubemeter.sources.informer import CachedObject
from kubemeter.sources.kubelet import KubeletPoller, KubeletUsageSource, parse_summary

T0 = 1_700_000_000_000
VARIABLES = {
    "pod": {"metadata": {"name": "train-0", "labels": {"team": "vision"}, "annotations": {}}},
    "namespace": {"metadata": {"name": "ml", "labels": {"customer": "acme"}}},
    "node": {"metadata": {"name": "gpu-1"}},
}


def test_subject_comes_from_the_namespace_label() -> None:
    shaper = EventShaper(
        "m", "namespace.metadata.labels['customer']", None, {"team": "pod.metadata.labels.team"}
    )
    assert shaper.subject_for(VARIABLES) == ("acme", None)
    assert shaper.dimensions_for(VARIABLES) == ({"team": "vision"}, [])


def test_a_missing_subject_label_uses_the_fallback_or_is_flagged() -> None:
    assert EventShaper("m", "namespace.metadata.labels['nope']", "house", {}).subject_for(VARIABLES) == (
        "house",
        None,
    )
    subject, problem = EventShaper("m", "namespace.metadata.labels['nope']", None, {}).subject_for(VARIABLES)
    assert subject == "unknown" and problem is not None and "fallback" in problem


def test_invalid_cel_names_where_it_is() -> None:
    with pytest.raises(CelError, match=r"spec\.subject\.expression"):
        Expression("namespace.metadata.labels[", "meter m: spec.subject.expression")


def test_processors_run_in_order() -> None:
    processors = compile_processors(
        [
            ProcessorSpec(set={"tier": "event.data.value > 10 ? 'big' : 'small'"}),
            ProcessorSpec(rename={"tier": "size"}),
            ProcessorSpec(drop=["secret"]),
            ProcessorSpec(filter="event.data.size == 'big'"),
        ],
        "Pipeline p",
    )
    big = {"id": "1", "data": {"value": 20, "secret": "x"}}
    assert run_processors(processors, big) == {"id": "1", "data": {"value": 20, "size": "big"}}
    assert run_processors(processors, {"id": "2", "data": {"value": 1}}) is None


def test_label_selectors_match_like_kubernetes() -> None:
    selector = LabelSelector.model_validate(
        {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "NotIn", "values": ["x"]}]}
    )
    assert selector_matches(selector, {"a": "1"})
    assert not selector_matches(selector, {"a": "1", "b": "x"})
    assert not selector_matches(selector, {"a": "2"})
    assert selector_matches(None, {})


def test_values_are_json_numbers_with_their_exact_text() -> None:
    assert json_number(Decimal("7.000000")) == 7 and isinstance(json_number(Decimal("7.000000")), int)
    assert repr(json_number(Decimal("0.123456789"))) == "0.123456789"


async def test_checkpoint_survives_reopening_with_the_watch_resume_point(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.start_meter("m", T0)
    await store.commit_window("m", T0 + 10_000, ["uid-1"], {"k": 1})
    pods = {"uid-1": CachedObject({"metadata": {"uid": "uid-1", "resourceVersion": "5"}})}
    saved: dict[str, str] = {}
    await store.save_watch(store.changed_pods(pods, saved, "0005", T0), saved)
    assert store.changed_pods(pods, saved, "0005", T0).rows == []  # saved once, not again
    store.close()
    reopened = CheckpointStore(tmp_path)
    assert reopened.meter("m") == (T0 + 10_000, {"k": 1})
    assert reopened.emitted_through_ms("m", "uid-1") == T0 + 10_000
    loaded, versions = reopened.load_pods()
    assert set(loaded) == {"uid-1"}
    assert reopened.changed_pods(loaded, versions, "0005", T0).rows == []  # a restart re-saves nothing
    assert reopened.resume_point() == "0005"  # opaque text, kept as given
    assert reopened.last_heartbeat_ms() == T0
    reopened.close()


def rfc3339_ms(moment_ms: int) -> str:
    return (
        datetime.fromtimestamp(moment_ms / 1000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def summary(uid: str, time_ms: int, cpu_ns: int) -> dict[str, tuple[str, str, Any]]:
    pod = {
        "podRef": {"name": "p", "namespace": "n", "uid": uid},
        "startTime": rfc3339_ms(T0),
        "cpu": {"time": rfc3339_ms(time_ms), "usageCoreNanoSeconds": cpu_ns},
    }
    return dict(parse_summary(json.dumps({"pods": [pod]})))


def test_kubelet_cpu_counter_with_a_reset_adds_up_exactly() -> None:
    poller = KubeletPoller(1000, lambda: "", lambda: None)
    source = KubeletUsageSource("cpu", 10_000, 1000, T0, poller)
    for time_ms, value in [(T0 + 1_000, 1_000_000), (T0 + 2_000, 2_000_000), (T0 + 3_000, 500_000)]:
        source.ingest(summary("u", time_ms, value), time_ms)
    (reading,) = source.readings(Window(T0, T0 + 10_000), {})
    # 1 ms of core-time to the first read, +1 ms, then a reset worth 0.5 ms
    assert reading.value == Decimal("0.0025") and reading.complete


def test_garbage_from_the_kubelet_is_an_error_that_says_so() -> None:
    with pytest.raises(Exception, match="not the expected JSON"):
        parse_summary("{not json")

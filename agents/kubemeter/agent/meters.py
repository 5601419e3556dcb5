"""One meter at work: close its windows, turn readings into events, write them, move the cursor."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from kubemeter.agent.checkpoint import CheckpointStore
from kubemeter.agent.sources import build_source as build_source  # the map of spec.source to modules
from kubemeter.agent.telemetry import Telemetry
from kubemeter.api.common import LabelSelector
from kubemeter.api.rendered import ResolvedMeter
from kubemeter.events import UsageEvent, format_rfc3339
from kubemeter.metering.ids import event_id
from kubemeter.metering.windows import Window, window_containing, windows_between
from kubemeter.output import EventOutput, OutputFullError
from kubemeter.pipeline import EventShaper, compile_processors, run_processors
from kubemeter.pipeline.processors import Processor
from kubemeter.sources.base import PodRecord, Reading, Source
from kubemeter.sources.informer import Backoff, Informer, now_ms
from kubemeter.sources.kube import KubeApi

log = logging.getLogger(__name__)

# A window closes this long after its end, so the last status updates of its pods have arrived.
SETTLE_MS = 3_000
# A source that is behind holds its windows back this many windows, then they close flagged.
MAX_HOLD_WINDOWS = 2


def json_number(value: Decimal) -> int | float:
    """An exact decimal as a JSON number: an int when whole, else the float whose shortest text is
    that decimal (exact below 15 significant digits, which covers every realistic window)."""
    return int(value) if value == value.to_integral_value() else float(value)


def selector_matches(selector: LabelSelector | None, labels: Mapping[str, str]) -> bool:
    if selector is None:
        return True
    if any(labels.get(key) != value for key, value in selector.match_labels.items()):
        return False
    for requirement in selector.match_expressions:
        present = requirement.key in labels
        value = labels.get(requirement.key)
        operator = requirement.operator.value
        if operator == "In" and value not in requirement.values:
            return False
        if operator == "NotIn" and present and value in requirement.values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


class World:
    """What every meter sees of this node: its pods, the namespaces, the node object."""

    def __init__(
        self,
        cluster: str,
        node_name: str,
        pods: Informer,
        namespaces: Informer,
        api: KubeApi | None = None,
    ) -> None:
        self.cluster = cluster
        self.node_name = node_name
        self.pods = pods
        self.namespaces = namespaces
        self.api = api
        # Watches several meters' sources share (the node's ResourceSlices, its node history), by name.
        self.shared: dict[str, Any] = {}
        self.node: dict[str, Any] = {"metadata": {"name": node_name}}

    def namespace(self, name: str) -> dict[str, Any]:
        cached = self.namespaces.objects.get(name)
        return cached.object if cached else {"metadata": {"name": name, "labels": {}, "annotations": {}}}


class MeterRunner:
    def __init__(
        self,
        meter: ResolvedMeter,
        source: Source,
        world: World,
        store: CheckpointStore,
        output: EventOutput,
        telemetry: Telemetry,
        tick_s: float,
    ) -> None:
        self.world = world
        self.store = store
        self.output = output
        self.telemetry = telemetry
        self.tick_s = tick_s
        self.source = source
        self.configure(meter)
        saved = store.meter(meter.uid)
        if saved is None:
            # A new meter starts with the window it was first loaded in, and only then.
            store.start_meter(meter.uid, window_containing(now_ms(), self.window_ms).start_ms)
            saved = store.meter(meter.uid)
            assert saved is not None
        self.cursor_ms, source_state = saved
        source.restore(source_state)
        self.last_error: str | None = None

    def configure(self, meter: ResolvedMeter) -> None:
        """Take a changed spec; it applies from the next window that closes (cursor unchanged)."""
        where = f"Meter {meter.namespace}/{meter.name}"
        self.meter = meter
        self.key = meter.uid
        self.window_ms = meter.spec.window_seconds * 1000
        self.shaper = EventShaper(
            where, meter.spec.subject.expression, meter.spec.subject.fallback, meter.spec.dimensions
        )
        self.processors: list[Processor] = compile_processors(meter.processors, f"Pipeline {meter.pipeline}")

    @property
    def name(self) -> str:
        return f"{self.meter.namespace}/{self.meter.name}"

    def horizon_ms(self, moment_ms: int) -> int:
        """Windows ending at or before this may close now."""
        settled_ms = moment_ms - SETTLE_MS
        # Every meter reads the pod cache (which pods, their labels), so none closes past its barrier.
        observed_ms = min(self.source.observed_through_ms(), self.world.pods.consistent_through_ms)
        if observed_ms >= settled_ms:
            return settled_ms
        # The source is behind: hold windows until it catches up, but not forever.
        limit_ms = self.source.hold_limit_ms
        hold_ms = MAX_HOLD_WINDOWS * self.window_ms if limit_ms is None else limit_ms
        return max(observed_ms, settled_ms - hold_ms)

    async def run(self) -> None:
        source_task = asyncio.create_task(self.source.run(), name=f"source {self.name}")
        backoff = Backoff(initial_s=0.5, max_s=30)
        try:
            while True:
                try:
                    await self.close_due_windows()
                    self.last_error = None
                    backoff.reset()
                    await asyncio.sleep(self.tick_s)
                except asyncio.CancelledError:
                    raise
                except OutputFullError as error:
                    self.last_error = f"output full: {error}"
                    await asyncio.sleep(backoff.next_delay_s())
                except Exception as error:  # one meter's failure must not stop the others
                    self.last_error = f"{type(error).__name__}: {error}"
                    self.telemetry.source_error(f"meter:{self.name}", error)
                    log.exception("meter %s failed; retrying", self.name)
                    await asyncio.sleep(backoff.next_delay_s())
        finally:
            source_task.cancel()

    async def close_due_windows(self) -> None:
        moment_ms = now_ms()
        settled_ms = moment_ms - SETTLE_MS
        if self.cursor_ms + self.window_ms <= settled_ms:
            # A window is due: first make the pod cache provably current through it (one shared LIST).
            await self.world.pods.catch_up(settled_ms)
            self.telemetry.pod_watch(self.world.pods)
        horizon_ms = self.horizon_ms(moment_ms)
        for window in windows_between(self.cursor_ms, horizon_ms, self.window_ms):
            await self.close_window(window)
        self.telemetry.lag(self.name, (moment_ms - self.cursor_ms) / 1000)

    def selected_pods(self) -> dict[str, PodRecord]:
        selection = self.meter.spec.pods
        chosen: dict[str, PodRecord] = {}
        for uid, record in self.world.pods.objects.items():
            metadata = record.object.get("metadata") or {}
            namespace = metadata.get("namespace", "")
            if selection.namespaces and namespace not in selection.namespaces:
                continue
            if selection.namespace_selector is not None:
                labels = self.world.namespace(namespace).get("metadata", {}).get("labels") or {}
                if not selector_matches(selection.namespace_selector, labels):
                    continue
            if not selector_matches(selection.selector, metadata.get("labels") or {}):
                continue
            chosen[uid] = record
        return chosen

    async def close_window(self, window: Window) -> None:
        pods = self.selected_pods()
        readings = [
            r for r in self.source.readings(window, pods) if r.pod_uid in pods or r.subject is not None
        ]
        events = [
            event
            for reading in readings
            if (event := self.to_event(reading, pods.get(reading.pod_uid), window))
        ]
        if events:
            await self.output.write(events)  # returns only once they are on disk
        await self.store.commit_window(
            self.key,
            window.end_ms,
            {r.pod_uid for r in readings if r.pod_uid in pods},
            self.source.snapshot(),
        )
        self.source.committed(window)
        self.cursor_ms = window.end_ms
        self.telemetry.window_closed(self.name, len(events), sum(not r.complete for r in readings))

    def to_event(self, reading: Reading, record: PodRecord | None, window: Window) -> UsageEvent | None:
        """The event of a pod's reading, or of a node-level one (``record`` None, subject given)."""
        pod = record.object if record is not None else {}
        metadata = pod.get("metadata") or {}
        variables = {
            "pod": {"metadata": metadata, "spec": pod.get("spec") or {}},
            "namespace": {
                "metadata": self.world.namespace(metadata.get("namespace", "")).get("metadata", {})
            },
            "node": {"metadata": self.world.node.get("metadata") or {}},
        }
        subject, subject_problem = self.shaper.subject_for(variables)
        if reading.subject is not None:
            subject, subject_problem = reading.subject, None
        dimensions, _problems = self.shaper.dimensions_for(variables)
        reasons = [r for r in (reading.incomplete_reason, subject_problem) if r]
        data: dict[str, Any] = {
            **reading.dimensions,  # what the source knows (GPU model, Run:ai project); the Meter's win
            **dimensions,
            "value": json_number(reading.value),
            "unit": self.meter.spec.unit,
            "window_start": format_rfc3339(datetime.fromtimestamp(window.start_ms / 1000, UTC)),
            "window_end": format_rfc3339(datetime.fromtimestamp(window.end_ms / 1000, UTC)),
            "namespace": metadata.get("namespace", ""),
            "pod": metadata.get("name", ""),
            "node": self.world.node_name,
            "complete": not reasons,
        }
        if reasons:
            data["incomplete_reason"] = "; ".join(reasons)
        if reading.part:
            data["part"] = reading.part
        event = {
            "specversion": "1.0",
            "id": event_id(self.world.cluster, self.key, reading.pod_uid, window.start_ms, reading.part),
            "source": f"kubemeter/{self.world.cluster}",
            "type": self.meter.spec.event_type,
            "subject": subject,
            "time": datetime.fromtimestamp(window.end_ms / 1000, UTC),
            "datacontenttype": "application/json",
            "data": data,
        }
        shaped = run_processors(self.processors, event)
        return None if shaped is None else UsageEvent.model_validate(shaped)

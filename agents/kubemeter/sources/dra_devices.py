"""What the agent knows of DRA on its node: the node's ResourceSlices and its pods' ResourceClaims.

Node-scoped, as the kubelet is: ResourceSlices are watched with ``fieldSelector=spec.nodeName=<node>``
(the devices this node publishes), and each claim a pod of this node uses is read by name
(``GET .../namespaces/<ns>/resourceclaims/<name>``) once the pod is bound, never listed cluster-wide.
A claim's allocation cannot change while it is reserved, so one read per pod and claim is enough;
the result is kept (and saved with the meters' cursors) after the claim is deleted.

One instance per agent, shared by every ``dra`` and ``idle`` meter (:func:`shared_node_devices`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubemeter.metering.dra import (
    ClaimAllocation,
    DeviceRef,
    PublishedDevice,
    claim_allocation,
    pod_claim_names,
    slice_devices_current,
)
from kubemeter.metering.intervals import Interval
from kubemeter.metering.pods import parse_time_ms
from kubemeter.sources.allocation import held_interval
from kubemeter.sources.base import SharedPoller
from kubemeter.sources.informer import Informer, now_ms
from kubemeter.sources.kube import KubeApi, KubeApiError

if TYPE_CHECKING:
    from kubemeter.agent.meters import World

log = logging.getLogger(__name__)

RESOURCE_API = "/apis/resource.k8s.io/v1"


@dataclass(frozen=True)
class Unresolved:
    """A pod whose claims can no longer be read (deleted before the agent saw them allocated)."""

    reason: str


PodClaims = list[ClaimAllocation] | Unresolved


def slice_key(obj: Mapping[str, Any]) -> str:
    return str(obj["metadata"]["name"])


class NodeDevices(SharedPoller):
    def __init__(
        self,
        api: KubeApi,
        node_name: str,
        pods: Informer,
        poll_interval_s: float,
        on_error: Callable[[str, BaseException], None] = lambda source, error: None,
    ) -> None:
        super().__init__(poll_interval_s, on_error)
        self.api = api
        self.pods = pods
        self.slices = Informer(
            api,
            f"{RESOURCE_API}/resourceslices",
            {"fieldSelector": f"spec.nodeName={node_name}"},
            slice_key,
            "resourceslices",
            on_error=on_error,
        )
        self.pod_claims: dict[str, PodClaims] = {}
        # Pods seen on this node that a kept claim is reserved for (a finished holder of a shared
        # claim the pod cache has forgotten is still this node's, not another node's).
        self.local_uids: set[str] = set()
        # Every device the node's slices published, with the moment it appeared and (once it is no
        # longer published) the moment it went: the capacity an idle meter counts.
        self.published: dict[DeviceRef, PublishedDevice] = {}
        self.presence: dict[DeviceRef, Interval] = {}
        self.observed_ms = 0

    # ---- lifetime: started by the first meter that needs it, stopped with the last --------------
    task_name = "dra devices"
    error_source = "dra"

    async def poll_forever(self) -> None:
        watch = asyncio.create_task(self.slices.run(), name="resourceslice watch")
        try:
            await self.slices.synced.wait()
            await super().poll_forever()
        finally:
            watch.cancel()

    async def poll(self) -> None:
        await self.refresh()

    # ---- one pass ---------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Read the claims of pods not resolved yet; advance ``observed_ms`` if none is left."""
        started_ms = now_ms()
        pods_consistent_ms = self.pods.consistent_through_ms
        self._track_published(started_ms)
        pending = 0
        for uid, record in list(self.pods.objects.items()):
            if uid in self.pod_claims:
                continue
            if not await self._resolve(uid, record.object, held_interval(record)[0].end_ms is not None):
                pending += 1
        for uid in list(self.pod_claims):
            if uid not in self.pods.objects:
                del self.pod_claims[uid]  # the agent forgot the pod: every window of it is written
        reserved = {
            uid
            for claims in self.pod_claims.values()
            if not isinstance(claims, Unresolved)
            for claim in claims
            for uid in claim.reserved_for
        }
        self.local_uids = (self.local_uids | set(self.pods.objects)) & reserved
        if pending == 0 and self.slices.healthy:
            self.observed_ms = max(self.observed_ms, min(started_ms, pods_consistent_ms))
            self.last_error = None
        elif not self.slices.healthy:
            self.last_error = f"ResourceSlice watch down: {self.slices.last_error}"

    async def _resolve(self, uid: str, pod: Mapping[str, Any], ended: bool) -> bool:
        names = pod_claim_names(pod)
        if names is None:
            if ended:
                self.pod_claims[uid] = Unresolved("the pod ended before its ResourceClaim was named")
                return True
            return False
        namespace = (pod.get("metadata") or {}).get("namespace", "")
        claims: list[ClaimAllocation] = []
        for name in names:
            try:
                claim = await self.api.get(f"{RESOURCE_API}/namespaces/{namespace}/resourceclaims/{name}")
            except KubeApiError as error:
                if error.status == 404:
                    self.pod_claims[uid] = Unresolved(
                        f"ResourceClaim {namespace}/{name} was deleted before the agent read its allocation"
                    )
                    return True
                self.last_error = str(error)
                self.on_error("dra", error)
                return False
            allocation = claim_allocation(claim)
            if allocation is None or (uid not in allocation.reserved_for and not ended):
                if ended:
                    self.pod_claims[uid] = Unresolved(
                        f"ResourceClaim {namespace}/{name} was released before the agent read its allocation"
                    )
                    return True
                return False  # not reserved for the pod yet: read again on the next pass
            claims.append(allocation)
        self.pod_claims[uid] = claims
        return True

    def _track_published(self, moment_ms: int) -> None:
        live = [cached.object for cached in self.slices.objects.values() if cached.deleted_at_ms is None]
        current = slice_devices_current(live)
        created = {
            (
                str((s.get("spec") or {}).get("driver")),
                str(((s.get("spec") or {}).get("pool") or {}).get("name")),
            ): (parse_time_ms(s["metadata"]["creationTimestamp"]))
            for s in live
            if (s.get("metadata") or {}).get("creationTimestamp")
        }
        for ref, device in current.items():
            self.published[ref] = device
            known = self.presence.get(ref)
            if known is None or known.end_ms is not None:
                # Published since its slice was created (the API's own time), or, returning, from now.
                start_ms = created.get((ref.driver, ref.pool), moment_ms) if known is None else moment_ms
                self.presence[ref] = Interval(min(start_ms, moment_ms), None)
        for ref, interval in self.presence.items():
            if interval.end_ms is None and ref not in current:
                self.presence[ref] = Interval(interval.start_ms, max(interval.start_ms, moment_ms))

    # ---- what meters ask ----------------------------------------------------------------------------
    def holders(self, device: DeviceRef) -> dict[str, Interval]:
        """Pods of this node holding ``device`` (through any claim), with the interval each holds it."""
        found: dict[str, Interval] = {}
        for uid, claims in self.pod_claims.items():
            record = self.pods.objects.get(uid)
            if record is None or isinstance(claims, Unresolved):
                continue
            if any(device in claim.devices for claim in claims):
                found[uid] = held_interval(record)[0]
        return found

    def foreign_holders(self, claim: ClaimAllocation) -> set[str]:
        """Pods the claim is reserved for that are not on this node (a network-attached device)."""
        return set(claim.reserved_for) - set(self.pods.objects) - self.local_uids

    def fault(self) -> str | None:
        return self.last_error

    def snapshot(self) -> dict[str, Any]:
        return {
            "observed_ms": self.observed_ms,
            "pod_claims": {
                uid: (
                    {"unresolved": claims.reason}
                    if isinstance(claims, Unresolved)
                    else [c.to_json() for c in claims]
                )
                for uid, claims in self.pod_claims.items()
            },
            "local_uids": sorted(self.local_uids),
            "presence": [
                [ref.driver, ref.pool, ref.device, i.start_ms, i.end_ms] for ref, i in self.presence.items()
            ],
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.observed_ms = max(self.observed_ms, int(state.get("observed_ms", 0)))
        for uid, data in (state.get("pod_claims") or {}).items():
            self.pod_claims.setdefault(
                uid,
                Unresolved(data["unresolved"])
                if isinstance(data, dict)
                else [ClaimAllocation.from_json(c) for c in data],
            )
        self.local_uids |= set(state.get("local_uids") or [])
        for driver, pool, device, start_ms, end_ms in state.get("presence") or []:
            self.presence.setdefault(DeviceRef(driver, pool, device), Interval(start_ms, end_ms))


def shared_node_devices(
    world: World, poll_interval_s: float, on_error: Callable[[str, BaseException], None]
) -> NodeDevices:
    """The agent's one :class:`NodeDevices`, made by the first meter that asks."""
    found = world.shared.get("dra")
    if found is None:
        if world.api is None:
            raise ValueError("the agent has no Kubernetes API client for DRA; this is a defect")
        found = world.shared["dra"] = NodeDevices(
            world.api, world.node_name, world.pods, min(poll_interval_s, 0.5), on_error
        )
    assert isinstance(found, NodeDevices)
    return found

"""The pure rules behind the dra and idle sources and basis maxRequestUsage, with exact numbers."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

from kubemeter.metering.capacity import (
    CORDONED,
    SCHEDULABLE,
    Holding,
    NodeSegment,
    held_outside_segments_milli_ms,
    idle_by_state,
    observe,
    removed,
)
from kubemeter.metering.dra import (
    DeviceRef,
    claim_allocation,
    pod_claim_names,
    slice_devices_current,
)
from kubemeter.metering.intervals import Interval
from kubemeter.metering.sharing import covered_ms, largest_remainder, split_among_holders, union_of
from kubemeter.metering.usage_basis import larger_of_request_and_usage
from kubemeter.metering.windows import Window

W = Window(60_000, 120_000)


def test_a_device_held_alone_is_billed_whole_for_the_time_held() -> None:
    assert split_among_holders({"a": Interval(65_000, 72_000)}, W) == {"a": 7_000_000}


def test_a_shared_device_is_split_equally_among_the_pods_holding_it_at_each_instant() -> None:
    # a alone 60-70 s, a and b together 70-90 s, b alone 90-100 s, nobody 100-120 s
    shares = split_among_holders({"a": Interval(50_000, 90_000), "b": Interval(70_000, 100_000)}, W)
    assert shares == {"a": 10_000_000 + 10_000_000, "b": 10_000_000 + 10_000_000}
    assert sum(shares.values()) == 1000 * covered_ms(
        {"a": Interval(50_000, 90_000), "b": Interval(70_000, 100_000)}, W
    )


def test_three_holders_get_integer_shares_that_add_up_exactly() -> None:
    holders = {"a": Interval(60_000, 60_001), "b": Interval(60_000, 60_001), "c": Interval(60_000, 60_001)}
    shares = split_among_holders(holders, W)
    assert sum(shares.values()) == 1000  # one millisecond of one device
    assert sorted(shares.values()) == [333, 333, 334]
    assert largest_remainder({"x": Fraction(1, 2), "y": Fraction(1, 2)}) == {"x": 1, "y": 0}


def test_an_open_holding_runs_to_the_window_end_and_union_merges_overlaps() -> None:
    assert split_among_holders({"a": Interval(110_000, None)}, W) == {"a": 10_000_000}
    assert union_of([Interval(1, 5), Interval(3, 9), Interval(20, None), Interval(25, 30)]) == [
        Interval(1, 9),
        Interval(20, None),
    ]


def test_idle_plus_held_is_allocatable_times_the_time_present_in_each_state() -> None:
    # 8 GPUs; cordoned at 90 s; removed at 110 s. Pods hold 2 GPUs 60-100 s and 1 GPU 80-95 s.
    segments = removed(observe(observe([], 30_000, 8_000, SCHEDULABLE), 90_000, 8_000, CORDONED), 110_000)
    holdings = [Holding(Interval(60_000, 100_000), 2_000), Holding(Interval(80_000, 95_000), 1_000)]
    shares = idle_by_state(segments, holdings, W)
    assert shares[SCHEDULABLE].capacity_milli_ms == 8_000 * 30_000
    assert shares[SCHEDULABLE].held_milli_ms == 2_000 * 30_000 + 1_000 * 10_000
    assert shares[CORDONED].capacity_milli_ms == 8_000 * 20_000
    assert shares[CORDONED].held_milli_ms == 2_000 * 10_000 + 1_000 * 5_000
    for share in shares.values():
        assert share.idle_milli_ms + share.held_milli_ms == share.capacity_milli_ms
    assert held_outside_segments_milli_ms(segments, holdings, W) == 0


def test_a_pod_held_after_its_node_was_removed_is_reported() -> None:
    segments = removed(observe([], 0, 4_000, SCHEDULABLE), 100_000)
    holdings = [Holding(Interval(90_000, 105_000), 1_000)]
    assert held_outside_segments_milli_ms(segments, holdings, W) == 5_000_000
    assert idle_by_state(segments, holdings, W)[SCHEDULABLE].idle_milli_ms == 4_000 * 40_000 - 10_000_000


def test_an_unchanged_node_extends_its_segment_and_a_change_starts_a_new_one() -> None:
    segments = observe([], 0, 8_000, SCHEDULABLE)
    assert observe(segments, 5_000, 8_000, SCHEDULABLE) == segments
    assert observe(segments, 5_000, 7_000, SCHEDULABLE) == [
        NodeSegment(0, 5_000, 8_000),
        NodeSegment(5_000, None, 7_000),
    ]


def test_max_request_usage_bills_the_larger_and_flags_missing_usage() -> None:
    assert larger_of_request_and_usage(Decimal("5"), Decimal("7.25")).value == Decimal("7.25")
    request_wins = larger_of_request_and_usage(Decimal("5"), Decimal("1"))
    assert (request_wins.value, request_wins.basis, request_wins.complete) == (Decimal("5"), "request", True)
    missing = larger_of_request_and_usage(Decimal("5"), None)
    assert (missing.value, missing.complete) == (Decimal("5"), False)
    assert missing.incomplete_reason and "billed the request alone" in missing.incomplete_reason


def test_claims_from_templates_are_named_in_the_pod_status() -> None:
    pod = {
        "spec": {
            "resourceClaims": [
                {"name": "gpu", "resourceClaimTemplateName": "one-gpu"},
                {"name": "shared", "resourceClaimName": "team-gpu"},
            ]
        },
        "status": {},
    }
    assert pod_claim_names(pod) is None  # the controller has not made the claim yet
    pod["status"] = {"resourceClaimStatuses": [{"name": "gpu", "resourceClaimName": "p-gpu-x7k2"}]}
    assert pod_claim_names(pod) == ["p-gpu-x7k2", "team-gpu"]
    assert pod_claim_names({"spec": {}}) == []


def test_a_claim_allocation_leaves_out_admin_access_and_keeps_pod_reservations() -> None:
    claim = {
        "metadata": {"namespace": "ns", "name": "c", "uid": "u"},
        "status": {
            "allocation": {
                "devices": {
                    "results": [
                        {"request": "gpu", "driver": "gpu.nvidia.com", "pool": "n1", "device": "gpu-1"},
                        {
                            "request": "mon",
                            "driver": "gpu.nvidia.com",
                            "pool": "n1",
                            "device": "gpu-0",
                            "adminAccess": True,
                        },
                    ]
                }
            },
            "reservedFor": [{"resource": "pods", "name": "p", "uid": "pod-1"}],
        },
    }
    allocation = claim_allocation(claim)
    assert allocation is not None
    assert allocation.devices == (DeviceRef("gpu.nvidia.com", "n1", "gpu-1"),)
    assert allocation.reserved_for == frozenset({"pod-1"})
    assert claim_allocation({"metadata": {}, "status": {}}) is None


def test_slice_attributes_are_qualified_by_the_driver_and_only_the_newest_pool_generation_counts() -> None:
    def slice_of(generation: int, device: str) -> dict[str, object]:
        return {
            "metadata": {"name": f"s{generation}"},
            "spec": {
                "driver": "gpu.nvidia.com",
                "pool": {"name": "node-a", "generation": generation, "resourceSliceCount": 1},
                "nodeName": "node-a",
                "devices": [
                    {
                        "name": device,
                        "attributes": {
                            "type": {"string": "mig"},
                            "productName": {"string": "NVIDIA A100-SXM4-80GB"},
                            "profile": {"string": "1g.10gb"},
                            "example.com/rack": {"int": 7},
                        },
                        "capacity": {"memory": {"value": "10Gi"}},
                    }
                ],
            },
        }

    devices = slice_devices_current([slice_of(1, "old"), slice_of(2, "gpu-0-mig-19-0-1")])
    (device,) = devices.values()
    assert device.ref == DeviceRef("gpu.nvidia.com", "node-a", "gpu-0-mig-19-0-1")
    view = device.cel_view()
    assert view["attributes"]["gpu.nvidia.com"]["profile"] == "1g.10gb"
    assert view["attributes"]["example.com"]["rack"] == 7
    assert view["capacity"]["gpu.nvidia.com"]["memory"] == "10Gi"
    assert device.dimensions() == {
        "driver": "gpu.nvidia.com",
        "pool": "node-a",
        "device": "gpu-0-mig-19-0-1",
        "gpu_model": "NVIDIA A100-SXM4-80GB",
        "mig_profile": "1g.10gb",
    }


def test_a_device_class_selector_picks_mig_devices_and_an_error_counts_the_device_flagged() -> None:
    from kubemeter.metering.dra import PublishedDevice
    from kubemeter.sources.dra import DeviceFilter

    ref = DeviceRef("gpu.nvidia.com", "node-a", "gpu-0-mig-19-0-1")
    mig = PublishedDevice(ref, {"gpu.nvidia.com": {"type": "mig", "profile": "1g.10gb"}}, {})
    whole = PublishedDevice(ref, {"gpu.nvidia.com": {"type": "gpu"}}, {})
    selector = DeviceFilter("gpu.nvidia.com", "device.attributes['gpu.nvidia.com'].type == 'mig'", "t")
    assert selector.matches(ref, mig) == (True, None)
    assert selector.matches(ref, whole) == (False, None)
    assert DeviceFilter("other.example.com", None, "t").matches(ref, mig) == (False, None)
    chosen, doubt = DeviceFilter(None, "device.attributes['gpu.nvidia.com'].profile == '1g'", "t").matches(
        ref, whole
    )
    assert chosen and doubt and "profile" in doubt and "the device is counted" in doubt

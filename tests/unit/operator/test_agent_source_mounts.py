"""What the agent DaemonSet gives the GPU and external sources: host /proc, PodResources, Secrets, and
only to a Collector whose Meters read NVML."""

from __future__ import annotations

from kubemeter.api.collector import CollectorSpec
from kubemeter.api.rendered import HOST_PROC_DIR
from kubemeter_operator.builders.agent import get_agent_daemonset
from kubemeter_operator.builders.common import CollectorRef
from kubemeter_operator.settings import OperatorSettings

REF = CollectorRef(namespace="billing", name="chargeback", uid="uid-c")
SPEC = CollectorSpec.model_validate({"output": {"type": "openmeter", "url": "http://om"}})


def test_nvml_sees_host_pids_through_a_read_only_host_proc_without_host_pid() -> None:
    daemonset = get_agent_daemonset(REF, SPEC, OperatorSettings(), ["prom-auth"], needs_pod_resources=True)
    pod = daemonset["spec"]["template"]["spec"]
    mounts = {mount["name"]: mount for mount in pod["containers"][0]["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert mounts["host-proc"] == {"name": "host-proc", "mountPath": HOST_PROC_DIR, "readOnly": True}
    assert volumes["host-proc"]["hostPath"] == {"path": "/proc", "type": "Directory"}
    assert "hostPID" not in pod
    assert mounts["pod-resources"]["readOnly"] is True
    assert mounts["secret-prom-auth"] == {
        "name": "secret-prom-auth",
        "mountPath": "/etc/kubemeter/secrets/prom-auth",
        "readOnly": True,
    }


def test_without_an_nvml_meter_neither_host_proc_nor_pod_resources_is_mounted() -> None:
    pod = get_agent_daemonset(REF, SPEC, OperatorSettings(), ["prom-auth"])["spec"]["template"]["spec"]
    volumes = {volume["name"] for volume in pod["volumes"]}
    assert volumes == {"config", "state", "kube-api-access", "secret-prom-auth"}
    env = {item["name"] for item in pod["containers"][0]["env"]}
    assert "NVIDIA_VISIBLE_DEVICES" not in env

"""/proc/<pid>/cgroup in every layout Kubernetes nodes use yields the pod UID."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubemeter.sources.nvml.cgroups import PidToPod, pod_uid_from_cgroup_file

UID = "8a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"
UID_ = UID.replace("-", "_")
CID = "0f" * 32


@pytest.mark.parametrize(
    "content",
    [
        # cgroup v1, cgroupfs driver, containerd: one line per hierarchy
        f"12:memory:/kubepods/burstable/pod{UID}/{CID}\n11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{CID}\n"
        f"1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n",
        # cgroup v1, cgroupfs, Guaranteed QoS (no QoS segment)
        f"4:devices:/kubepods/pod{UID}/{CID}\n",
        # cgroup v1, systemd driver, containerd
        f"9:pids:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
        f"cri-containerd-{CID}.scope\n",
        # cgroup v2, systemd driver, containerd
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
        f"cri-containerd-{CID}.scope\n",
        # cgroup v2, systemd driver, CRI-O, nested container leaf
        f"0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope/container\n",
        # cgroup v2, CRI-O conmon
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{CID}.scope\n",
        # cgroup v2, cgroupfs driver
        f"0::/kubepods/besteffort/pod{UID}/{CID}\n",
        # kind / --cgroup-root prefix
        f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
        # the agent in its own cgroup namespace sees a relative path
        f"0::/../../../kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
    ],
)
def test_every_cgroup_layout_names_the_pod(content: str) -> None:
    assert pod_uid_from_cgroup_file(content) == UID


@pytest.mark.parametrize(
    "content",
    [
        "0::/system.slice/nvidia-persistenced.service\n",
        "0::/user.slice/user-1000.slice/session-3.scope\n",
        "0::/kubepods.slice/kubepods-burstable.slice\n",
        "",
    ],
)
def test_processes_outside_pods_are_unattributed(content: str) -> None:
    assert pod_uid_from_cgroup_file(content) is None


def test_pid_mapping_reads_the_host_proc_and_tolerates_exited_processes(tmp_path: Path) -> None:
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "cgroup").write_text(f"0::/kubepods/pod{UID}/{CID}\n")
    mapper = PidToPod(tmp_path)
    assert mapper.pod_uid(4242) == UID
    assert mapper.pod_uid(999) is None

"""``/proc/<pid>/cgroup`` → the pod UID of the process that NVML reports.

NVML returns host PIDs (the driver ignores PID namespaces), so the agent reads the host's
``/proc/<pid>/cgroup`` (``hostPID: true`` or a hostPath mount of ``/proc``). Every layout seen in
practice carries ``pod<uid>`` somewhere in the path:

- cgroup v1, cgroupfs driver: ``/kubepods/burstable/pod<uid-with-dashes>/<container id>``
- systemd driver (v1 or v2): ``/kubepods.slice/kubepods-burstable.slice/
  kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope`` (``crio-<id>.scope``
  for CRI-O, ``docker-<id>.scope`` for cri-dockerd)
- a ``--cgroup-root`` prefix (kind: ``/kubelet.slice/kubelet-kubepods.slice/...``) or a path relative
  to the agent's own cgroup namespace (``0::/../../kubepods-...``)

so the UID is matched, not the path reconstructed (the same rule dcgm-exporter uses).
"""

from __future__ import annotations

import re
from pathlib import Path

# A UID is 32 hex digits in 8-4-4-4-12 groups, written with '-' (cgroupfs) or '_' (systemd).
_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?![0-9a-f])"
)


def pod_uid_from_cgroup_path(path: str) -> str | None:
    """The pod UID in one cgroup path, with dashes, or None for a process outside any pod."""
    match = _POD_UID.search(path.lower())
    return match.group(1).replace("_", "-") if match else None


def pod_uid_from_cgroup_file(text: str) -> str | None:
    """The pod UID in the content of ``/proc/<pid>/cgroup`` (v1: ``N:controllers:path`` lines, one
    per hierarchy; v2: the single ``0::path`` line). The first hierarchy that names a pod wins: all
    of a container's hierarchies name the same pod."""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        uid = pod_uid_from_cgroup_path(parts[2])
        if uid is not None:
            return uid
    return None


class PidToPod:
    """Maps host PIDs to pod UIDs by reading ``<proc_root>/<pid>/cgroup``.

    Built fresh for every sampling pass: PIDs are reused, so a cached mapping would, sooner or later,
    bill one pod's GPU time to another.
    """

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self._proc_root = proc_root
        self._seen: dict[int, str | None] = {}

    def pod_uid(self, pid: int) -> str | None:
        if pid not in self._seen:
            try:
                text = (self._proc_root / str(pid) / "cgroup").read_text()
            except OSError:
                # The process exited between NVML listing it and us reading it: nothing to attribute.
                text = ""
            self._seen[pid] = pod_uid_from_cgroup_file(text)
        return self._seen[pid]

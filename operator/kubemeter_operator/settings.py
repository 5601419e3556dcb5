"""Operator settings from the environment (``KUBEMETER_*``), read once at startup."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_IMAGE = "ghcr.io/kubemeter/kubemeter:0.1.0"


@dataclass(frozen=True)
class OperatorSettings:
    cluster_name: str = "default"
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    resync_seconds: float = 60.0  # full re-check of children, Secrets and gateway stats
    gateway_status_timeout_seconds: float = 2.0
    host_state_root: str = "/var/lib/kubemeter"  # agents' hostPath root; one subdirectory per Collector
    # host:port of the API server for agent pods, where the kubernetes Service's IP is not reachable
    # from them (hostNetwork on a cluster without kube-proxy); empty means the Service (in-cluster).
    pod_api_server: str = ""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorSettings:
        env = dict(os.environ if environ is None else environ)
        defaults = cls()
        return cls(
            cluster_name=env.get("KUBEMETER_CLUSTER_NAME", defaults.cluster_name),
            image=env.get("KUBEMETER_IMAGE", defaults.image),
            image_pull_policy=env.get("KUBEMETER_IMAGE_PULL_POLICY", defaults.image_pull_policy),
            resync_seconds=float(env.get("KUBEMETER_RESYNC_SECONDS", defaults.resync_seconds)),
            gateway_status_timeout_seconds=float(
                env.get("KUBEMETER_GATEWAY_STATUS_TIMEOUT_SECONDS", defaults.gateway_status_timeout_seconds)
            ),
            host_state_root=env.get("KUBEMETER_HOST_STATE_ROOT", defaults.host_state_root),
            pod_api_server=env.get("KUBEMETER_POD_API_SERVER", defaults.pod_api_server),
        )

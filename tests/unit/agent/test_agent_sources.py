"""Every ``spec.source`` kind maps to its module; the heavy ones load only when a Meter uses them; a
source that cannot be built fails its meter alone, with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from kubemeter.agent.meters import World
from kubemeter.agent.sources import UnbuildableSource, build_source
from kubemeter.api.rendered import AgentConfig, ResolvedMeter
from kubemeter.sources.kubelet import KubeletPoller

REPO_ROOT = Path(__file__).resolve().parents[3]
# httpx is the agent's own HTTP client (API server, kubelet, gateway); aiohttp and celpy must stay out.
HEAVY = (
    "grpc",
    "pynvml",
    "prometheus_api_client",
    "requests",
    "pandas",
    "google.protobuf",
    "aiohttp",
    "celpy",
)

SOURCES: dict[str, dict[str, Any]] = {
    "allocation": {"allocation": {"resource": "nvidia.com/gpu"}},
    "kubeletUsage": {"kubeletUsage": {"metric": "cpu"}},
    "nvml": {"nvml": {"metric": "energy"}},
    "prometheus": {
        "prometheus": {
            "url": "http://prometheus:9090",
            "query": "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
            "kind": "counter",
            "valueScale": 0.001,
            "scrapeIntervalSeconds": 15,
            "nodeLabel": "Hostname",
        }
    },
    "runai": {
        "runai": {
            "url": "https://org.run.ai",
            "metric": "GPU_ALLOCATION",
            "credentialsSecretRef": {"name": "runai"},
            "sampleStepSeconds": 5,
            "lagSeconds": 45,
        }
    },
}


def resolved(source: dict[str, Any], credentials_dir: str | None = None) -> ResolvedMeter:
    return ResolvedMeter.model_validate(
        {
            "name": "m",
            "namespace": "ns",
            "uid": "uid-m",
            "pipeline": "p",
            "spec": {"eventType": "e", "unit": "u", "source": source},
            "credentialsDir": credentials_dir,
        }
    )


CONFIG = AgentConfig.model_validate(
    {
        "cluster": "c",
        "collector": "c",
        "namespace": "ns",
        "gatewayUrl": "http://gw",
        "spoolDir": "/tmp/spool",
        "checkpointDir": "/tmp/checkpoints",
        "intervalSeconds": 5,
    }
)
WORLD = cast(World, SimpleNamespace(node_name="gpu-1", pods=SimpleNamespace(objects={})))
KUBELET = cast(KubeletPoller, None)


async def test_every_source_kind_maps_to_its_module_with_its_settings() -> None:
    built = {
        kind: build_source(resolved(source, "/etc/kubemeter/secrets/runai"), WORLD, CONFIG, 0, KUBELET)
        for kind, source in SOURCES.items()
    }
    assert {kind: type(source).__name__ for kind, source in built.items()} == {
        "allocation": "AllocationSource",
        "kubeletUsage": "KubeletUsageSource",
        "nvml": "NvmlSource",
        "prometheus": "PrometheusSource",
        "runai": "RunaiSource",
    }
    prometheus: Any = built["prometheus"]
    assert prometheus.selector == 'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{Hostname="gpu-1"}'
    assert str(prometheus.value_scale) == "0.001"  # the decimal as written, not 0.001000000000000000020…
    assert prometheus.max_step_ms == 37_500 and prometheus.poll_interval_ms == 5_000
    runai: Any = built["runai"]
    assert (runai.node, runai.sample_step_ms, runai.lag_ms) == ("gpu-1", 5_000, 45_000)
    nvml: Any = built["nvml"]
    assert nvml.edge._proc_root == Path("/host/proc")
    for source in (prometheus, runai, nvml):
        await source.close()


def test_a_source_that_cannot_start_fails_its_meter_alone_and_says_why() -> None:
    errors: list[str] = []
    broken = resolved(
        {"prometheus": {"url": "https://p", "query": "up", "tls": {"caFile": "/nonexistent/ca.crt"}}}
    )
    source = build_source(broken, WORLD, CONFIG, 0, KUBELET, on_error=lambda part, e: errors.append(part))
    assert isinstance(source, UnbuildableSource)
    assert "could not start" in (source.fault() or "") and "ca.crt" in (source.fault() or "")
    assert errors == ["prometheus"]


@pytest.mark.parametrize("kind", ["allocation", "kubeletUsage"])
def test_an_agent_with_only_kubernetes_meters_does_not_load_grpc_nvml_prometheus_or_cel(kind: str) -> None:
    script = f"""
import json, sys
from types import SimpleNamespace
import kubemeter.agent.runtime
from kubemeter.agent.sources import build_source
from kubemeter.api.rendered import AgentConfig, ResolvedMeter
meter = ResolvedMeter.model_validate(json.loads({json.dumps(json.dumps(resolved(SOURCES[kind]).to_wire()))}))
config = AgentConfig.model_validate(json.loads({json.dumps(json.dumps(CONFIG.to_wire()))}))
world = SimpleNamespace(node_name="n", pods=SimpleNamespace(objects={{}}))
build_source(meter, world, config, 0, None)
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == []

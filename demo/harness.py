"""The whole kubemeter stack on this machine, as ``make demo`` and ``make chaos`` run it.

A real control plane (:class:`~testbed.controlplane.ControlPlane`: etcd, kube-apiserver,
controllers, kwok nodes) with the CRDs installed; ``kubemeter sink`` as the billing API; the operator;
and, as local processes, the parts that would run in pods the operator renders: one gateway and one
agent per fake node (kwok nodes run no containers). Each gets the configuration the operator rendered
into the Collector's ConfigMap with local paths and ports substituted, and :meth:`Stack.sync_agent_configs`
plays the kubelet's part when that ConfigMap changes (it rewrites the mounted file; the agent reloads).

Every process runs in its own process group with a parent-death signal, so nothing outlives the
harness, and can be killed, stopped and started again on the same ports and directories.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from kubemeter.api.rendered import AgentConfig, GatewayConfig

from testbed.controlplane import (
    REPO_ROOT,
    Component,
    ControlPlane,
    _die_with_parent,
    free_port,
    wait_for,
)

NAMESPACE = "kubemeter"


class StackError(RuntimeError):
    """A process of the stack exited while it should run; the message carries its log tail."""


@dataclass
class Process:
    """One local process of the stack. ``wanted`` is False while a fault keeps it down on purpose."""

    component: Component
    wanted: bool = True

    @property
    def name(self) -> str:
        return self.component.name

    @property
    def pid(self) -> int | None:
        process = self.component.process
        return None if process is None else process.pid

    def running(self) -> bool:
        return self.component.running()

    def start(self) -> None:
        self.component.start()
        self.wanted = True

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Send ``signum`` to the process group and reap it (a SIGKILL leaves it no last word)."""
        self.wanted = False
        process = self.component.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        self.component.process = None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        self.wanted = False
        self.component.stop(timeout_s)


@dataclass
class Stack:
    state: Path
    plane: ControlPlane | None = None
    processes: dict[str, Process] = field(default_factory=dict)
    sink_port: int = 0
    gateway_port: int = 0
    # The bearer token the gateway accepts (from the generated Secret), for posting to ingest directly.
    ingest_token: str = ""
    # Where the gateway keeps its queue (its PersistentVolume); default: <state>/gateway.
    gateway_data_dir: Path | None = None
    agent_config_text: str = ""
    agent_dirs: dict[str, Path] = field(default_factory=dict)
    agent_ports: dict[str, int] = field(default_factory=dict)
    config_reloads: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- output ----------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        print(f"[{datetime.now(tz=UTC).strftime('%H:%M:%S')}] {message}", flush=True)

    @property
    def sink_url(self) -> str:
        return f"http://127.0.0.1:{self.sink_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def agent_url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.agent_ports[node]}"

    @property
    def nodes(self) -> list[str]:
        assert self.plane is not None
        return [node.name for node in self.plane.nodes]

    # ---- processes -------------------------------------------------------------------------------
    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> Process:
        """Start ``kubemeter <args>`` as process ``name``; its output goes to ``logs/<name>.log``."""
        argv = [sys.executable, "-m", "kubemeter_cli", *args]
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        component = _KubemeterProcess(
            name, argv, self.state / "logs" / f"{name}.log", environment=environment
        )
        process = Process(component)
        process.start()
        self.processes[name] = process
        return process

    def check_processes(self) -> None:
        for process in self.processes.values():
            if process.wanted and not process.running():
                code = None if process.component.process is None else process.component.process.returncode
                raise StackError(f"{process.name} exited with {code}:\n{process.component.log_tail(3000)}")

    def stop(self) -> None:
        """Agents first, while the gateway still takes their last windows (stopped together, they
        would spend their whole shutdown grace retrying a gateway that is gone); then the rest."""
        agents = [p for name, p in self.processes.items() if name.startswith("agent-")]
        others = [p for p in self.processes.values() if p not in agents]
        for group in (agents, others):
            for process in group:
                if process.running():
                    with contextlib.suppress(ProcessLookupError):
                        assert process.pid is not None
                        os.killpg(process.pid, signal.SIGTERM)
            for process in group:
                process.stop(timeout_s=15)
        if self.plane is not None:
            self.plane.stop()

    def leftover_pids(self) -> list[int]:
        """Process ids of this stack (and of its control plane) that are still alive."""
        components = [p.component for p in self.processes.values()]
        if self.plane is not None:
            components += self.plane.components
        alive = []
        for component in components:
            process = component.process
            if process is not None and process.poll() is None:
                alive.append(process.pid)
        return alive

    # ---- the cluster -----------------------------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None) -> str:
        assert self.plane is not None
        return self.plane.kubectl(*args, input=input).stdout

    def api(self, method: str, path: str, body: Any = None, *, timeout_s: float = 10) -> Any:
        """One JSON request to the API server (cheaper than a kubectl process per call)."""
        assert self.plane is not None
        data = None if body is None else json.dumps(body).encode()
        content_type = "application/merge-patch+json" if method == "PATCH" else "application/json"
        request = urllib.request.Request(
            f"{self.plane.api_url}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.plane.token}", "Content-Type": content_type},
        )
        with urllib.request.urlopen(request, timeout=timeout_s, context=self.plane.ssl_context()) as response:
            return json.loads(response.read() or b"null")

    def start_cluster(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)
        (self.state / "logs").mkdir(parents=True)
        self.say("starting the local control plane (etcd, kube-apiserver, controllers, kwok nodes)")
        self.plane = ControlPlane(self.state / "cluster")
        self.plane.start()
        self.say(f"control plane up in {self.plane.timings_s['start']:.1f} s; nodes: {', '.join(self.nodes)}")
        for crd in sorted((REPO_ROOT / "crds").glob("*.yaml")):
            self.kubectl("apply", "--server-side", "-f", str(crd))
        self.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        self.say("CRDs installed: Meter, Collector, Pipeline")

    def apply(self, documents: Iterable[Any], namespace: str = NAMESPACE) -> None:
        self.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(list(documents)))

    def apiserver(self) -> Component:
        assert self.plane is not None
        return next(c for c in self.plane.components if c.name == "kube-apiserver")

    def apiserver_ready(self) -> bool:
        assert self.plane is not None
        request = urllib.request.Request(
            f"{self.plane.api_url}/readyz", headers={"Authorization": f"Bearer {self.plane.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=3, context=self.plane.ssl_context()) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    # ---- the billing API -------------------------------------------------------------------------
    def start_sink(self) -> None:
        """``kubemeter sink`` on loopback; a restart keeps its port and its data."""
        self.sink_port = self.sink_port or free_port()
        self.spawn(
            "sink",
            "sink",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.sink_port),
            "--data-dir",
            str(self.state / "sink"),
            "--enable-faults",  # the fault suite (make chaos) injects billing-API outages
        )
        wait_for(
            lambda: self.get(f"{self.sink_url}/healthz") is not None, timeout_s=30, what="kubemeter sink"
        )

    # ---- operator, gateway, agents ---------------------------------------------------------------
    def start_operator(self) -> None:
        assert self.plane is not None
        self.spawn(
            "operator",
            "operator",
            "--standalone",
            "--liveness-port",
            "0",
            "--metrics-port",
            "0",
            env={"KUBECONFIG": str(self.plane.kubeconfig)},
        )

    def rendered_config(self, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        """The Collector's ConfigMap (``agent.yaml``, ``gateway.yaml``) once the operator wrote it."""
        self.check_processes()
        items = json.loads(self.kubectl("get", "configmaps", "-n", namespace, "-o", "json"))["items"]
        return next((c for c in items if "agent.yaml" in (c.get("data") or {})), None)

    def wait_rendered_config(self, timeout_s: float = 90) -> dict[str, Any]:
        config_map: dict[str, Any] = wait_for(
            self.rendered_config, timeout_s=timeout_s, what="the operator to render the Collector"
        )
        return config_map

    def mount_secret_file(self, pod_path: str | None, namespace: str = NAMESPACE) -> str | None:
        """The kubelet's part for a Secret volume: ``pod_path`` (``<secrets dir>/<name>/<key>`` in the
        pod) written from the Secret the API server holds (the operator's generated ingest token)."""
        if pod_path is None:
            return None
        name, key = Path(pod_path).parent.name, Path(pod_path).name
        secret = self.api("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
        local = self.state / "secrets" / name / key
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(base64.b64decode(secret["data"][key]))
        return str(local)

    def start_gateway(self, config: GatewayConfig) -> None:
        self.gateway_port = self.gateway_port or free_port()
        token_file = self.state / "billing-token"
        token_file.write_text("replace-me\n")
        data_dir = self.gateway_data_dir or self.state / "gateway"
        # Ingest is authenticated: the operator generated the token Secret the gateway mounts.
        token_path = self.mount_secret_file(config.ingest_token_file)
        self.ingest_token = Path(token_path).read_text().splitlines()[0] if token_path else ""
        local = config.model_copy(
            update={
                "output": config.output.model_copy(update={"url": self.sink_url}),
                "credentials_file": str(token_file),
                "ingest_token_file": token_path,
                "data_dir": str(data_dir),
                "listen_address": f"127.0.0.1:{self.gateway_port}",
            }
        )
        path = self.state / "gateway.yaml"
        path.write_text(local.to_yaml())
        self.spawn("gateway", "gateway", "--config", str(path))
        self.wait_gateway_ready()

    def wait_gateway_ready(self) -> None:
        wait_for(lambda: self.get(f"{self.gateway_url}/readyz") is not None, timeout_s=60, what="the gateway")

    def start_agents(self, agent_yaml: str) -> None:
        self.agent_config_text = agent_yaml
        for node in self.nodes:
            directory = self.state / "agents" / node
            directory.mkdir(parents=True)
            self.agent_dirs[node] = directory
            self.agent_ports[node] = free_port()
            self._write_agent_config(node, agent_yaml)
            self.start_agent(node)

    def start_agent(self, node: str) -> None:
        assert self.plane is not None
        self.spawn(
            f"agent-{node}",
            "agent",
            "--config",
            str(self.agent_dirs[node] / "agent.yaml"),
            "--node-name",
            node,
            "--kubeconfig",
            str(self.plane.kubeconfig),
            "--metrics-host",
            "127.0.0.1",
        )

    def agent(self, node: str) -> Process:
        return self.processes[f"agent-{node}"]

    def agent_watching(self, node: str) -> bool:
        """The agent runs and its pod watch is up (``/healthz`` answers 200)."""
        try:
            with urllib.request.urlopen(f"{self.agent_url(node)}/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, ValueError):
            return False

    def _write_agent_config(self, node: str, agent_yaml: str) -> None:
        directory = self.agent_dirs[node]
        local = AgentConfig.from_yaml(agent_yaml).model_copy(
            update={
                "gateway_url": self.gateway_url,
                "ingest_token_file": self.mount_secret_file(
                    AgentConfig.from_yaml(agent_yaml).ingest_token_file
                ),
                "spool_dir": str(directory / "spool"),
                "checkpoint_dir": str(directory / "checkpoints"),
                "metrics_port": self.agent_ports[node],
            }
        )
        # Write aside, then rename: the agent never reads half a file (a ConfigMap volume swaps a link).
        scratch = directory / "agent.yaml.new"
        scratch.write_text(local.to_yaml())
        scratch.replace(directory / "agent.yaml")

    def sync_agent_configs(self, namespace: str = NAMESPACE) -> bool:
        """The kubelet's part: when the rendered ``agent.yaml`` changed, rewrite every agent's file."""
        with self._lock:
            items = self.api("GET", f"/api/v1/namespaces/{namespace}/configmaps")["items"]
            text = next(
                (c["data"]["agent.yaml"] for c in items if "agent.yaml" in (c.get("data") or {})), None
            )
            if text is None or text == self.agent_config_text:
                return False
            for node in self.agent_dirs:
                self._write_agent_config(node, text)
            self.agent_config_text = text
            self.config_reloads += 1
            return True

    # ---- HTTP ------------------------------------------------------------------------------------
    def get(self, url: str) -> Any:
        """GET ``url``: its JSON (or text), or None when it does not answer 2xx."""
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except (OSError, urllib.error.URLError):
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text

    def post(self, url: str, body: Any, *, method: str = "POST") -> Any:
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")

    def progress(self, prefix: str) -> None:
        stats = self.get(f"{self.sink_url}/_sink/stats") or {}
        gateway = self.get(f"{self.gateway_url}/status") or {}
        self.say(
            f"{prefix}; gateway buffer {gateway.get('bufferedEvents', '?')} events, "
            f"delivered {gateway.get('deliveredEvents', '?')}; "
            f"sink holds {stats.get('storedEvents', '?')} events"
        )


class _KubemeterProcess(Component):
    """A :class:`Component` with its own environment (``PYTHONUNBUFFERED``, ``KUBECONFIG``)."""

    def __init__(self, name: str, argv: list[str], log_path: Path, *, environment: dict[str, str]) -> None:
        super().__init__(name, argv, log_path)
        self.environment = environment

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.environment,
            cwd=REPO_ROOT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
    """:func:`~testbed.controlplane.wait_for`, also ending on OSError (a server still down)."""

    def guarded() -> Any:
        try:
            return predicate()
        except OSError:
            return None

    return wait_for(guarded, timeout_s=timeout_s, interval_s=interval_s, what=what)

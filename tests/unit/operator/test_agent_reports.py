"""The operator reads source faults from every ready agent over real HTTP; a silent agent is left out."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubemeter.api.rendered import AgentStatusReport
from kubemeter_operator.reconcile import agent_report_urls, read_agent_reports

from testbed.controlplane import free_port


def agent_pod(ip: str | None, ready: bool) -> dict[str, object]:
    status: dict[str, object] = {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {"metadata": {"name": "a"}, "status": status}


@pytest.fixture
def agents() -> Iterator[int]:
    """Two agents on one port, told apart by path: one healthy with a fault, one whose watch is down."""
    bodies = {
        "/healthz": (200, {"node": "gpu-0", "sourceFaults": {"ml/gpu-energy": "nvml unavailable"}}),
        "/down/healthz": (503, {"node": "gpu-1", "problems": ["pod watch down"], "meters": {"ml/x": "ok"}}),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = bodies.get(self.path, (404, {}))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port
    server.shutdown()
    server.server_close()


def test_only_ready_agents_with_an_ip_are_asked() -> None:
    pods = [agent_pod("10.0.0.1", True), agent_pod("10.0.0.2", False), agent_pod(None, True)]
    assert agent_report_urls(pods) == ["http://10.0.0.1:9464/healthz"]


def test_reports_are_read_and_an_unreachable_agent_is_left_out(agents: int) -> None:
    urls = [
        f"http://127.0.0.1:{agents}/healthz",
        f"http://127.0.0.1:{agents}/down/healthz",
        f"http://127.0.0.1:{free_port()}/healthz",  # nothing listens
    ]
    reports = read_agent_reports(urls, timeout_s=2)
    assert reports == [
        AgentStatusReport(node="gpu-0", source_faults={"ml/gpu-energy": "nvml unavailable"}),
        AgentStatusReport(node="gpu-1", problems=["pod watch down"], meters={"ml/x": "ok"}),
    ]

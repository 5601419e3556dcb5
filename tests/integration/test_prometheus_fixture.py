"""The Prometheus fixture is a real server that scrapes what the test tells it to."""

from __future__ import annotations

import json
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from testbed.controlplane import wait_for
from tests.plugins.prometheus import PrometheusFactory

pytestmark = pytest.mark.prometheus


class _Exporter(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'# TYPE kubemeter_fixture_value gauge\nkubemeter_fixture_value{pod="p"} 42\n'
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_prometheus_scrapes_the_target_the_test_supplies(prometheus_server: PrometheusFactory) -> None:
    exporter = ThreadingHTTPServer(("127.0.0.1", 0), _Exporter)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    try:
        url = prometheus_server(
            [{"job_name": "fixture", "static_configs": [{"targets": [f"127.0.0.1:{exporter.server_port}"]}]}]
        )

        def value() -> str | None:
            query = urllib.parse.urlencode({"query": "kubemeter_fixture_value"})
            with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=5) as response:
                result = json.load(response)["data"]["result"]
            return result[0]["value"][1] if result else None

        assert wait_for(value, timeout_s=30, what="the first scrape") == "42"
    finally:
        exporter.shutdown()

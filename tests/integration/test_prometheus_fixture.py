"""The Prometheus fixture is a real server that scrapes what the test tells it to."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from testbed.controlplane import REPO_ROOT, tools_bin_dir, wait_for
from tests.plugins.prometheus import PrometheusFactory, prometheus_binary
from tests.support.ci import unavailable

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


def test_make_test_runs_the_prometheus_built_from_its_go_module(monkeypatch: pytest.MonkeyPatch) -> None:
    # A bare machine has no prometheus package: tools/build.sh builds the version tools/prometheus pins.
    monkeypatch.delenv("KUBEMETER_PROMETHEUS", raising=False)
    built = tools_bin_dir() / "prometheus"
    if not os.access(built, os.X_OK):
        unavailable(f"prometheus is missing in {tools_bin_dir()}; run tools/build.sh (make tools)")
    assert prometheus_binary() == str(built)
    go_mod = (REPO_ROOT / "tools" / "prometheus" / "go.mod").read_text()
    # Prometheus 3.16.0 is the Go module version v0.316.0.
    found = re.search(r"github.com/prometheus/prometheus v0\.(\d+)(\d\d)\.(\d+)", go_mod)
    assert found is not None
    pinned = f"{found[1]}.{int(found[2])}.{found[3]}"
    version = subprocess.run([str(built), "--version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith(f"prometheus, version {pinned} "), version

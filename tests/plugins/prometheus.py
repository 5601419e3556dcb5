"""pytest plugin: a real Prometheus server on loopback (the one ``tools/build.sh`` builds from its Go
module, else ``prometheus`` on PATH).

``prometheus_server(scrape_configs)`` starts one with the scrape configuration the test supplies and
returns its base URL; every server started is stopped after the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.controlplane import free_port, tools_bin_dir
from tests.support.ci import unavailable

PrometheusFactory = Callable[..., str]


def prometheus_binary() -> str | None:
    if "KUBEMETER_PROMETHEUS" in os.environ:
        return os.environ["KUBEMETER_PROMETHEUS"]
    built = tools_bin_dir() / "prometheus"
    return str(built) if os.access(built, os.X_OK) else shutil.which("prometheus")


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator[PrometheusFactory]:
    processes: list[subprocess.Popen[bytes]] = []

    def start(scrape_configs: list[dict[str, Any]], scrape_interval_s: float = 1.0) -> str:
        binary = prometheus_binary()
        if binary is None:
            unavailable(f"prometheus is missing in {tools_bin_dir()}; run tools/build.sh (make tools)")
        port = free_port()
        config = {
            "global": {
                "scrape_interval": f"{int(scrape_interval_s * 1000)}ms",
                "evaluation_interval": f"{int(scrape_interval_s * 1000)}ms",
            },
            "scrape_configs": scrape_configs,
        }
        directory = tmp_path / f"prometheus-{port}"
        directory.mkdir()
        (directory / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        log = (directory / "prometheus.log").open("wb")
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                unavailable(f"prometheus exited: {(directory / 'prometheus.log').read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response,
            ):
                if response.status == 200:
                    return url
            time.sleep(0.2)
        unavailable("prometheus did not become ready within 60 s")

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

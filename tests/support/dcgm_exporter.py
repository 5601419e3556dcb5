"""A dcgm-exporter stand-in: the same exposition format, labels and metric types, with values that
are exact functions of the sample timestamp, so a test knows to the millijoule what it must bill.

Each sample carries an explicit timestamp (the scrape moment in ms); Prometheus stores that
timestamp, so ``energy = base + watts * (t - t0)`` holds exactly at every stored sample.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Gpu:
    index: int
    uuid: str
    hostname: str
    engine_active_ratio: str  # DCGM_FI_PROF_GR_ENGINE_ACTIVE, exact decimal text
    watts: int  # DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION grows by this many mJ per ms
    namespace: str | None = None  # None: an unallocated GPU, exported without pod labels
    pod: str | None = None
    container: str = "main"
    energy_base_mj: int = 55_491_669_881
    model: str = "NVIDIA H100 80GB HBM3"


class DcgmExporter:
    def __init__(self, gpus: list[Gpu]) -> None:
        self.gpus = gpus
        self.t0_ms = time.time_ns() // 1_000_000
        self.serving = True  # False: answer 503, as an exporter stuck on DCGM does
        self.scrapes = 0
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if not exporter.serving:
                    self.send_response(503)
                    self.end_headers()
                    return
                body = exporter.render(time.time_ns() // 1_000_000).encode()
                exporter.scrapes += 1
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self._server.server_port}"

    def energy_mj(self, gpu: Gpu, time_ms: int) -> int:
        return gpu.energy_base_mj + gpu.watts * (time_ms - self.t0_ms)

    def render(self, time_ms: int) -> str:
        lines = [
            "# HELP DCGM_FI_PROF_GR_ENGINE_ACTIVE Ratio of time the graphics engine is active.",
            "# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge",
        ]
        lines += [
            f"DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{self._labels(g)}}} {g.engine_active_ratio} {time_ms}"
            for g in self.gpus
        ]
        lines += [
            "# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).",
            "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter",
        ]
        for gpu in self.gpus:
            energy_mj = self.energy_mj(gpu, time_ms)
            lines.append(f"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{self._labels(gpu)}}} {energy_mj} {time_ms}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _labels(gpu: Gpu) -> str:
        labels = {
            "gpu": str(gpu.index),
            "UUID": gpu.uuid,
            "pci_bus_id": f"00000000:{0x1A + gpu.index:02X}:00.0",
            "device": f"nvidia{gpu.index}",
            "modelName": gpu.model,
            "Hostname": gpu.hostname,
            "DCGM_FI_DRIVER_VERSION": "550.54.15",
        }
        if gpu.pod is not None and gpu.namespace is not None:
            labels |= {"container": gpu.container, "namespace": gpu.namespace, "pod": gpu.pod}
        return ",".join(f'{key}="{value}"' for key, value in labels.items())

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

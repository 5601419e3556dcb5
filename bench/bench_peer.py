"""A peer on the same pipeline (issue 8): Bento, built from its Go module by ``tools/peer/build.sh``,
as ``http_server`` input -> ``sqlite`` buffer -> ``http_client`` output, next to kubemeter's gateway
(HTTP ingest -> durable SQLite queue -> OpenMeter sink), both delivering to one ``kubemeter sink``
in the same run, one after the other (2 cores: running them at once would measure the contention).

Both receive the same load: CloudEvents batches of 100 usage events, ``POST /api/v1/events`` as
``application/cloudevents-batch+json``, from 8 concurrent senders; both deliver to the sink's
OpenMeter endpoint, which deduplicates on (source, id) and counts duplicates. Bento forwards each
request body as one request; the gateway re-batches up to 500 events, waiting at most 1 s, with its
default 10 requests/s rate limit lifted (Bento has none; the default would cap it at 5,000 events/s).

- ``throughput/ingest``: events acknowledged by the pipeline per second (the senders' view);
  ``throughput/end-to-end``: events stored by the sink per second, from the first send until the
  sink holds every event.
- ``rss-peak``: the pipeline process's VmRSS, sampled every 100 ms through both measurements.
- ``sigkill``: a fresh instance is killed with SIGKILL once half the batches are acknowledged, then
  restarted on the same data directory; the senders resend every batch not acknowledged (what a
  retrying client does). ``lost-acknowledged`` counts acknowledged events the sink never got (a
  broken promise); ``duplicates`` counts deliveries the sink had already stored (harmless for an API
  that deduplicates, a double bill for one that does not).

When the peer does not build here, the figures say so and carry the build error.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from kubemeter.api.rendered import GatewayConfig

from bench.bench_operator import RssSampler, kubemeter_process, mib, wait_until
from testbed.controlplane import REPO_ROOT, free_port

ABOUT = "a peer pipeline (Bento) on the same sink"

BUILD_SCRIPT = REPO_ROOT / "tools" / "peer" / "build.sh"
BATCH_EVENTS = 100
SENDERS = 8
THROUGHPUT_EVENTS = 50_000
KILL_EVENTS = 30_000
INGEST_PATH = "/api/v1/events"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
# The example Collector's batching with a 1 s wait. The default rate limit (10 requests/s, for rate-
# limited billing APIs) would cap delivery at 5,000 events/s; Bento has none, so it is lifted here.
GATEWAY_BATCH = {"maxEvents": 500, "maxDelaySeconds": 1}
GATEWAY_RATE_LIMIT = {"requestsPerSecond": 10_000}


# ---- the two pipelines -------------------------------------------------------------------------


def build_peer() -> tuple[Path | None, str]:
    """The Bento binary, or None and the build's own error output."""
    result = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=20 * 60)
    if result.returncode != 0:
        return None, (result.stderr or result.stdout).strip()[-2000:]
    binary = subprocess.run([str(BUILD_SCRIPT), "--binary"], capture_output=True, text=True, check=True)
    return Path(binary.stdout.strip()), ""


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextmanager
def bento_process(binary: Path, data_dir: Path, log_path: Path, port: int, sink_url: str) -> Iterator[int]:
    data_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "http": {"address": f"127.0.0.1:{port}"},
        "logger": {"level": "WARN"},
        "input": {"http_server": {"path": INGEST_PATH, "allowed_verbs": ["POST"], "timeout": "30s"}},
        "buffer": {"sqlite": {"path": str(data_dir / "buffer.db")}},
        "output": {
            "http_client": {
                "url": f"{sink_url}{INGEST_PATH}",
                "verb": "POST",
                "headers": {"Content-Type": BATCH_CONTENT_TYPE},
            }
        },
    }
    config_path = data_dir / "bento.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [str(binary), "-c", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/ping"), 30, 0.1, "Bento")
        yield process.pid
    finally:
        stop(process)


@contextmanager
def gateway_process(data_dir: Path, log_path: Path, port: int, sink_url: str) -> Iterator[int]:
    data_dir.mkdir(parents=True, exist_ok=True)
    token = data_dir / "billing-token"
    token.write_text("replace-me\n")
    config = GatewayConfig.model_validate(
        {
            "cluster": "bench",
            "collector": "peer",
            "namespace": "kubemeter",
            "output": {
                "type": "openmeter",
                "url": sink_url,
                "batch": GATEWAY_BATCH,
                "rateLimit": GATEWAY_RATE_LIMIT,
            },
            "credentialsFile": str(token),
            "bufferMaxBytes": 1 << 30,
            "dataDir": str(data_dir / "queue"),
            "listenAddress": f"127.0.0.1:{port}",
        }
    )
    config_path = data_dir / "gateway.yaml"
    config_path.write_text(config.to_yaml())
    with kubemeter_process(["gateway", "--config", str(config_path)], log_path) as process:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/readyz"), 30, 0.1, "kubemeter gateway")
        yield process.pid


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# ---- load and counting --------------------------------------------------------------------------


def event_batches(source: str, events: int) -> list[bytes]:
    """Batches of usage events shaped as kubemeter emits them, ids unique within ``source``."""
    batches = []
    for start in range(0, events, BATCH_EVENTS):
        batch = [
            {
                "specversion": "1.0",
                "id": f"{source}-{index:08d}",
                "source": source,
                "type": "gpu-seconds",
                "subject": f"customer-{index % 7}",
                "time": "2026-01-01T00:01:00Z",
                "datacontenttype": "application/json",
                "data": {
                    "value": 60,
                    "unit": "gpu-seconds",
                    "window_start": "2026-01-01T00:00:00Z",
                    "window_end": "2026-01-01T00:01:00Z",
                    "namespace": "team-a",
                    "pod": f"train-{index}",
                    "node": "gpu-0",
                    "complete": True,
                },
            }
            for index in range(start, min(start + BATCH_EVENTS, events))
        ]
        batches.append(json.dumps(batch, separators=(",", ":")).encode())
    return batches


@dataclass
class Sent:
    acked: set[int] = field(default_factory=set)
    first_sent_s: float = 0.0
    last_acked_s: float = 0.0


async def send(
    url: str,
    batches: list[bytes],
    indices: list[int],
    sent: Sent,
    retry: bool,
    on_ack: Callable[[int], None] | None = None,
) -> None:
    """POST each batch once (or until acknowledged, with ``retry``) from :data:`SENDERS` workers."""
    queue = list(reversed(indices))
    headers = {"Content-Type": BATCH_CONTENT_TYPE}
    sent.first_sent_s = sent.first_sent_s or time.perf_counter()

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            index = queue.pop()
            while True:
                try:
                    response = await client.post(url, content=batches[index], headers=headers)
                    if response.is_success:
                        sent.acked.add(index)
                        sent.last_acked_s = time.perf_counter()
                        if on_ack is not None:
                            on_ack(len(sent.acked))
                        break
                except httpx.HTTPError:
                    pass
                if not retry:
                    break
                await asyncio.sleep(0.2)

    async with httpx.AsyncClient(timeout=60.0) as client:
        await asyncio.gather(*(worker(client) for _ in range(SENDERS)))


def sink_stats(sink_url: str) -> dict[str, Any]:
    response = httpx.get(f"{sink_url}/_sink/stats", timeout=30)
    stats: dict[str, Any] = response.json()
    return stats


def stored_ids(sink_url: str, source: str) -> set[str]:
    response = httpx.get(
        f"{sink_url}/api/v1/usage/events", params={"api": "openmeter", "limit": "10000000"}, timeout=120
    )
    return {e["eventId"] for e in response.json()["events"] if e["source"] == source}


def wait_stored(sink_url: str, target: int, before: int, settle_s: float = 10.0) -> float:
    """Poll until the sink holds ``target`` more events (returns when) or stops growing for
    ``settle_s`` (events were lost; returns then)."""
    last, changed_at = -1, time.perf_counter()
    while True:
        stored = sink_stats(sink_url)["storedEvents"] - before
        now = time.perf_counter()
        if stored >= target:
            return now
        if stored != last:
            last, changed_at = stored, now
        elif now - changed_at > settle_s:
            return now
        time.sleep(0.1)


# ---- the measurements ---------------------------------------------------------------------------


def throughput(name: str, start: Callable[[Path], Any], work: Path, sink_url: str) -> dict[str, Any]:
    source = f"bench/{name}/throughput"
    batches = event_batches(source, THROUGHPUT_EVENTS)
    before = sink_stats(sink_url)["storedEvents"]
    with start(work / "throughput") as (pid, url), RssSampler(pid) as rss:
        sent = Sent()
        asyncio.run(send(url, batches, list(range(len(batches))), sent, retry=True))
        stored_at = wait_stored(sink_url, THROUGHPUT_EVENTS, before)
        stored = len(stored_ids(sink_url, source))
    return {
        "ingest_per_s": THROUGHPUT_EVENTS / (sent.last_acked_s - sent.first_sent_s),
        "end_to_end_per_s": stored / (stored_at - sent.first_sent_s),
        "rss_peak": rss.peak_bytes,
        "stored": stored,
    }


def sigkill(name: str, start: Callable[[Path], Any], work: Path, sink_url: str) -> dict[str, Any]:
    source = f"bench/{name}/sigkill"
    batches = event_batches(source, KILL_EVENTS)
    data_dir = work / "sigkill"
    before = sink_stats(sink_url)
    sent = Sent()
    with start(data_dir) as (pid, url):

        def kill_at_half(acked_batches: int) -> None:
            if acked_batches == len(batches) // 2:
                os.kill(pid, signal.SIGKILL)

        asyncio.run(send(url, batches, list(range(len(batches))), sent, retry=False, on_ack=kill_at_half))
    acked_before_kill = set(sent.acked)
    with start(data_dir) as (_, url):
        unacked = [i for i in range(len(batches)) if i not in sent.acked]
        asyncio.run(send(url, batches, unacked, sent, retry=True))
        wait_stored(sink_url, KILL_EVENTS, before["storedEvents"])
        ids = stored_ids(sink_url, source)
    after = sink_stats(sink_url)
    acked_ids = {
        f"{source}-{n:08d}"
        for i in acked_before_kill
        for n in range(i * BATCH_EVENTS, (i + 1) * BATCH_EVENTS)
    }
    return {
        "acked_before_kill": len(acked_ids),
        "lost_acknowledged": len(acked_ids - ids),
        "lost": KILL_EVENTS - len(ids),
        "duplicates": after["duplicateEvents"] - before["duplicateEvents"],
    }


@contextmanager
def started(
    factory: Callable[[Path, Path, int], Any], data_dir: Path, logs: Path, name: str
) -> Iterator[tuple[int, str]]:
    port = free_port()
    with factory(data_dir, logs / f"{name}.log", port) as pid:
        yield pid, f"http://127.0.0.1:{port}{INGEST_PATH}"


def measure(work: Path, binary: Path) -> dict[str, dict[str, Any]]:
    logs = work / "logs"
    logs.mkdir(parents=True)
    sink_port = free_port()
    sink_url = f"http://127.0.0.1:{sink_port}"
    sink_args = ["sink", "--host", "127.0.0.1", "--port", str(sink_port), "--data-dir", str(work / "sink")]
    factories: dict[str, Callable[[Path, Path, int], Any]] = {
        "kubemeter-gateway": lambda d, log, port: gateway_process(d, log, port, sink_url),
        "bento": lambda d, log, port: bento_process(binary, d, log, port, sink_url),
    }
    results: dict[str, dict[str, Any]] = {}
    with kubemeter_process(sink_args, logs / "sink.log"):
        wait_until(lambda: answers(f"{sink_url}/healthz"), 30, 0.2, "kubemeter sink")
        for name, factory in factories.items():

            def start(data_dir: Path, factory: Any = factory, name: str = name) -> Any:
                return started(factory, data_dir, logs, name)

            results[name] = {
                **throughput(name, start, work / name, sink_url),
                **sigkill(name, start, work / name, sink_url),
            }
    return results


def run() -> list[dict[str, Any]]:
    binary, error = build_peer()
    if binary is None:
        return [
            {
                "name": "peer/bento/build",
                "value": "failed",
                "unit": f"error: {error}",
                "baseline": "github.com/warpstreamlabs/bento from tools/peer/go.mod",
            }
        ]
    with tempfile.TemporaryDirectory(prefix="kubemeter-bench-peer-") as scratch:
        results = measure(Path(scratch), binary)
    figures: list[dict[str, Any]] = []
    for name, measured in results.items():
        other = "bento" if name == "kubemeter-gateway" else "kubemeter-gateway"
        figures += [
            {
                "name": f"peer/{name}/throughput/ingest",
                "value": round(measured["ingest_per_s"]),
                "unit": f"events/s acknowledged ({THROUGHPUT_EVENTS} events, batches of {BATCH_EVENTS})",
                "baseline": f"peer/{other}/throughput/ingest",
            },
            {
                "name": f"peer/{name}/throughput/end-to-end",
                "value": round(measured["end_to_end_per_s"]),
                "unit": "events/s stored by the sink",
                "baseline": f"peer/{other}/throughput/end-to-end",
            },
            {
                "name": f"peer/{name}/rss-peak",
                "value": mib(measured["rss_peak"]),
                "unit": "MiB",
                "baseline": f"peer/{other}/rss-peak",
            },
            {
                "name": f"peer/{name}/sigkill/lost-acknowledged",
                "value": measured["lost_acknowledged"],
                "unit": f"events of {measured['acked_before_kill']} acknowledged before SIGKILL",
                "baseline": "0",
            },
            {
                "name": f"peer/{name}/sigkill/lost",
                "value": measured["lost"],
                "unit": f"events of {KILL_EVENTS} (unacknowledged batches resent after restart)",
                "baseline": "0",
            },
            {
                "name": f"peer/{name}/sigkill/duplicates",
                "value": measured["duplicates"],
                "unit": "deliveries of an event the sink already held",
                "baseline": f"peer/{other}/sigkill/duplicates",
            },
        ]
    return figures

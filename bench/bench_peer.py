"""The gateway next to a peer (issues 8 and 16): Bento 1.5.2, built from its Go module by
``tools/peer/build.sh``, as ``http_server`` input -> ``sqlite`` buffer -> ``http_client`` output,
beside kubemeter's gateway (HTTP ingest -> durable SQLite queue -> OpenMeter delivery). Both take the
same load from the same senders (:mod:`bench.load`: pre-encoded CloudEvents batches of 1, 100 and
1,000 usage events, ``POST /api/v1/events``, :data:`SENDERS` at a time, each sending its next body
when the last one is acknowledged) and deliver to the same sink (``kubemeter sink``, OpenMeter's
endpoint, which deduplicates on (source, id)).

Settings, stated because they differ: the gateway commits with ``synchronous=FULL`` (an
acknowledged event has been fsync'd); Bento's sqlite buffer runs ``PRAGMA synchronous = 0`` in
SQLite's rollback-journal mode (``internal/impl/sql/buffer_sqlite.go``; it has no setting for it),
so it acknowledges what is only in the page cache. Bento forwards each request body as one request
(``max_in_flight`` 64); the gateway re-batches up to 1,000 events (the most the OpenMeter sink
takes), waiting at most 0.1 s for a fuller batch, its 10 requests/s default rate limit lifted
(Bento has none).

- ``ingest``: events acknowledged per second, first send to last acknowledgement;
  ``end-to-end``: events the sink stored per second, first send until it holds them all.
  Every run gets a fresh pipeline and a fresh sink. :data:`ROUNDS` rounds, the order of the two
  alternating each round; the figures are medians, the ratio is the median of each round's ratio.
- ``rss-peak``: the pipeline's VmRSS, sampled every 100 ms, the largest over its runs.
- ``sigkill``: a fresh instance is killed with SIGKILL when half the batches are acknowledged and
  restarted on the same data; the senders resend what was not acknowledged. The page cache survives
  this, so it cannot tell an fsync'd commit from an unsynced one.
- ``power-loss``: the pipeline's data on an ext4 loop device (:mod:`bench.powerloss`) with the sink
  down, so every acknowledged event is still buffered. Once it runs, ``sync`` puts its files on the
  disk; then the load; right after the last acknowledgement the process is killed and the image
  copied (what a disk holds after a power cut then), and the pipeline restarted on the copy with the
  sink up. ``lost-acknowledged`` counts acknowledged events the sink never got.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml
from kubemeter.api.rendered import GatewayConfig

from bench import powerloss
from bench.bench_operator import RssSampler, kubemeter_process, mib, wait_until
from bench.load import BATCH_CONTENT_TYPE, Sent, event_batches, post_all
from testbed.controlplane import REPO_ROOT, free_port

ABOUT = "gateway vs Bento 1.5.2: ingest and end to end at 1, 100, 1,000 events/request; SIGKILL; power loss"

BUILD_SCRIPT = REPO_ROOT / "tools" / "peer" / "build.sh"
SENDERS = 8
ROUNDS = 3
# Events per run for each request size: a few seconds of work for either pipeline here.
CELLS = {1: 1_000, 100: 20_000, 1000: 40_000}
KILL_EVENTS = 10_000
KILL_BATCH_EVENTS = 100
POWER_EVENTS = 10_000
INGEST_PATH = "/api/v1/events"
GOAL_RATIO = 1.5
GATEWAY_BATCH = {"maxEvents": 1000, "maxDelaySeconds": 0.1}
GATEWAY_RATE_LIMIT = {"requestsPerSecond": 10_000}
BENTO_SETTING = "synchronous=0 (rollback journal), its only setting"
GATEWAY_SETTING = "synchronous=FULL (WAL)"

Starter = Callable[[Path, str], Any]


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


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def bento(binary: Path, data_dir: Path, sink_url: str) -> Iterator[tuple[int, str]]:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
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
    with (data_dir / "bento.log").open("ab") as log:
        process = subprocess.Popen(
            [str(binary), "-c", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/ping"), 30, 0.05, "Bento")
        yield process.pid, f"http://127.0.0.1:{port}{INGEST_PATH}"
    finally:
        stop(process)


@contextmanager
def gateway(data_dir: Path, sink_url: str) -> Iterator[tuple[int, str]]:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
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
    with kubemeter_process(["gateway", "--config", str(config_path)], data_dir / "gateway.log") as process:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/readyz"), 30, 0.05, "kubemeter gateway")
        yield process.pid, f"http://127.0.0.1:{port}{INGEST_PATH}"


@contextmanager
def sink(data_dir: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["sink", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)]
    data_dir.mkdir(parents=True, exist_ok=True)
    with kubemeter_process(args, data_dir.parent / f"{data_dir.name}.log"):
        wait_until(lambda: answers(f"{url}/healthz"), 30, 0.05, "kubemeter sink")
        yield url


# ---- counting -----------------------------------------------------------------------------------


def stored_events(sink_url: str) -> int:
    return int(httpx.get(f"{sink_url}/_sink/stats", timeout=30).json()["storedEvents"])


def stored_ids(sink_url: str, source: str) -> set[str]:
    # 10^6 is the most the sink returns at once (kubemeter.sink.app.MAX_EVENTS_LIMIT).
    response = httpx.get(
        f"{sink_url}/api/v1/usage/events", params={"api": "openmeter", "limit": "1000000"}, timeout=120
    )
    return {e["eventId"] for e in response.json()["events"] if e["source"] == source}


def wait_stored(
    sink_url: str, target: int, settle_s: float = 10.0, poll_s: float = 0.05
) -> tuple[float, int]:
    """Poll until the sink holds ``target`` events, or has not grown for ``settle_s`` (then events
    were lost); returns when, and how many it holds."""
    last, changed_at = -1, time.perf_counter()
    while True:
        stored = stored_events(sink_url)
        now = time.perf_counter()
        if stored >= target:
            return now, stored
        if stored != last:
            last, changed_at = stored, now
        elif now - changed_at > settle_s:
            return now, stored
        time.sleep(poll_s)


def acked_ids(source: str, acked: set[int], batch_events: int) -> set[str]:
    return {f"{source}-{n:08d}" for i in acked for n in range(i * batch_events, (i + 1) * batch_events)}


# ---- the measurements ---------------------------------------------------------------------------


def throughput_run(start: Starter, work: Path, batch_events: int, events: int, tag: str) -> dict[str, Any]:
    """One run on a fresh pipeline and a fresh sink: ingest and end-to-end events/s, peak RSS."""
    source = f"bench/{tag}"
    bodies = event_batches(source, events, batch_events)
    with (
        sink(work / "sink") as sink_url,
        start(work / "pipeline", sink_url) as (pid, url),
        RssSampler(pid) as rss,
    ):
        sent = asyncio.run(post_all(url, bodies, senders=SENDERS))
        stored_at, stored = wait_stored(sink_url, events)
    return {
        "ingest_per_s": len(sent.acked) * batch_events / sent.seconds(),
        "end_to_end_per_s": stored / (stored_at - sent.first_sent_s),
        "stored": stored,
        "rss_peak": rss.peak_bytes,
    }


def sigkill(start: Starter, work: Path, tag: str) -> dict[str, Any]:
    source = f"bench/{tag}/sigkill"
    bodies = event_batches(source, KILL_EVENTS, KILL_BATCH_EVENTS)
    with sink(work / "sink") as sink_url:
        with start(work / "pipeline", sink_url) as (pid, url):

            def kill_at_half(acked_bodies: int) -> None:
                if acked_bodies == len(bodies) // 2:
                    os.kill(pid, signal.SIGKILL)

            sent = asyncio.run(post_all(url, bodies, senders=SENDERS, retry=False, on_ack=kill_at_half))
        acked = acked_ids(source, sent.acked, KILL_BATCH_EVENTS)
        with start(work / "pipeline", sink_url) as (_, url):
            unacked = [i for i in range(len(bodies)) if i not in sent.acked]
            asyncio.run(
                post_all(url, bodies, senders=SENDERS, indices=unacked, sent=Sent(acked=set(sent.acked)))
            )
            wait_stored(sink_url, KILL_EVENTS, settle_s=5.0)
            ids = stored_ids(sink_url, source)
    return {"acked": len(acked), "lost_acknowledged": len(acked - ids), "lost": KILL_EVENTS - len(ids)}


def power_loss(start: Starter, work: Path, tag: str) -> dict[str, Any]:
    """Acknowledged events lost across a simulated power cut (see :mod:`bench.powerloss`)."""
    source = f"bench/{tag}/power"
    bodies = event_batches(source, POWER_EVENTS, KILL_BATCH_EVENTS)
    work.mkdir(parents=True, exist_ok=True)
    image = powerloss.new_image(work / "disk.img")
    dead_sink = f"http://127.0.0.1:{free_port()}"  # nothing listens: every event stays buffered
    volume = work / "before"
    with powerloss.mounted(image, volume), start(volume / "pipeline", dead_sink) as (pid, url):
        os.sync()  # files and schema on disk first, as for a service that has run a while
        sent = asyncio.run(post_all(url, bodies, senders=SENDERS, retry=False))
        os.kill(pid, signal.SIGKILL)
        crashed = powerloss.cut_power(image, work / "after-power-cut.img")
    acked = acked_ids(source, sent.acked, KILL_BATCH_EVENTS)
    restarted, note = True, ""
    with sink(work / "sink") as sink_url, powerloss.mounted(crashed, work / "after") as volume:
        try:
            with start(volume / "pipeline", sink_url):
                wait_stored(sink_url, len(acked), settle_s=5.0)
        except (TimeoutError, RuntimeError) as error:
            restarted, note = False, str(error)[:300]
        ids = stored_ids(sink_url, source)
    image.unlink(missing_ok=True)
    crashed.unlink(missing_ok=True)
    return {"acked": len(acked), "lost_acknowledged": len(acked - ids), "restarted": restarted, "note": note}


def measure(work: Path, binary: Path) -> dict[str, Any]:
    starters: dict[str, Starter] = {
        "kubemeter-gateway": lambda d, s: gateway(d, s),
        "bento": lambda d, s: bento(binary, d, s),
    }
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for round_number in range(ROUNDS):
        for batch_events, events in CELLS.items():
            # Alternate who goes first, so a slow moment on the shared machine does not favour one.
            order = list(starters) if (round_number + batch_events) % 2 == 0 else list(reversed(starters))
            for name in order:
                tag = f"{name}/{batch_events}/r{round_number}"
                result = throughput_run(starters[name], work / tag, batch_events, events, tag)
                runs.setdefault((name, batch_events), []).append(result)
                print(
                    f"round {round_number + 1} {name:<18} {batch_events:>5} events/request: ingest "
                    f"{result['ingest_per_s']:>9,.0f}/s, end to end {result['end_to_end_per_s']:>9,.0f}/s",
                    flush=True,
                )
    kills = {name: sigkill(start, work / f"{name}-sigkill", name) for name, start in starters.items()}
    why_not = powerloss.unavailable()
    power: dict[str, dict[str, Any]] = {}
    if why_not is None:
        for name, start in starters.items():
            try:
                power[name] = power_loss(start, work / f"{name}-power", name)
            except RuntimeError as error:  # a mount refused on this machine: say so, do not guess
                why_not = str(error)[:300]
                power.clear()
                break
    return {"runs": runs, "kills": kills, "power": power, "power_unavailable": why_not}


def ratio_per_round(gateway_runs: list[dict[str, Any]], bento_runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(g[key] / b[key] for g, b in zip(gateway_runs, bento_runs, strict=True)))


def figures_from(measured: dict[str, Any]) -> list[dict[str, Any]]:
    runs = measured["runs"]
    figures: list[dict[str, Any]] = []
    for batch_events in CELLS:
        gateway_runs, bento_runs = runs[("kubemeter-gateway", batch_events)], runs[("bento", batch_events)]
        for key, label in (("ingest_per_s", "ingest"), ("end_to_end_per_s", "end-to-end")):
            for name, these in (("kubemeter-gateway", gateway_runs), ("bento", bento_runs)):
                other = "bento" if name == "kubemeter-gateway" else "kubemeter-gateway"
                setting = GATEWAY_SETTING if name == "kubemeter-gateway" else BENTO_SETTING
                figures.append(
                    {
                        "name": f"peer/{name}/{batch_events}-per-request/{label}",
                        "value": round(statistics.median(r[key] for r in these)),
                        "unit": f"events/s, median of {len(these)} ({setting})",
                        "baseline": f"peer/{other}/{batch_events}-per-request/{label}",
                    }
                )
            figures.append(
                {
                    "name": f"peer/gateway-over-bento/{batch_events}-per-request/{label}",
                    "value": round(ratio_per_round(gateway_runs, bento_runs, key), 2),
                    "unit": f"ratio, median of per-round ratios (Bento at {BENTO_SETTING})",
                    "baseline": f"goal >= {GOAL_RATIO}",
                }
            )
    for name in ("kubemeter-gateway", "bento"):
        other = "bento" if name == "kubemeter-gateway" else "kubemeter-gateway"
        peak = max(r["rss_peak"] for (n, _), rs in runs.items() if n == name for r in rs)
        figures.append(
            {
                "name": f"peer/{name}/rss-peak",
                "value": mib(peak),
                "unit": "MiB",
                "baseline": f"peer/{other}/rss-peak",
            }
        )
        kill = measured["kills"][name]
        figures += [
            {
                "name": f"peer/{name}/sigkill/lost-acknowledged",
                "value": kill["lost_acknowledged"],
                "unit": f"events of {kill['acked']} acknowledged before SIGKILL",
                "baseline": "0",
            },
            {
                "name": f"peer/{name}/sigkill/lost",
                "value": kill["lost"],
                "unit": f"events of {KILL_EVENTS} (unacknowledged batches resent after restart)",
                "baseline": "0",
            },
        ]
        power = measured["power"].get(name)
        if power is None:
            figures.append(
                {
                    "name": f"peer/{name}/power-loss/lost-acknowledged",
                    "value": "not run",
                    "unit": f"{measured['power_unavailable']}",
                    "baseline": "0",
                }
            )
        else:
            restarted = "" if power["restarted"] else f"; did not restart: {power['note']}"
            figures.append(
                {
                    "name": f"peer/{name}/power-loss/lost-acknowledged",
                    "value": power["lost_acknowledged"],
                    "unit": f"events of {power['acked']} acknowledged before the power cut{restarted}",
                    "baseline": "0",
                }
            )
    return figures


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
        measured = measure(Path(scratch), binary)
    return figures_from(measured)

"""Kafka output benchmark: gateway → Kafka (idempotent, ``acks=all``) side by side with gateway →
HTTP (the OpenMeter sink into the local billing API), in one run, alternating rounds.

Each round posts ``EVENTS`` new events to one gateway as fast as it acknowledges them and times
until its buffer is empty again (every event acknowledged by the broker, or stored by the billing
API): ingest and delivery together, the way a gateway works. Rounds alternate Kafka, HTTP, Kafka,
...; the figures are medians and the ratio is the median of the per-round ratios.

Like with like: both gateways run the same code, batch size and buffer; the broker is one Apache
Kafka 4.4 KRaft node on loopback (replication factor 1, so ``acks=all`` waits for one replica; a
three-broker cluster adds the followers' round trip), the billing API is ``kubemeter sink`` on
loopback with spec validation on (it parses every event; the broker does not).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from kubemeter.api.rendered import GatewayConfig

from bench.bench_output import _bodies, _free_port, _send_all, _start, _stop, _wait_ready
from testbed.kafka import KafkaCluster, missing_parts

ABOUT = "gateway to Kafka (acks=all) beside gateway to HTTP, alternating rounds"

EVENTS = 50_000  # per round
ROUNDS = 3
BATCH_EVENTS = 1000
TOPIC = "bench.usage"
DRAIN_TIMEOUT_S = 300.0


def _config(directory: Path, output: dict[str, Any]) -> tuple[GatewayConfig, Path]:
    port = _free_port()
    config = GatewayConfig.model_validate(
        {
            "cluster": "bench",
            "collector": "bench",
            "namespace": "bench",
            "output": {
                **output,
                "batch": {"maxEvents": 1000, "maxDelaySeconds": 0.05},
                "retry": {"initialBackoffSeconds": 0.1, "maxBackoffSeconds": 2},
            },
            "bufferMaxBytes": 4 * 2**30,
            "dataDir": str(directory / "pv"),
            "listenAddress": f"127.0.0.1:{port}",
        }
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "gateway.yaml").write_text(config.to_yaml())
    return config, directory / "gateway.yaml"


async def _round(session: aiohttp.ClientSession, gateway_url: str, bodies: list[bytes]) -> float:
    """Events/s from the first post until the gateway's buffer is empty."""
    started = time.perf_counter()
    await _send_all(session, f"{gateway_url}/api/v1/events", bodies)
    deadline = started + DRAIN_TIMEOUT_S
    while time.perf_counter() < deadline:
        async with session.get(f"{gateway_url}/status") as reply:
            if (await reply.json())["bufferedEvents"] == 0:
                return EVENTS / (time.perf_counter() - started)
        await asyncio.sleep(0.02)
    raise RuntimeError(f"{gateway_url} did not drain {EVENTS} events in {DRAIN_TIMEOUT_S} s")


async def _measure(directory: Path, cluster: KafkaCluster) -> list[dict[str, Any]]:
    sink_port = _free_port()
    sink = _start(
        ["sink", "--host", "127.0.0.1", "--port", str(sink_port), "--data-dir", str(directory / "sink")],
        directory / "sink.log",
    )
    kafka_config, kafka_path = _config(
        directory / "kafka-gateway",
        {"type": "kafka", "kafka": {"bootstrapServers": cluster.bootstrap_servers, "topic": TOPIC}},
    )
    http_config, http_path = _config(
        directory / "http-gateway",
        {
            "type": "openmeter",
            "url": f"http://127.0.0.1:{sink_port}",
            "rateLimit": {"requestsPerSecond": 10_000},
        },
    )
    gateways = {
        "kafka": _start(["gateway", "--config", str(kafka_path)], directory / "kafka-gateway.log"),
        "http": _start(["gateway", "--config", str(http_path)], directory / "http-gateway.log"),
    }
    urls = {
        "kafka": f"http://{kafka_config.listen_address}",
        "http": f"http://{http_config.listen_address}",
    }
    template = _bodies("bench", EVENTS, BATCH_EVENTS)
    rates: dict[str, list[float]] = {"kafka": [], "http": []}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
            await _wait_ready(session, f"http://127.0.0.1:{sink_port}/healthz")
            for url in urls.values():
                await _wait_ready(session, f"{url}/readyz")
            for number in range(ROUNDS):
                for kind in ("kafka", "http"):
                    # New ids every round (the same bytes otherwise): nothing is deduplicated away.
                    prefix = f'"id":"{kind}{number}-'.encode()
                    bodies = [body.replace(b'"id":"bench-', prefix) for body in template]
                    rates[kind].append(await _round(session, urls[kind], bodies))
                print(
                    f"round {number + 1}: gateway->kafka {rates['kafka'][-1]:,.0f} events/s, "
                    f"gateway->http {rates['http'][-1]:,.0f} events/s, "
                    f"ratio {rates['kafka'][-1] / rates['http'][-1]:.2f}",
                    flush=True,
                )
    finally:
        for process in gateways.values():
            _stop(process)
        _stop(sink)
    in_topic = len(cluster.read_topic(TOPIC))
    if in_topic < EVENTS * ROUNDS:
        raise RuntimeError(f"only {in_topic} of {EVENTS * ROUNDS} events are in the topic")
    ratio = statistics.median(k / h for k, h in zip(rates["kafka"], rates["http"], strict=True))
    rate_unit = f"events/s, median of {ROUNDS} alternating rounds of {EVENTS:,} (ingest until acknowledged)"
    return [
        {
            "name": "kafka/gateway-to-kafka-acks-all",
            "value": round(statistics.median(rates["kafka"])),
            "unit": f"{rate_unit}, 1 broker",
            "baseline": "kafka/gateway-to-http-openmeter",
        },
        {
            "name": "kafka/gateway-to-http-openmeter",
            "value": round(statistics.median(rates["http"])),
            "unit": f"{rate_unit}, kubemeter sink",
            "baseline": "kafka/gateway-to-kafka-acks-all",
        },
        {
            "name": "kafka/kafka-over-http-ratio",
            "value": round(ratio, 3),
            "unit": "ratio, median of per-round ratios",
            "baseline": 1.0,
        },
        {
            "name": "kafka/records-in-topic",
            "value": in_topic,
            "unit": "records read back (every round's events)",
            "baseline": EVENTS * ROUNDS,
        },
    ]


def run(directory: Path | None = None) -> list[dict[str, Any]]:
    """Start a broker, measure, print; ``directory`` holds the broker, queues and logs."""
    problem = missing_parts()
    if problem:
        raise RuntimeError(f"bench_kafka needs a Kafka broker: {problem}")
    with tempfile.TemporaryDirectory(prefix="kubemeter-bench-kafka-", dir=directory) as scratch:
        cluster = KafkaCluster(Path(scratch) / "kafka", brokers=1)
        try:
            cluster.start()
            cluster.create_topic(TOPIC, partitions=6, replication=1)
            figures = asyncio.run(_measure(Path(scratch), cluster))
        finally:
            cluster.stop()
    for figure in figures:
        print(
            f"{figure['name']:<48} {figure['value']:>12} {figure['unit']:<10} baseline {figure['baseline']}"
        )
    return figures


if __name__ == "__main__":
    run(Path(os.environ["BENCH_DIR"]) if "BENCH_DIR" in os.environ else None)

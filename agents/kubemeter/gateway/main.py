"""``kubemeter gateway --config gateway.yaml``: the StatefulSet process on the PersistentVolume."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry

from kubemeter.api.collector import BufferFullPolicy, CloudEventsMode, OutputSpec, OutputType
from kubemeter.api.rendered import GatewayConfig
from kubemeter.gateway.agent_reports import AgentReportTable
from kubemeter.gateway.app import GatewayApp
from kubemeter.gateway.limits import HttpLimits, add_limit_arguments, limits_from, make_runner, start_site
from kubemeter.output.credentials import SecretFile
from kubemeter.output.delivery import DeliveryCore, DeliveryPolicy, RecordSink, Sink
from kubemeter.output.queue import DurableQueue, QueueLimits, WhenFull
from kubemeter.output.sinks import CloudEventsSink, FlexpriceSink, LagoSink, OpenMeterSink
from kubemeter.output.sinks.kafka import KafkaCredentialFiles, KafkaSink
from kubemeter.output.sinks.lago import DEFAULT_MAX_BATCH_EVENTS as LAGO_DEFAULT_MAX_BATCH_EVENTS
from kubemeter.output.sinks.lago import SubscriptionMapping

log = logging.getLogger("kubemeter.gateway")

QUEUE_FILE = "queue.db"
# Batches in flight to the billing API. With 2, each batch's ack (an fsync'd commit) and the API's
# answer ran one after the other and the API sat idle between them; 8 let acks share commits and
# kept the sink busy: 30,000 events in 1,000-event requests reached the local sink in 5.1 / 4.6 s
# against 6.5 / 9.2 s with 2 (alternating runs, bench/bench_peer.py's gateway and sink). The rate
# limit still spaces request starts.
DELIVERY_IN_FLIGHT = 8


def sink_for(output: OutputSpec, *, kafka_files: dict[str, str] | None = None) -> Sink | RecordSink:
    """The encoder/classifier for ``output.type`` (``output.headers`` are added by the delivery core)."""
    if output.type is OutputType.KAFKA:
        assert output.kafka is not None  # the model requires it for type kafka
        files = {role: Path(path) for role, path in (kafka_files or {}).items()}
        return KafkaSink(
            output.kafka,
            files=KafkaCredentialFiles(**files),
            max_batch_events=output.batch.max_events,
            ack_timeout_s=output.timeout_seconds,
        )
    url = output.http_url()
    if output.type is OutputType.OPENMETER:
        return OpenMeterSink(url, max_batch_events=output.batch.max_events)
    if output.type is OutputType.FLEXPRICE:
        return FlexpriceSink(url, max_batch_events=min(output.batch.max_events, 1000))
    if output.type is OutputType.LAGO:
        # Lago's server cap is 100 unless raised; only an explicit batch.maxEvents goes beyond it.
        explicit = "max_events" in output.batch.model_fields_set
        return LagoSink(
            url,
            max_batch_events=output.batch.max_events if explicit else LAGO_DEFAULT_MAX_BATCH_EVENTS,
            subscriptions=SubscriptionMapping.from_spec(output.lago),
        )
    structured = output.cloudevents is not None and output.cloudevents.mode is CloudEventsMode.STRUCTURED
    return CloudEventsSink(
        url, mode="structured" if structured else "batch", max_batch_events=output.batch.max_events
    )


def policy_for(output: OutputSpec) -> DeliveryPolicy:
    if output.type is OutputType.KAFKA:
        # A batch is not a request to a metered API: no rate cap unless one is set. An ACL fix on the
        # brokers changes no file here, so a refused write is tried again at the retry cap.
        explicit_rate = "rate_limit" in output.model_fields_set
        return DeliveryPolicy(
            max_batch_events=output.batch.max_events,
            max_batch_delay_s=output.batch.max_delay_seconds,
            initial_backoff_s=output.retry.initial_backoff_seconds,
            max_backoff_s=output.retry.max_backoff_seconds,
            requests_per_second=output.rate_limit.requests_per_second if explicit_rate else None,
            max_in_flight=4,
            request_timeout_s=output.timeout_seconds,
            unauthorized_recheck_s=min(60.0, output.retry.max_backoff_seconds),
        )
    return DeliveryPolicy(
        max_batch_events=output.batch.max_events,
        max_batch_delay_s=output.batch.max_delay_seconds,
        initial_backoff_s=output.retry.initial_backoff_seconds,
        max_backoff_s=output.retry.max_backoff_seconds,
        requests_per_second=output.rate_limit.requests_per_second,
        request_timeout_s=output.timeout_seconds,
        max_in_flight=DELIVERY_IN_FLIGHT,
    )


def limits_for(config: GatewayConfig) -> QueueLimits:
    return QueueLimits(
        max_bytes=config.buffer_max_bytes,
        max_age_s=config.buffer.retention_hours * 3600.0,
        when_full=WhenFull.DROP_OLDEST
        if config.buffer.when_full is BufferFullPolicy.DROP_OLDEST
        else WhenFull.BLOCK,
    )


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"listenAddress {address!r} must be host:port, e.g. 0.0.0.0:8480")
    return host.strip("[]"), int(port)


async def serve(
    config: GatewayConfig, *, ingest_token_file: Path | None, limits: HttpLimits | None = None
) -> None:
    host, port = split_address(config.listen_address)
    queue = await DurableQueue.open(Path(config.data_dir) / QUEUE_FILE, limits_for(config))
    registry = CollectorRegistry()
    credentials = SecretFile(Path(config.credentials_file)) if config.credentials_file else None
    if config.output.type is OutputType.KAFKA and "password" in config.kafka_files:
        # While paused on refused SASL credentials, a new password resumes delivery at once.
        credentials = SecretFile(Path(config.kafka_files["password"]))
    delivery = DeliveryCore(
        queue,
        sink_for(config.output, kafka_files=config.kafka_files),
        policy=policy_for(config.output),
        credentials=credentials,
        registry=registry,
        headers=config.output.headers,
    )
    token_path = ingest_token_file or (Path(config.ingest_token_file) if config.ingest_token_file else None)
    token = SecretFile(token_path) if token_path else None
    if token is None:
        log.warning("no ingest token file given: anyone who reaches the gateway can send events")
    limits = limits or HttpLimits()
    gateway = GatewayApp(
        queue,
        delivery=delivery,
        ingest_token=token,
        registry=registry,
        limits=limits,
        agent_reports=AgentReportTable(config.agent_report_ttl_seconds),
    )
    runner = make_runner(gateway.build(), limits)
    await runner.setup()
    listener = await start_site(runner, gateway.guard, host, port)
    await delivery.start()
    stats = queue.stats()
    log.info(
        "gateway listening on %s:%d; %d events (%d bytes) buffered; delivering to %s %s",
        host,
        port,
        stats.events,
        stats.payload_bytes,
        config.output.type.value,
        config.output.url or ",".join(config.output.kafka.bootstrap_servers if config.output.kafka else []),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("stopping: no more ingest; undelivered events stay on the volume")
        listener.close()
        await delivery.stop()
        await runner.cleanup()
        await listener.wait_closed()
        await queue.close()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="kubemeter gateway", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="gateway.yaml rendered by the operator")
    parser.add_argument(
        "--ingest-token-file",
        type=Path,
        help="bearer token(s) agents and applications must send, one per line, re-read on change; "
        "overrides ingestTokenFile of the config",
    )
    parser.add_argument(
        "--listen-address",
        help="host:port overriding listenAddress of the config (hostNetwork pods bind their pod IP)",
    )
    add_limit_arguments(parser)
    args = parser.parse_args(list(argv))
    limits = limits_from(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 dumps every thread's stack
    try:
        config = GatewayConfig.from_yaml(args.config.read_text())
    except (OSError, ValueError) as error:
        parser.error(f"cannot read {args.config}: {error}")
    if args.listen_address:
        config = config.model_copy(update={"listen_address": args.listen_address})
    asyncio.run(serve(config, ingest_token_file=args.ingest_token_file, limits=limits))
    return 0

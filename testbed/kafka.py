"""A real Apache Kafka (4.x, KRaft) on loopback from the Maven Central jars tools/build.sh caches.

One combined broker+controller, or a static three-node quorum for the fault tests; optionally
SASL (PLAIN for the admin, SCRAM-SHA-512 for clients) with the StandardAuthorizer, so ACLs refuse.
Each node is a ``java`` child process of this one, logging to ``<dir>/node-<id>/server.log``.

    python -m testbed.kafka up [--brokers 3] [--dir .state/kafka]   # until Ctrl-C
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka import admin as kafka_admin
from confluent_kafka.admin import AdminClient

# Exported at runtime, not in the package's stubs.
AclBinding: Any = getattr(kafka_admin, "AclBinding")  # noqa: B009
AclOperation: Any = getattr(kafka_admin, "AclOperation")  # noqa: B009
AclPermissionType: Any = getattr(kafka_admin, "AclPermissionType")  # noqa: B009
NewTopic: Any = getattr(kafka_admin, "NewTopic")  # noqa: B009
ResourcePatternType: Any = getattr(kafka_admin, "ResourcePatternType")  # noqa: B009
ResourceType: Any = getattr(kafka_admin, "ResourceType")  # noqa: B009

REPO_ROOT = Path(__file__).resolve().parents[1]
STARTED_LINE = "Kafka Server started"
ADMIN_USER, ADMIN_PASSWORD = "admin", "admin-secret"
_LOG4J2 = """\
Configuration:
  status: warn
  Appenders:
    File:
      name: file
      fileName: "${sys:kafka.logs.dir}/server.log"
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: info
      AppenderRef:
        - ref: file
    Logger:
      - name: kafka.request.logger
        level: warn
      - name: org.apache.kafka.controller
        level: info
"""
# A log4j2 YAML config needs jackson-dataformat-yaml; Kafka ships it (it is in the lock).


def kafka_lib_dir() -> Path:
    """The jars ``tools/build.sh`` fetched (``KUBEMETER_KAFKA_LIB`` overrides)."""
    if "KUBEMETER_KAFKA_LIB" in os.environ:
        return Path(os.environ["KUBEMETER_KAFKA_LIB"])
    out = subprocess.run(
        [str(REPO_ROOT / "tools" / "build.sh"), "--bin-dir"], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip()) / "kafka-lib"


def missing_parts() -> str | None:
    """Why a broker cannot start here, or None."""
    if shutil.which("java") is None:
        return "java is not installed (apt-get install openjdk-17-jre-headless)"
    lib = kafka_lib_dir()
    if not (lib / ".verified").exists():
        return f"the Kafka jars are not in {lib}; run tools/build.sh"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class KafkaNode:
    node_id: int
    directory: Path
    port: int
    controller_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class KafkaCluster:
    """``brokers`` combined broker+controller nodes on 127.0.0.1; ``sasl`` turns on SASL and ACLs."""

    root: Path
    brokers: int = 1
    sasl: bool = False
    heap: str = "384m"
    nodes: list[KafkaNode] = field(default_factory=list)
    cluster_id: str = ""
    scram_users: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.nodes = [
            KafkaNode(n, self.root / f"node-{n}", _free_port(), _free_port())
            for n in range(1, self.brokers + 1)
        ]

    # -- addresses -----------------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    def client_config(self) -> dict[str, str | int | float | bool]:
        """Settings for an admin or consumer client of this cluster (the admin principal)."""
        config: dict[str, str | int | float | bool] = {
            "bootstrap.servers": ",".join(self.bootstrap_servers),
            "log_level": 2,  # a stopped broker is the tests' doing: no "Connection refused" lines
        }
        if self.sasl:
            config |= {
                "security.protocol": "sasl_plaintext",
                "sasl.mechanism": "PLAIN",
                "sasl.username": ADMIN_USER,
                "sasl.password": ADMIN_PASSWORD,
            }
        return config

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout_s: float = 90.0) -> None:
        self.cluster_id = self.cluster_id or self._java("kafka.tools.StorageTool", "random-uuid").strip()
        for node in self.nodes:
            self._format(node)
        for node in self.nodes:
            self._launch(node)
        for node in self.nodes:
            self._wait_started(node, timeout_s)
        self._wait_ready(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every node at once (a quorum stops together), SIGKILL what is left after the timeout."""
        running = [
            node.process for node in self.nodes if node.process is not None and node.process.poll() is None
        ]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill_node(self, node_id: int) -> None:
        node = self.node(node_id)
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(timeout=30)

    def stop_node(self, node_id: int, timeout_s: float = 15.0) -> None:
        node = self.node(node_id)
        if node.process is None or node.process.poll() is not None:
            return
        node.process.send_signal(signal.SIGTERM)
        try:
            node.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()

    def start_node(self, node_id: int, timeout_s: float = 90.0) -> None:
        node = self.node(node_id)
        self._launch(node)
        self._wait_started(node, timeout_s)

    def node(self, node_id: int) -> KafkaNode:
        return self.nodes[node_id - 1]

    # -- topics, ACLs, reading -----------------------------------------------------------------

    def admin(self) -> AdminClient:
        return AdminClient(self.client_config())

    def create_topic(
        self,
        name: str,
        *,
        partitions: int = 3,
        replication: int | None = None,
        config: dict[str, str] | None = None,
    ) -> None:
        replication = replication or min(3, self.brokers)
        topic = NewTopic(name, num_partitions=partitions, replication_factor=replication, config=config or {})
        admin = self.admin()  # kept referenced: a collected client fails its futures (_DESTROY)
        for future in admin.create_topics([topic], operation_timeout=30).values():
            future.result(timeout=60)
        self._wait_for_leaders(name, partitions)

    def _wait_for_leaders(self, name: str, partitions: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        admin = self.admin()
        while time.monotonic() < deadline:
            topics = admin.list_topics(name, timeout=10).topics
            meta = topics.get(name)
            if (
                meta is not None
                and meta.error is None
                and len(meta.partitions) == partitions
                and all(p.leader >= 0 for p in meta.partitions.values())
            ):
                return
            time.sleep(0.1)
        raise TimeoutError(f"topic {name} has no leader for every partition after {timeout_s} s")

    def partition_leaders(self, name: str) -> dict[int, int]:
        meta = self.admin().list_topics(name, timeout=10).topics[name]
        return {p.id: p.leader for p in meta.partitions.values()}

    def allow_write(self, principal: str, topic: str) -> None:
        """ACLs a producer needs on ``topic``: WRITE and DESCRIBE."""
        bindings = [
            AclBinding(
                ResourceType.TOPIC,
                topic,
                ResourcePatternType.LITERAL,
                principal,
                "*",
                operation,
                AclPermissionType.ALLOW,
            )
            for operation in (AclOperation.WRITE, AclOperation.DESCRIBE)
        ]
        admin = self.admin()
        for future in admin.create_acls(bindings).values():
            future.result(timeout=30)

    def read_topic(
        self, name: str, timeout_s: float = 60.0
    ) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
        """Every record in the topic now: (key, value, headers), read from the start to the end offsets."""
        consumer = Consumer(
            self.client_config()
            | {
                "group.id": f"reader-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
            }
        )
        try:
            meta = consumer.list_topics(name, timeout=10).topics[name]
            if meta.error is not None:
                raise KafkaException(meta.error)
            ends: dict[int, int] = {}
            for partition in meta.partitions:
                _, high = consumer.get_watermark_offsets(TopicPartition(name, partition), timeout=10)
                ends[partition] = high
            consumer.assign([TopicPartition(name, p, 0) for p in ends])
            records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = []
            done = {p for p, high in ends.items() if high == 0}
            deadline = time.monotonic() + timeout_s
            while len(done) < len(ends):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"read {len(records)} records of {name}, not yet to the end offsets")
                for message in consumer.consume(1000, timeout=1.0):
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            continue
                        raise KafkaException(error)
                    raw_headers: Any = message.headers() or []
                    headers = [(str(name), _bytes(raw)) for name, raw in raw_headers]
                    records.append((_bytes(message.key()), _bytes(message.value()), headers))
                    if (message.offset() or 0) + 1 >= ends[message.partition() or 0]:
                        done.add(message.partition() or 0)
            return records
        finally:
            consumer.close()

    # -- internals -----------------------------------------------------------------------------

    def _java(self, main_class: str, *args: str) -> str:
        command = ["java", "-Xmx256m", "-cp", f"{kafka_lib_dir()}/*", main_class, *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{main_class} {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result.stdout

    def _properties(self, node: KafkaNode) -> str:
        replication = min(3, self.brokers)
        client = "SASL_PLAINTEXT" if self.sasl else "PLAINTEXT"
        lines = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "listeners": f"{client}://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"{client}://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            "listener.security.protocol.map": f"{client}:{client},CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": client,
            "log.dirs": str(node.directory / "data"),
            "num.partitions": "3",
            "default.replication.factor": str(replication),
            "min.insync.replicas": str(min(2, replication)),
            "offsets.topic.replication.factor": str(replication),
            "transaction.state.log.replication.factor": str(replication),
            "transaction.state.log.min.isr": str(min(2, replication)),
            "share.coordinator.state.topic.replication.factor": str(replication),
            "share.coordinator.state.topic.min.isr": str(min(2, replication)),
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "unclean.leader.election.enable": "false",
            # A killed node's partitions move within seconds, not the default 9 s.
            "broker.session.timeout.ms": "6000",
            "broker.heartbeat.interval.ms": "1000",
        }
        if self.brokers == 1:
            lines["controller.quorum.bootstrap.servers"] = f"127.0.0.1:{node.controller_port}"
        else:
            lines["controller.quorum.voters"] = ",".join(
                f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes
            )
        if self.sasl:
            users = " ".join(f'user_{u}="{p}"' for u, p in {ADMIN_USER: ADMIN_PASSWORD}.items())
            lines |= {
                "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-512",
                "sasl.mechanism.inter.broker.protocol": "PLAIN",
                "listener.name.sasl_plaintext.plain.sasl.jaas.config": (
                    "org.apache.kafka.common.security.plain.PlainLoginModule required "
                    f'username="{ADMIN_USER}" password="{ADMIN_PASSWORD}" {users};'
                ),
                "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config": (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                ),
                "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                # The controller listener is plaintext (ANONYMOUS) on loopback.
                "super.users": f"User:{ADMIN_USER};User:ANONYMOUS",
                "allow.everyone.if.no.acl.found": "false",
            }
        return "".join(f"{key}={value}\n" for key, value in lines.items())

    def _format(self, node: KafkaNode) -> None:
        if (node.directory / "data" / "meta.properties").exists():
            return
        node.directory.mkdir(parents=True, exist_ok=True)
        properties = node.directory / "server.properties"
        properties.write_text(self._properties(node))
        (node.directory / "log4j2.yaml").write_text(_LOG4J2)
        args = ["format", "-t", self.cluster_id, "-c", str(properties)]
        if self.brokers == 1:
            args.append("--standalone")
        for user, password in self.scram_users.items():
            args += ["--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]"]
        self._java("kafka.tools.StorageTool", *args)

    def _launch(self, node: KafkaNode) -> None:
        command = [
            "java",
            f"-Xmx{self.heap}",
            "-Xss512k",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            f"-Dlog4j2.configurationFile={node.directory / 'log4j2.yaml'}",
            f"-Dkafka.logs.dir={node.directory}",
            "-cp",
            f"{kafka_lib_dir()}/*",
            "kafka.Kafka",
            str(node.directory / "server.properties"),
        ]
        self._started_lines = getattr(self, "_started_lines", {})
        self._started_lines[node.node_id] = self._count_started(node)
        stdout = (node.directory / "stdout.log").open("ab")
        node.process = subprocess.Popen(
            command, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _count_started(self, node: KafkaNode) -> int:
        if not node.log_path.exists():
            return 0
        return node.log_path.read_text(errors="replace").count(STARTED_LINE)

    def _wait_started(self, node: KafkaNode, timeout_s: float) -> None:
        before = self._started_lines.get(node.node_id, 0)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._count_started(node) > before:
                return
            if node.process is not None and node.process.poll() is not None:
                raise RuntimeError(f"kafka node {node.node_id} exited: {self.log_tail(node)}")
            time.sleep(0.1)
        raise TimeoutError(
            f"kafka node {node.node_id} not started after {timeout_s} s: {self.log_tail(node)}"
        )

    def _wait_ready(self, timeout_s: float) -> None:
        """Every broker registered and answering metadata."""
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                brokers = self.admin().list_topics(timeout=5).brokers
                if len(brokers) == self.brokers:
                    return
            except KafkaException as error:
                last = error
            time.sleep(0.2)
        raise TimeoutError(f"kafka cluster not ready after {timeout_s} s ({last})")

    def log_tail(self, node: KafkaNode, lines: int = 20) -> str:
        text = ""
        for path in (node.log_path, node.directory / "stdout.log"):
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text


def _bytes(value: str | bytes | None) -> bytes:
    return value.encode() if isinstance(value, str) else (value or b"")


@contextlib.contextmanager
def running_cluster(root: Path, **options: object) -> Iterator[KafkaCluster]:
    cluster = KafkaCluster(root, **options)  # type: ignore[arg-type]
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.kafka", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start brokers on loopback until Ctrl-C")
    up.add_argument("--brokers", type=int, default=1, choices=(1, 3))
    up.add_argument("--dir", type=Path, default=REPO_ROOT / ".state" / "kafka")
    up.add_argument("--topic", default="kubemeter.usage", help="create this topic (3 partitions)")
    args = parser.parse_args(argv)
    problem = missing_parts()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    shutil.rmtree(args.dir, ignore_errors=True)
    started = time.monotonic()
    with running_cluster(args.dir, brokers=args.brokers) as cluster:
        cluster.create_topic(args.topic)
        print(
            f"kafka up in {time.monotonic() - started:.1f} s: "
            f"bootstrap {','.join(cluster.bootstrap_servers)}, "
            f"topic {args.topic}; logs in {args.dir}; Ctrl-C stops it",
            flush=True,
        )
        stop = False

        def _stop(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, _stop)
        with contextlib.suppress(KeyboardInterrupt):
            while not stop and all(node.running() for node in cluster.nodes):
                time.sleep(0.5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

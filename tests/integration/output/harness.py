"""Real parts for the output tests: the local billing API in-process, the gateway as a process,
usage events, free ports, and waiting for conditions."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from kubemeter.api.rendered import GatewayConfig
from kubemeter.events import UsageEvent
from kubemeter.output.credentials import SecretFile
from kubemeter.output.delivery import DeliveryPolicy
from kubemeter.sink.app import SinkApp
from kubemeter.sink.store import UsageStore

from tests.support.billing_specs import spec_validators

REPO_ROOT = Path(__file__).resolve().parents[3]
WINDOW_END = datetime(2025, 8, 22, 12, 0, tzinfo=UTC)

# Retries in tests: fast, so a fault costs milliseconds, not the production minutes.
FAST_POLICY = DeliveryPolicy(
    max_batch_events=1000,
    max_batch_delay_s=0.05,
    initial_backoff_s=0.05,
    max_backoff_s=0.5,
    max_in_flight=2,
    request_timeout_s=10.0,
    unauthorized_recheck_s=30.0,
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def usage_events(count: int, *, prefix: str = "km", value: float = 1.5) -> list[UsageEvent]:
    return [
        UsageEvent(
            id=f"{prefix}-{n:06d}",
            source="kubemeter/test-cluster",
            type="io.kubemeter.gpu.seconds",
            subject=f"team-{n % 4}",
            time=WINDOW_END + timedelta(minutes=n % 7),
            data={
                "value": value,
                "unit": "s",
                "namespace": "ml",
                "pod": f"p-{n}",
                "node": "n1",
                "complete": True,
            },
        )
        for n in range(count)
    ]


async def eventually(
    predicate: Callable[[], Any | Awaitable[Any]], *, timeout_s: float = 30.0, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


class LocalBillingApi:
    """``kubemeter sink`` in this process, with spec validation on, on a fixed port so it can be
    stopped and started again (an outage)."""

    def __init__(
        self, data_dir: Path, *, token_file: Path | None = None, lago_max_batch_events: int = 100
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.token_file = token_file
        self.lago_max_batch_events = lago_max_batch_events
        self._runner: web.AppRunner | None = None
        self._store: UsageStore | None = None
        self.app: SinkApp | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._store = await UsageStore.open(self.data_dir / "usage.db")
        token = SecretFile(self.token_file) if self.token_file else None
        self.app = SinkApp(
            self._store,
            token=token,
            validators=spec_validators(),
            lago_max_batch_events=self.lago_max_batch_events,
            faults_enabled=True,
        )
        self._runner = web.AppRunner(self.app.build(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            reply = await client.get(f"{self.url}/_sink/stats")
            reply.raise_for_status()
            stats: dict[str, Any] = reply.json()
            return stats

    async def events(self) -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as client:
            reply = await client.get(f"{self.url}/api/v1/usage/events")
            events: list[dict[str, Any]] = reply.json()["events"]
            return events

    async def inject(self, status: int, *, requests: int = 1, retry_after_s: float | None = None) -> None:
        async with httpx.AsyncClient() as client:
            body = {"status": status, "requests": requests, "retryAfterSeconds": retry_after_s}
            # Fault injection needs the sink's token when it has one.
            token = self.token_file.read_text().split()[0] if self.token_file else None
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            reply = await client.post(f"{self.url}/_sink/faults", json=body, headers=headers)
            reply.raise_for_status()


def assert_exactly_once(stats: dict[str, Any], events: list[dict[str, Any]], expected_ids: set[str]) -> None:
    """Zero lost, zero billed twice, every payload valid against its spec; prints the counts."""
    stored_ids = [event["eventId"] for event in events]
    lost = expected_ids - set(stored_ids)
    billed_twice = len(stored_ids) - len(set(stored_ids))
    print(
        f"expected={len(expected_ids)} stored={len(stored_ids)} lost={len(lost)} billed_twice={billed_twice} "
        f"duplicates_deduplicated={stats['duplicateEvents']} requests={stats['requests']} "
        f"rejected_requests={stats['rejectedRequests']} spec_violations={stats['specViolations']}"
    )
    assert not lost, f"{len(lost)} events lost, e.g. {sorted(lost)[:3]}"
    assert billed_twice == 0
    assert set(stored_ids) == expected_ids
    assert stats["specViolations"] == 0


class SecretVolume:
    """A Secret as the kubelet mounts it: ``<key> -> ..data/<key>``, ``..data -> ..<timestamp>``;
    an update writes a new timestamped directory and swaps ``..data`` in one rename."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._generation = 0

    def path(self, key: str) -> Path:
        return self.directory / key

    def write(self, **keys: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._generation += 1
        payload = self.directory / f"..{self._generation:04d}_{time.time_ns()}"
        payload.mkdir()
        for key, value in keys.items():
            (payload / key).write_text(value)
        staged = self.directory / "..data_tmp"
        staged.symlink_to(payload.name)
        staged.rename(self.directory / "..data")
        for key in keys:
            if not self.path(key).is_symlink():
                self.path(key).symlink_to(f"..data/{key}")


class GatewayProcess:
    """``python -m kubemeter_cli gateway`` as a child process (so it can be SIGKILLed)."""

    def __init__(
        self,
        work_dir: Path,
        config: GatewayConfig,
        *,
        ingest_token_file: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.work_dir = work_dir
        self.extra_args = list(extra_args)
        self.config = config
        self.port = int(config.listen_address.rpartition(":")[2])
        self.config_path = work_dir / "gateway.yaml"
        self.config_path.write_text(config.to_yaml())
        self.ingest_token_file = ingest_token_file
        self.log_path = work_dir / "gateway.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [sys.executable, "-m", "kubemeter_cli", "gateway", "--config", str(self.config_path)]
        if self.ingest_token_file:
            command += ["--ingest-token-file", str(self.ingest_token_file)]
        command += self.extra_args
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
        self.starts += 1

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        async def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited with {self.process.returncode}: {self.log_tail()}")
            try:
                async with httpx.AsyncClient(timeout=1.0) as client:
                    return (await client.get(f"{self.url}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(ready, timeout_s=timeout_s, what="the gateway to be ready")

    async def status(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5.0) as client:
            reply = await client.get(f"{self.url}/status")
            status: dict[str, Any] = reply.json()
            return status

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def terminate(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def gateway_config(
    work_dir: Path,
    billing_url: str,
    *,
    output_type: str = "openmeter",
    credentials_file: Path | None = None,
    buffer_max_bytes: int = 256 * 2**20,
    data_dir: Path | None = None,
    batch_max_events: int = 500,
    ingest_token_file: Path | None = None,
    output_options: dict[str, Any] | None = None,
) -> GatewayConfig:
    """``output_options`` are merged into ``output`` (e.g. ``lago``, ``cloudevents``, ``headers``)."""
    output: dict[str, Any] = {
        "type": output_type,
        "url": billing_url,
        "batch": {"maxEvents": batch_max_events, "maxDelaySeconds": 0.05},
        "retry": {"initialBackoffSeconds": 0.05, "maxBackoffSeconds": 0.5},
        "rateLimit": {"requestsPerSecond": 1000},
        "timeoutSeconds": 10,
        **(output_options or {}),
    }
    if credentials_file is not None:
        output["credentialsSecretRef"] = {"name": "billing", "key": "token"}
    return GatewayConfig.model_validate(
        {
            "cluster": "test-cluster",
            "collector": "default",
            "namespace": "kubemeter",
            "output": output,
            "credentialsFile": str(credentials_file) if credentials_file else None,
            "ingestTokenFile": str(ingest_token_file) if ingest_token_file else None,
            "bufferMaxBytes": buffer_max_bytes,
            "dataDir": str(data_dir or work_dir / "data"),
            "listenAddress": f"127.0.0.1:{free_port()}",
        }
    )

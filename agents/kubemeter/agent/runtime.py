"""``kubemeter agent``: one process per node per Collector.

Tasks on one event loop: the pod watch (this node only) and the namespace watch, a node refresher,
one task per meter (each with its source), the config-file watcher, the checkpoint heartbeat, the
fault reporter (source faults to the gateway) and the HTTP server for ``/healthz``, ``/readyz``,
``/livez`` and ``/metrics``.

On SIGTERM the agent stops its meters and forwards its spool for up to ``SHUTDOWN_GRACE_S``; what
is left resumes at the next start. If its node has been deleted there is no next start, so it first
closes, for every meter, the windows up to the moment the node's last pod ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kubemeter.agent.checkpoint import CheckpointStore
from kubemeter.agent.fault_report import FaultReporter
from kubemeter.agent.http import serve
from kubemeter.agent.memory import release_freed_memory
from kubemeter.agent.meters import MeterRunner, World
from kubemeter.agent.sources import build_source
from kubemeter.agent.telemetry import Telemetry
from kubemeter.api.rendered import (
    HEALTH_PATH,
    LIVENESS_PATH,
    METRICS_PATH,
    READINESS_PATH,
    AgentConfig,
    AgentStatusReport,
    ResolvedMeter,
)
from kubemeter.metering.windows import next_boundary_ms, window_containing, windows_between
from kubemeter.output import EventOutput
from kubemeter.output.credentials import SecretFile
from kubemeter.sources.allocation import held_interval
from kubemeter.sources.informer import Informer, now_ms
from kubemeter.sources.kube import KubeApi, KubeApiError, KubeCredentials
from kubemeter.sources.kubelet import KubeletPoller, kubelet_stats_url

log = logging.getLogger(__name__)

CONFIG_POLL_S = 1.0
NODE_REFRESH_S = 30.0
# On SIGTERM: the most time spent finishing a deleted node's windows and forwarding the spool
# (within the DaemonSet's terminationGracePeriodSeconds, 30 s by default).
SHUTDOWN_GRACE_S = 20.0
OutputFactory = Callable[[AgentConfig], EventOutput]


def pod_key(obj: Any) -> str:
    return str(obj["metadata"]["uid"])


def name_key(obj: Any) -> str:
    return str(obj["metadata"]["name"])


class Agent:
    def __init__(
        self,
        config_path: Path,
        node_name: str,
        output_factory: OutputFactory,
        kubeconfig: str | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "0.0.0.0",
    ) -> None:
        self.config_path = config_path
        self.config_text = config_path.read_text()
        self.config = AgentConfig.from_yaml(self.config_text)
        self.node_name = node_name
        self.output = output_factory(self.config)
        self.kubeconfig = kubeconfig
        self.metrics_port = self.config.metrics_port if metrics_port is None else metrics_port
        self.metrics_host = metrics_host
        self.telemetry = Telemetry()
        self.store = CheckpointStore(self.config.checkpoint_dir)
        self.runners: dict[str, tuple[MeterRunner, asyncio.Task[None]]] = {}
        self.saved_pod_versions: dict[str, str] = {}
        self.stopping: asyncio.Event | None = None
        token_file = self.config.ingest_token_file
        self.fault_reporter = FaultReporter(
            node_name,
            lambda: self.config.gateway_url,
            lambda: self.config.fault_report_refresh_seconds,
            SecretFile(Path(token_file)) if token_file else None,
        )

    async def run(self) -> None:
        """Meter until SIGTERM (or :meth:`stop`), then shut down cleanly."""
        self.stopping = asyncio.Event()
        # Not in the main thread (tests), there is no signal handler; stop() still works.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.stopping.set)
        credentials = KubeCredentials.load(self.kubeconfig)
        api = KubeApi(credentials)
        try:
            pods = Informer(
                api,
                "/api/v1/pods",
                {"fieldSelector": f"spec.nodeName={self.node_name}"},
                pod_key,
                "pods",
                on_error=self.telemetry.source_error,
            )
            namespaces = Informer(
                api, "/api/v1/namespaces", {}, name_key, "namespaces", on_error=self.telemetry.source_error
            )
            # Pods known before a restart and the watch's resume point: the watch goes on from there
            # and delivers the final state of what ended while the agent was down (a relist only if
            # the API server no longer has that point).
            saved_pods, self.saved_pod_versions = self.store.load_pods()
            pods.healthy_through_ms = self.store.last_heartbeat_ms() or 0
            pods.resume_from(self.store.resume_point(), saved_pods)
            self.world = World(self.config.cluster, self.node_name, pods, namespaces, api)
            self.api, self.credentials = api, credentials
            self.kubelet = KubeletPoller(
                self.config.interval_seconds * 1000,
                self._kubelet_url,
                lambda: credentials.token,
                on_error=self.telemetry.source_error,
            )
            background = [
                asyncio.create_task(self.kubelet.run(), name="kubelet"),
                asyncio.create_task(pods.run(), name="pod watch"),
                asyncio.create_task(namespaces.run(), name="namespace watch"),
                asyncio.create_task(self._refresh_node(), name="node"),
                asyncio.create_task(self.fault_reporter.run(), name="fault reports"),
            ]
            server = await self._serve_http()
            try:
                metering = asyncio.create_task(self._meter(pods, namespaces, background), name="metering")
                stop = asyncio.create_task(self.stopping.wait(), name="stop")
                await asyncio.wait({metering, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if metering.done():
                    metering.result()  # it only ends by raising
                metering.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await metering
                await self._shut_down()
            finally:
                for task in background + [task for _, task in self.runners.values()]:
                    task.cancel()
                server.close()
                self.store.close()
        finally:
            await api.close()

    def stop(self) -> None:
        """What SIGTERM does: stop metering, finish up (see :meth:`_shut_down`), return from run()."""
        if self.stopping is not None:
            self.stopping.set()

    async def _meter(
        self, pods: Informer, namespaces: Informer, background: list[asyncio.Task[None]]
    ) -> None:
        start = getattr(self.output, "start", None)
        if start is not None:
            await start()  # forwards what a killed run left in the spool, before any new window
        await pods.synced.wait()
        await namespaces.synced.wait()
        self.apply_meters(self.config)
        release_freed_memory()  # the first LIST is garbage now, the CEL parser no longer needed
        background.append(asyncio.create_task(self._watch_config(), name="config"))
        await self._housekeeping()

    # ---- shutdown ---------------------------------------------------------------------------------
    async def _shut_down(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_GRACE_S
        tasks = [task for _, task in self.runners.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.runners and await self._node_deleted():
            await self._finish_deleted_node(deadline - SHUTDOWN_GRACE_S / 2)
        close = getattr(self.output, "close", None)
        if close is not None:
            drained = await close(max(0.0, deadline - loop.time()))
            if not drained:
                log.warning("stopping with events left in the spool; the next start forwards them")
        log.info("stopped")

    async def _node_deleted(self) -> bool:
        try:
            await self.api.get(f"/api/v1/nodes/{self.node_name}")
        except KubeApiError as error:
            return error.status == 404
        except Exception as error:  # unreachable API server: assume the node is still there
            log.warning("cannot tell whether node %s still exists: %s", self.node_name, error)
        return False

    async def _finish_deleted_node(self, deadline: float) -> None:
        """The node is gone, so no pod starts here again and no later agent meters these pods. Once
        every metered pod is seen ended, close each meter's windows through the last end now rather
        than after the windows end, which this process would not live to see."""
        loop = asyncio.get_running_loop()
        for runner, _ in self.runners.values():
            ends_ms = self._pod_ends_ms(runner)
            while None in ends_ms and loop.time() < deadline:
                await asyncio.sleep(0.2)
                ends_ms = self._pod_ends_ms(runner)
            # A barrier through now: the pods' final states are then certain, not as last seen.
            await self.world.pods.catch_up(now_ms(), timeout_s=max(0.1, deadline - loop.time()))
            if None in ends_ms:
                log.warning(
                    "node %s is deleted but meter %s still sees pods running; their last windows stay open",
                    self.node_name,
                    runner.name,
                )
                horizon_ms = runner.horizon_ms(now_ms())
            else:
                last_end_ms = max((end for end in ends_ms if end is not None), default=runner.cursor_ms)
                horizon_ms = max(runner.cursor_ms, next_boundary_ms(last_end_ms - 1, runner.window_ms))
            for window in windows_between(runner.cursor_ms, horizon_ms, runner.window_ms):
                await runner.close_window(window)
            log.info(
                "node %s is deleted: meter %s closed through %d ms",
                self.node_name,
                runner.name,
                runner.cursor_ms,
            )

    @staticmethod
    def _pod_ends_ms(runner: MeterRunner) -> list[int | None]:
        """When each pod the meter selects released its resources; None while it still holds them."""
        return [held_interval(record)[0].end_ms for record in runner.selected_pods().values()]

    # ---- meters and configuration -----------------------------------------------------------------
    def _kubelet_url(self) -> str:
        if self.config.kubelet_url:
            return self.config.kubelet_url.rstrip("/") + "/stats/summary?only_cpu_and_memory=true"
        return kubelet_stats_url(self.world.node)

    def apply_meters(self, config: AgentConfig) -> None:
        """Start new meters, re-configure changed ones in place (same cursor), stop removed ones."""
        wanted = {meter.uid: meter for meter in config.meters}
        for uid in list(self.runners):
            if uid not in wanted:
                runner, task = self.runners.pop(uid)
                task.cancel()
                log.info("meter %s removed; its checkpoint stays for a later return", runner.name)
        for uid, meter in wanted.items():
            if uid in self.runners:
                runner, task = self.runners[uid]
                if runner.meter.spec.source == meter.spec.source:
                    runner.configure(meter)
                    continue
                task.cancel()  # a different source: start over from the same cursor
                del self.runners[uid]
            self._start_meter(meter, config)

    def _start_meter(self, meter: ResolvedMeter, config: AgentConfig) -> None:
        saved = self.store.meter(meter.uid)
        not_before_ms = (
            saved[0] if saved else window_containing(now_ms(), meter.spec.window_seconds * 1000).start_ms
        )
        source = build_source(
            meter, self.world, config, not_before_ms, self.kubelet, on_error=self.telemetry.source_error
        )
        runner = MeterRunner(
            meter,
            source,
            self.world,
            self.store,
            self.output,
            self.telemetry,
            min(1.0, config.interval_seconds),
        )
        self.runners[meter.uid] = (runner, asyncio.create_task(runner.run(), name=f"meter {runner.name}"))

    async def _watch_config(self) -> None:
        while True:
            await asyncio.sleep(CONFIG_POLL_S)
            try:
                text = self.config_path.read_text()
            except OSError:
                continue  # a ConfigMap update swaps a symlink; the file is back on the next poll
            if text == self.config_text:
                continue
            try:
                config = AgentConfig.from_yaml(text)
                self.apply_meters(config)
            except Exception as error:
                self.telemetry.config_reloads.labels("refused").inc()
                log.error("new configuration in %s refused, keeping the old one: %s", self.config_path, error)
            else:
                self.config = config
                release_freed_memory()  # a reload may have built the CEL parser again
                self.telemetry.config_reloads.labels("applied").inc()
                log.info("configuration reloaded: %d meters", len(config.meters))
            self.config_text = text

    # ---- node, pods, liveness ---------------------------------------------------------------------
    async def _refresh_node(self) -> None:
        while True:
            try:
                self.world.node = await self.api.get(f"/api/v1/nodes/{self.node_name}")
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.telemetry.source_error("node", error)
                log.warning("reading node %s failed: %s", self.node_name, error)
                await asyncio.sleep(2)
                continue
            await asyncio.sleep(NODE_REFRESH_S)

    async def _housekeeping(self) -> None:
        while True:
            pods = self.world.pods
            pods.heartbeat()
            # Taken in one go on the loop (the pods and the resume point agree); written off it.
            save = self.store.changed_pods(
                pods.objects,
                self.saved_pod_versions,
                pods.resource_version,
                pods.healthy_through_ms if pods.healthy else None,
            )
            await self.store.save_watch(save, self.saved_pod_versions)
            await self._forget_finished_pods()
            self.telemetry.pod_watch(pods)
            faults = self.source_faults()
            self.telemetry.source_faults(faults, [r.name for r, _ in self.runners.values()])
            self.fault_reporter.observe(faults)
            await asyncio.sleep(1.0)

    async def _forget_finished_pods(self) -> None:
        """Drop pods that are gone and whose every window has been emitted by every meter."""
        if not self.runners:
            return
        oldest_cursor_ms = min(runner.cursor_ms for runner, _ in self.runners.values())
        done: list[str] = []
        for uid, cached in self.world.pods.objects.items():
            if cached.deleted_at_ms is None:
                continue
            end_ms = held_interval(cached)[0].end_ms or cached.deleted_at_ms
            if max(end_ms, cached.deleted_at_ms) < oldest_cursor_ms:
                done.append(uid)
        for uid in done:
            self.world.pods.forget(uid)
            self.saved_pod_versions.pop(uid, None)
        if done:
            await self.store.forget_pods(done)

    def source_faults(self) -> dict[str, str]:
        """Meter name -> why its source is behind right now, for the meters whose source is."""
        faults = {runner.name: runner.source.fault() for runner, _ in self.runners.values()}
        return {name: fault for name, fault in sorted(faults.items()) if fault}

    # ---- HTTP -------------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        """Unhealthy only for what a restart could fix; a source fault is reported, not fatal (the
        other meters run on, and that meter's windows are flagged)."""
        pods = self.world.pods
        meters = {runner.name: runner.last_error or "ok" for runner, _ in self.runners.values()}
        problems = []
        if not pods.synced.is_set():
            problems.append("pod watch not synced yet")
        if not pods.healthy:
            problems.append(f"pod watch down: {pods.last_error}")
        report = AgentStatusReport(
            node=self.node_name, problems=problems, source_faults=self.source_faults(), meters=meters
        )
        return not problems, report.to_wire()

    async def _serve_http(self) -> asyncio.Server:
        async def healthz() -> tuple[int, str, bytes]:
            if not hasattr(self, "world"):
                return 503, "application/json", b'{"problems": ["starting"]}'
            ok, body = self.health()
            return (200 if ok else 503), "application/json", json.dumps(body).encode()

        async def livez() -> tuple[int, str, bytes]:
            # Answered by this event loop, so a hung loop fails it; the API server is not asked: while
            # it is down the agent keeps metering from its cache and a restart would only lose that.
            return 200, "text/plain", b"ok\n"

        async def metrics() -> tuple[int, str, bytes]:
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.telemetry.registry)

        # /healthz (the report the operator reads) and /readyz share one answer: 503 while the pod
        # watch is down.
        routes = {
            HEALTH_PATH: healthz,
            READINESS_PATH: healthz,
            LIVENESS_PATH: livez,
            METRICS_PATH: metrics,
        }
        return await serve(routes, self.metrics_host, self.metrics_port)

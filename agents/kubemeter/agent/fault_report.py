"""Pushes this agent's source faults to its gateway, so the operator never has to ask the agent.

The operator used to GET every agent's ``/healthz`` on every resync: 0.76 ms of its CPU per agent,
so the cost grew with the cluster even when nothing changed (docs/benchmarks.md). Now the agent
posts its whole fault set to the gateway it already sends events to (same URL, same ingest token,
no Kubernetes write rights), only when the set changes and every ``refresh_s`` while it is not
empty; the operator reads the gateways' ``/status`` instead, one request per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

import httpx

from kubemeter.api.rendered import AGENT_REPORT_PATH, AgentFaultReport
from kubemeter.output.credentials import SecretFile

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0
FIRST_BACKOFF_S = 1.0


class FaultReporter:
    def __init__(
        self,
        node: str,
        gateway_url: Callable[[], str],
        refresh_s: Callable[[], float],
        token: SecretFile | None,
    ) -> None:
        self.node = node
        self.gateway_url = gateway_url
        self.refresh_s = refresh_s
        self.token = token
        self.sent_reports = 0  # acknowledged by the gateway
        self._current: dict[str, str] | None = None  # None until the agent has looked once
        self._acked: dict[str, str] | None = None
        self._acked_at_s = 0.0  # monotonic
        self._changed = asyncio.Event()

    def observe(self, faults: Mapping[str, str]) -> None:
        """The agent's fault set now (called every second); a change is posted at once."""
        if self._current is None or dict(faults) != self._current:
            self._current = dict(faults)
            self._changed.set()

    def _due_in_s(self) -> float | None:
        """Seconds until the next post; None while there is nothing to post."""
        if self._current is None:
            return None
        if self._current != self._acked:
            return 0.0
        if not self._current:
            return None  # cleared and acknowledged: silence means no fault
        return max(0.0, self._acked_at_s + self.refresh_s() - time.monotonic())

    async def run(self) -> None:
        backoff_s = FIRST_BACKOFF_S
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, trust_env=False) as client:
            while True:
                due_s = self._due_in_s()
                if due_s is None or due_s > 0:
                    self._changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), due_s)
                    continue
                assert self._current is not None
                faults = dict(self._current)
                try:
                    await self._post(client, faults)
                except Exception as error:
                    # Logged loudly once per outage; the report is retried until the gateway has it.
                    level = logging.WARNING if backoff_s == FIRST_BACKOFF_S else logging.DEBUG
                    log.log(level, "could not report source faults to the gateway (retrying): %s", error)
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, self.refresh_s())
                    continue
                backoff_s = FIRST_BACKOFF_S
                self._acked, self._acked_at_s = faults, time.monotonic()
                self.sent_reports += 1

    async def _post(self, client: httpx.AsyncClient, faults: dict[str, str]) -> None:
        report = AgentFaultReport(node=self.node, sent_at=time.time(), source_faults=faults)
        headers = {"Content-Type": "application/json"}
        token = self.token.value() if self.token is not None else None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        url = self.gateway_url().rstrip("/") + AGENT_REPORT_PATH
        response = await client.post(url, content=report.model_dump_json(by_alias=True), headers=headers)
        if response.status_code == 401:
            raise RuntimeError(
                "the gateway refused this agent's ingest token (401): check the Secret named by "
                "gateway.ingestTokenSecretRef"
            )
        response.raise_for_status()

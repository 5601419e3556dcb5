"""Agents push their source faults to the gateway, which the operator reads once per replica: the
agent's reporter posts only changes (and refreshes while faulted) over real loopback HTTP to the real
gateway app; the gateway keeps each node's newest report for its TTL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from aiohttp import web
from kubemeter.agent.fault_report import FaultReporter
from kubemeter.api.rendered import AGENT_REPORT_PATH, AgentFaultReport
from kubemeter.gateway.agent_reports import AgentReportTable
from kubemeter.gateway.app import GatewayApp
from kubemeter.output.credentials import SecretFile
from kubemeter.output.queue import DurableQueue, QueueLimits
from prometheus_client import CollectorRegistry

NVML = {"ml/gpu-energy": "nvml unavailable"}


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def test_a_node_keeps_its_newest_report_until_the_ttl_and_a_gone_agent_expires() -> None:
    clock = Clock()
    table = AgentReportTable(ttl_s=90, clock=clock)
    assert not table.complete()
    assert table.record(AgentFaultReport(node="gpu-0", sent_at=10, source_faults=NVML))
    assert table.record(AgentFaultReport(node="gpu-0", sent_at=9))  # a late retry of an older report
    assert table.live() == [AgentFaultReport(node="gpu-0", sent_at=10, source_faults=NVML)]
    clock.now_s += 45
    assert table.complete()  # half the TTL: every faulted agent has re-posted since the start
    assert table.record(AgentFaultReport(node="cpu-0", sent_at=55))  # a clear, kept as long
    clock.now_s += 46
    assert table.live() == [AgentFaultReport(node="cpu-0", sent_at=55)]  # gpu-0 not refreshed: gone
    clock.now_s += 45
    assert table.live() == []


def test_the_reporter_posts_changes_and_refreshes_only_while_faulted(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[int], list[list[AgentFaultReport]], int, list[int]]:
        token_path = tmp_path / "token"
        token_path.write_text("s3cret\n")
        queue = await DurableQueue.open(tmp_path / "queue.db", QueueLimits())
        app = GatewayApp(
            queue, delivery=None, ingest_token=SecretFile(token_path), registry=CollectorRegistry()
        )
        runner = web.AppRunner(app.build())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        reporter = FaultReporter("gpu-0", lambda: url, lambda: 0.5, SecretFile(token_path))
        task = asyncio.create_task(reporter.run())
        seen: list[list[AgentFaultReport]] = []
        posts: list[int] = []
        try:
            async with httpx.AsyncClient(base_url=url) as client:
                no_token = await client.post(AGENT_REPORT_PATH, json={"node": "x", "sentAt": 1})
                bad = await client.post(
                    AGENT_REPORT_PATH, json={"node": ""}, headers={"Authorization": "Bearer s3cret"}
                )
                refusals = [no_token.status_code, bad.status_code]
                for faults in ({}, NVML, NVML, {}):
                    reporter.observe(faults)
                    await asyncio.sleep(1.2)  # a bit over two refresh intervals
                    posts.append(reporter.sent_reports)
                    seen.append(app.status_report().agent_reports)
                await asyncio.sleep(1.2)
                quiet_posts = reporter.sent_reports - posts[-1]
        finally:
            task.cancel()
            await runner.cleanup()
            await queue.close()
        return posts, seen, quiet_posts, refusals

    posts, seen, quiet_posts, refusals = asyncio.run(scenario())
    assert refusals == [401, 400]  # no token; not a report
    # The first look is posted even when clean (it clears what an earlier agent on the node said);
    # while faulted the report is re-posted every 0.5 s; cleared, one post and then silence.
    assert posts[0] == 1
    assert posts[1] - posts[0] >= 2 and posts[2] - posts[1] >= 2
    assert posts[3] - posts[2] == 1 and quiet_posts == 0
    assert [[(r.node, r.source_faults) for r in reports] for reports in seen] == [
        [("gpu-0", {})],
        [("gpu-0", NVML)],
        [("gpu-0", NVML)],
        [("gpu-0", {})],
    ]

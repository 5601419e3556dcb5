"""The gateway as a real process: acks only after commit, refuses with the reason, survives
SIGKILL, pushes back when its volume is full; the agent's spool survives the agent being killed."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from kubemeter.api.rendered import AgentConfig
from kubemeter.output import OutputFullError, agent_output
from kubemeter.output.dead_letters import list_dead_letters
from kubemeter.output.queue import DurableQueue, QueueRecord
from kubemeter.output.spool import SPOOL_FILE, SpoolOutput

from tests.integration.output.harness import (
    FAST_POLICY,
    REPO_ROOT,
    GatewayProcess,
    LocalBillingApi,
    SecretVolume,
    assert_exactly_once,
    eventually,
    free_port,
    gateway_config,
    usage_events,
)
from tests.support.billing_specs import spec_validators
from tests.support.metrics_text import sample_value

BATCH = "application/cloudevents-batch+json"


@pytest.fixture
async def billing_api(tmp_path: Path) -> AsyncIterator[LocalBillingApi]:
    api = LocalBillingApi(tmp_path / "billing")
    await api.start()
    yield api
    await api.stop()


def cloudevents(count: int, prefix: str) -> list[dict[str, object]]:
    return [event.to_cloudevent() for event in usage_events(count, prefix=prefix)]


async def test_gateway_acks_after_commit_and_refuses_with_the_reason(
    billing_api: LocalBillingApi, tmp_path: Path
) -> None:
    token = tmp_path / "ingest-token"
    token.write_text("first-token\n")
    gateway = GatewayProcess(tmp_path, gateway_config(tmp_path, billing_api.url), ingest_token_file=token)
    gateway.start()
    try:
        await gateway.wait_ready()
        url = f"{gateway.url}/api/v1/events"
        async with httpx.AsyncClient(timeout=10) as client:
            body = json.dumps(cloudevents(10, "batch"))
            refused = await client.post(url, content=body, headers={"Content-Type": BATCH})
            assert refused.status_code == 401
            assert "Authorization: Bearer" in refused.json()["detail"]

            auth = {"Authorization": "Bearer first-token"}
            broken = cloudevents(3, "broken")
            del broken[1]["subject"]
            malformed = await client.post(url, json=broken, headers={**auth, "Content-Type": BATCH})
            assert malformed.status_code == 400
            assert (
                "event 1 (id 'broken-000001'): subject must be a non-empty string"
                in malformed.json()["detail"]
            )

            accepted = await client.post(url, content=body, headers={**auth, "Content-Type": BATCH})
            assert accepted.status_code == 204
            structured = {**cloudevents(1, "one")[0]}
            one = await client.post(
                url, json=structured, headers={**auth, "Content-Type": "application/cloudevents+json"}
            )
            assert one.status_code == 204
            # An application event through the OpenMeter-compatible path, without a time of its own.
            app_event = {
                "specversion": "1.0",
                "id": "app-1",
                "source": "checkout",
                "type": "api.call",
                "subject": "team-0",
                "data": {"value": 2},
            }
            assert (await client.post(url, json=app_event, headers=auth)).status_code == 204

            token.write_text("second-token\n")  # rotated Secret: no restart
            rotated = {"Authorization": "Bearer second-token", "Content-Type": BATCH}
            assert (
                await client.post(url, content=json.dumps(cloudevents(5, "rotated")), headers=rotated)
            ).status_code == 204
            assert (
                await client.post(url, content=body, headers={**auth, "Content-Type": BATCH})
            ).status_code == 401

            expected = {f"batch-{n:06d}" for n in range(10)} | {f"rotated-{n:06d}" for n in range(5)}
            expected |= {"one-000000", "app-1"}
            status = await eventually(
                lambda: _delivered(gateway, len(expected)), what="all accepted events delivered"
            )
            print(f"gateway status: {status}")
            metrics = (await client.get(f"{gateway.url}/metrics")).text
            # Values, not names (a counter's name is printed even at zero): all delivered, none
            # buffered or dead-lettered, and every acknowledgement and delivery timed.
            assert sample_value(metrics, "kubemeter_delivered_events_total") == len(expected)
            assert sample_value(metrics, "kubemeter_buffer_events") == 0
            assert sample_value(metrics, "kubemeter_buffer_bytes") == 0
            assert sample_value(metrics, "kubemeter_dead_lettered_events_total") == 0
            # The billing API accepted every request at once: nothing was sent twice.
            assert sample_value(metrics, "kubemeter_delivery_retries_total") == 0
            assert sample_value(metrics, "kubemeter_delivery_latency_seconds_count") == len(expected)
            # 4 requests acknowledged (the batch, the structured event, the app event, the rotated
            # batch), 17 events in them; 2 refused without a valid token, 1 malformed.
            assert sample_value(metrics, "kubemeter_ingest_ack_seconds_count") == 4
            assert sample_value(metrics, "kubemeter_ingest_events_total") == len(expected)
            refused = "kubemeter_ingest_refused_requests_total"
            assert sample_value(metrics, refused, reason="unauthorized") == 2
            assert sample_value(metrics, refused, reason="malformed") == 1
            assert (await client.get(f"{gateway.url}/healthz")).status_code == 200
        assert_exactly_once(await billing_api.stats(), await billing_api.events(), expected)
    finally:
        assert gateway.terminate() == 0, gateway.log_tail()


async def _delivered(gateway: GatewayProcess, count: int) -> dict[str, object] | None:
    status = await gateway.status()
    return status if status.get("deliveredEvents") == count and status.get("bufferedEvents") == 0 else None


async def test_gateway_sigkilled_20_times_during_delivery_loses_nothing_and_bills_nothing_twice(
    tmp_path: Path,
) -> None:
    # Flexprice semantics: a re-stamped timestamp would be billed twice, so this catches that too.
    api = LocalBillingApi(tmp_path / "billing")
    await api.start()
    config = gateway_config(
        tmp_path,
        f"{api.url}/v1",
        output_type="flexprice",
        credentials_file=tmp_path / "none",
        batch_max_events=50,
    )
    gateway = GatewayProcess(tmp_path, config)
    agent = await SpoolOutput.open(tmp_path / "agent", gateway.url, max_bytes=64 * 2**20, policy=FAST_POLICY)
    await agent.start()
    rounds, per_round = 20, 500
    expected: set[str] = set()
    rng = random.Random(6)
    try:
        for round_number in range(rounds):
            events = usage_events(per_round, prefix=f"r{round_number:02d}")
            expected |= {event.id for event in events}
            await agent.write(events)
            stored_before = (await api.stats())["storedEvents"]
            gateway.start()
            await gateway.wait_ready()
            # Kill at a random point while the gateway delivers this round's events.
            kill_after = stored_before + rng.randint(1, per_round - 50)
            await eventually(
                lambda: _stored_at_least(api, kill_after),  # noqa: B023 - awaited within this iteration
                timeout_s=60,
                what=f"delivery in round {round_number}",
            )
            gateway.kill()
        gateway.start()
        await gateway.wait_ready()
        await eventually(lambda: _stored_at_least(api, len(expected)), timeout_s=120, what="the final drain")
        await eventually(lambda: agent.stats().events == 0, what="the agent spool to drain")
        stats = await api.stats()
        print(f"gateway SIGKILLed {rounds} times, started {gateway.starts} times")
        assert_exactly_once(stats, await api.events(), expected)
        assert (await gateway.status())["bufferedEvents"] == 0
    finally:
        gateway.terminate()
        await agent.close()
        await api.stop()


async def _stored_at_least(api: LocalBillingApi, count: int) -> bool:
    return bool((await api.stats())["storedEvents"] >= count)


def _mount_small_volume(path: Path, size_bytes: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def _unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, check=False)


async def test_full_volume_pushes_agents_back_then_everything_drains(tmp_path: Path) -> None:
    pv = tmp_path / "pv"
    api = LocalBillingApi(tmp_path / "billing")  # down until the end: the buffer must fill
    mounted = _mount_small_volume(pv, 3 * 2**20)
    if mounted:
        print("PV: a 3 MiB tmpfs; the gateway's cap is above it, so the filesystem itself fills")
        config = gateway_config(tmp_path, api.url, data_dir=pv, buffer_max_bytes=2**30)
    else:
        print("PV: cannot mount a tmpfs here (not root); the gateway's byte cap stands in for a full volume")
        config = gateway_config(tmp_path, api.url, data_dir=pv, buffer_max_bytes=1 * 2**20)
    gateway = GatewayProcess(tmp_path, config)
    gateway.start()
    agent = await SpoolOutput.open(tmp_path / "agent", gateway.url, max_bytes=2 * 2**20, policy=FAST_POLICY)
    await agent.start()
    accepted: set[str] = set()
    pushed_back = 0
    try:
        await gateway.wait_ready()

        def gateway_refused() -> bool:
            return "503" in (agent.forwarder.status.last_error or "")

        # Fill the gateway's volume through the agent, one chunk at a time, until it answers 503.
        chunk = 0
        while not gateway_refused():
            events = usage_events(200, prefix=f"c{chunk:04d}")
            await agent.write(events)
            accepted |= {event.id for event in events}
            chunk += 1
            await eventually(
                lambda: agent.stats().events == 0 or gateway_refused(), timeout_s=60, what="forwarding"
            )
        # The gateway pushes back, so the agent's spool fills until it pushes back on metering.
        reason = ""
        for later in range(chunk, chunk + 1000):
            events = usage_events(200, prefix=f"c{later:04d}")
            try:
                await agent.write(events)
            except OutputFullError as full:
                pushed_back += 1
                reason = str(full)
                break
            accepted |= {event.id for event in events}
        assert pushed_back, "the agent's spool never filled"
        gateway_status = await gateway.status()
        forward_error = agent.forwarder.status.last_error or ""
        print(
            f"accepted={len(accepted)} gateway_buffered={gateway_status['bufferedEvents']} "
            f"agent_spooled={agent.stats().events} agent_pushed_back='{reason}' "
            f"gateway_said='{forward_error}'"
        )
        assert "503" in forward_error
        assert agent.stats().events > 0
        await api.start()  # the billing API comes back
        await eventually(lambda: agent.stats().events == 0, timeout_s=120, what="the agent spool to drain")
        await eventually(
            lambda: _stored_at_least(api, len(accepted)), timeout_s=120, what="the gateway to drain"
        )
        assert_exactly_once(await api.stats(), await api.events(), accepted)
    finally:
        gateway.terminate()
        await agent.close()
        await api.stop()
        if mounted:
            _unmount(pv)


async def test_agent_killed_with_events_in_its_spool_loses_nothing(
    billing_api: LocalBillingApi, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "agent"
    gateway = GatewayProcess(tmp_path, gateway_config(tmp_path, billing_api.url))  # not started yet
    count = 1500
    writer = await asyncio.create_subprocess_exec(
        *[
            sys.executable,
            "-m",
            "tests.integration.output.spool_writer",
            "--spool-dir",
            str(spool_dir),
            "--gateway-url",
            gateway.url,
            "--count",
            str(count),
            "--prefix",
            "spooled",
        ],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    assert writer.stdout is not None
    async for line in writer.stdout:
        if line.decode().strip() == f"wrote {count}":
            break
    writer.kill()  # SIGKILL: no chance to flush anything
    await writer.wait()
    with sqlite3.connect(spool_dir / SPOOL_FILE) as connection:
        (spooled,) = connection.execute("SELECT COUNT(*) FROM events").fetchone()
    print(f"agent SIGKILLed with {spooled} events in its spool")
    assert spooled == count

    gateway.start()
    try:
        await gateway.wait_ready()
        restarted = await SpoolOutput.open(spool_dir, gateway.url, max_bytes=64 * 2**20, policy=FAST_POLICY)
        await restarted.start()
        more = usage_events(200, prefix="after-restart")
        await restarted.write(more)
        assert await restarted.close(drain_timeout_s=30)  # SIGTERM path: forward what it can
        expected = {f"spooled-{n:06d}" for n in range(count)} | {event.id for event in more}
        await eventually(
            lambda: _stored_at_least(billing_api, len(expected)), what="delivery to the billing API"
        )
        assert_exactly_once(await billing_api.stats(), await billing_api.events(), expected)
    finally:
        gateway.terminate()


def test_dlq_list_replay_purge(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"

    async def two_dead_letters() -> None:
        queue = await DurableQueue.open(path)
        await queue.enqueue([QueueRecord("kubemeter/c", f"bad-{n}", b'{"id":"x"}') for n in range(2)])
        await queue.dead_letter(
            await queue.lease(10), reason="HTTP 400: value must be a number", response="{}"
        )
        await queue.close()

    asyncio.run(two_dead_letters())

    def dlq(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "kubemeter_cli", "dlq", "--queue", str(path), *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, check=True)

    listing = dlq("list").stdout
    assert "bad-0" in listing and "value must be a number" in listing
    assert json.loads(dlq("list", "--json").stdout.splitlines()[0])["reason"].startswith("HTTP 400")
    assert "replayed 1" in dlq("replay", "--id", "bad-0").stderr
    assert "purged 1" in dlq("purge", "--all").stderr
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT event_id FROM events").fetchall() == [("bad-0",)]
        assert connection.execute("SELECT COUNT(*) FROM dead_letters").fetchone() == (0,)
    refused = subprocess.run(
        [sys.executable, "-m", "kubemeter_cli", "dlq", "--queue", str(path), "purge"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    assert refused.returncode != 0 and "--all" in refused.stderr


async def test_agent_output_from_the_agent_config_spools_and_forwards(
    billing_api: LocalBillingApi, tmp_path: Path
) -> None:
    gateway = GatewayProcess(tmp_path, gateway_config(tmp_path, billing_api.url))
    config = AgentConfig(
        cluster="test-cluster",
        collector="default",
        namespace="kubemeter",
        gateway_url=gateway.url,
        spool_dir=str(tmp_path / "spool"),
        checkpoint_dir=str(tmp_path / "checkpoints"),
    )
    output = agent_output(config)  # built outside the loop, as the agent does
    events = usage_events(300, prefix="factory")
    await output.write(events)  # the gateway is not up yet: the spool holds them
    gateway.start()
    try:
        await gateway.wait_ready()
        assert await output.close(drain_timeout_s=30)
        await eventually(lambda: _stored_at_least(billing_api, len(events)), what="delivery")
        assert_exactly_once(await billing_api.stats(), await billing_api.events(), {e.id for e in events})
    finally:
        gateway.terminate()


async def test_ingest_token_rotation_reaches_gateway_and_agents_without_a_restart(
    billing_api: LocalBillingApi, tmp_path: Path
) -> None:
    # One Secret, mounted into the gateway pod and an agent pod; each kubelet updates its copy when
    # it gets to it, so the two see a rotation at different moments.
    gateway_secret = SecretVolume(tmp_path / "gateway-secret")
    agent_secret = SecretVolume(tmp_path / "agent-secret")
    gateway_secret.write(token="t1\n")
    agent_secret.write(token="t1\n")
    gateway = GatewayProcess(
        tmp_path, gateway_config(tmp_path, billing_api.url, ingest_token_file=gateway_secret.path("token"))
    )
    config = AgentConfig(
        cluster="test-cluster",
        collector="default",
        namespace="kubemeter",
        gateway_url=gateway.url,
        spool_dir=str(tmp_path / "spool"),
        checkpoint_dir=str(tmp_path / "checkpoints"),
        ingest_token_file=str(agent_secret.path("token")),
    )
    output = agent_output(config)
    gateway.start()
    sent: set[str] = set()

    async def send(prefix: str) -> None:
        events = usage_events(100, prefix=prefix)
        await output.write(events)
        sent.update(event.id for event in events)

    async def delivered() -> bool:
        return len({e["eventId"] for e in await billing_api.events()}) == len(sent)

    try:
        await gateway.wait_ready()
        spool = await output.start()
        pid = gateway.process.pid if gateway.process else None
        await send("t1")
        await eventually(delivered, what="events sent with the first token")

        # Rotation with an overlap: the gateway accepts both, agents move over when their copy changes.
        gateway_secret.write(token="t2\nt1\n")
        await send("overlap-gateway-first")
        await eventually(delivered, what="the old token still accepted during the overlap")
        agent_secret.write(token="t2\nt1\n")
        await send("overlap-agent-too")
        gateway_secret.write(token="t2\n")  # the old token retired
        await send("retired")
        await eventually(delivered, what="events sent with the new token")

        # A rotation without overlap: the agent is refused until its copy changes, and loses nothing.
        gateway_secret.write(token="t3\n")
        await send("refused-then-resent")
        await eventually(
            lambda: spool.forwarder.status.paused_reason is not None, what="the agent's forwarder to pause"
        )
        paused_reason = spool.forwarder.status.paused_reason
        assert spool.stats().events == 100  # held in the spool meanwhile
        agent_secret.write(token="t3\n")
        await eventually(delivered, what="the held events once the agent's copy changed")

        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"{gateway.url}/metrics")).text
        refused = sample_value(metrics, "kubemeter_ingest_refused_requests_total", reason="unauthorized")
        print(f"agent paused with: {paused_reason}; gateway refused {refused:.0f} as unauthorized")
        assert refused >= 1
        assert gateway.starts == 1 and gateway.process is not None and gateway.process.pid == pid
        assert gateway.process.poll() is None  # never restarted
        await output.close(drain_timeout_s=5)
        assert_exactly_once(await billing_api.stats(), await billing_api.events(), sent)
    finally:
        await output.close()
        assert gateway.terminate() == 0, gateway.log_tail()


async def test_lago_subscriptions_from_the_gateway_config_and_an_unbillable_event_dead_lettered(
    billing_api: LocalBillingApi, tmp_path: Path
) -> None:
    credentials = tmp_path / "lago-key"
    credentials.write_text("lago-key\n")
    options = {
        "lago": {
            "subscriptionIdBySubject": {"team-0": "sub_team_zero"},
            "subscriptionIdDimension": "subscription",
        }
    }
    config = gateway_config(
        tmp_path,
        f"{billing_api.url}/api/v1",
        output_type="lago",
        credentials_file=credentials,
        output_options=options,
    )
    gateway = GatewayProcess(tmp_path, config)
    events = cloudevents(200, "lago")
    for n, event in enumerate(events):
        if n != 77:  # team-1, and no subscription dimension: nothing says which subscription to bill
            event["data"]["subscription"] = f"sub_{event['subject']}_gpu"  # type: ignore[index]
    gateway.start()
    try:
        await gateway.wait_ready()
        async with httpx.AsyncClient(timeout=10) as client:
            reply = await client.post(
                f"{gateway.url}/api/v1/events", content=json.dumps(events), headers={"Content-Type": BATCH}
            )
            assert reply.status_code == 204
        status = await eventually(
            lambda: _settled(gateway, delivered=199, dead_lettered=1), what="199 delivered, 1 dead-lettered"
        )
        print(f"gateway status: {status}")
    finally:
        assert gateway.terminate() == 0, gateway.log_tail()
    stored = {e["eventId"]: e["subject"] for e in await billing_api.events()}
    expected = {
        str(e["id"]): "sub_team_zero" if e["subject"] == "team-0" else f"sub_{e['subject']}_gpu"
        for n, e in enumerate(events)
        if n != 77
    }
    assert stored == expected  # the local Lago keeps external_subscription_id as the subject
    assert (await billing_api.stats())["specViolations"] == 0
    with sqlite3.connect(Path(config.data_dir) / "queue.db") as connection:
        (dead,) = list_dead_letters(connection, 10)
    print(f"dead letter: {dead['id']}: {dead['reason']}")
    assert dead["id"] == "lago-000077"
    assert "data key 'subscription'" in str(dead["reason"]) and "team-1" in str(dead["reason"])


async def _settled(
    gateway: GatewayProcess, *, delivered: int, dead_lettered: int
) -> dict[str, object] | None:
    status = await gateway.status()
    settled = (status.get("deliveredEvents"), status.get("deadLetteredEvents"), status.get("bufferedEvents"))
    return status if settled == (delivered, dead_lettered, 0) else None


@pytest.mark.parametrize("mode", ["structured", "batch"])
async def test_cloudevents_output_sends_the_configured_mode_and_headers(mode: str, tmp_path: Path) -> None:
    # Any CloudEvents endpoint: here a bare HTTP server that records what it gets.
    received: list[tuple[dict[str, str], bytes]] = []

    async def accept(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/ingest", accept)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    options = {"cloudevents": {"mode": mode}, "headers": {"X-Tenant": "vision", "Content-Type": "text/plain"}}
    config = gateway_config(
        tmp_path, f"http://127.0.0.1:{port}/ingest", output_type="cloudevents", output_options=options
    )
    gateway = GatewayProcess(tmp_path, config)
    events = cloudevents(30, mode)
    gateway.start()
    try:
        await gateway.wait_ready()
        async with httpx.AsyncClient(timeout=10) as client:
            reply = await client.post(
                f"{gateway.url}/api/v1/events", content=json.dumps(events), headers={"Content-Type": BATCH}
            )
            assert reply.status_code == 204
        await eventually(lambda: _settled(gateway, delivered=30, dead_lettered=0), what="30 delivered")
    finally:
        assert gateway.terminate() == 0, gateway.log_tail()
        await runner.cleanup()
    delivered = []
    for headers, body in received:
        assert headers["X-Tenant"] == "vision"
        document = json.loads(body)
        if mode == "structured":
            assert headers["Content-Type"].startswith("application/cloudevents+json")
            delivered.append(document)
        else:
            assert headers["Content-Type"].startswith("application/cloudevents-batch+json")
            delivered += document
    assert len(received) == (30 if mode == "structured" else 1)
    assert sorted(e["id"] for e in delivered) == sorted(str(e["id"]) for e in events)
    for event in delivered:
        assert spec_validators().cloudevent.problems(event) == []

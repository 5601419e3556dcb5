"""What only the operator can know becomes a precise problem; statuses stay still when nothing changed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubemeter_operator.resolve import ObjectView, referenced_secrets, resolve_namespace
from kubemeter_operator.status import collector_status, meter_status, status_changed, transition_events

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
LATER = datetime(2024, 5, 1, 12, 5, tzinfo=UTC)


def view(kind: str, name: str, spec: dict[str, Any], labels: dict[str, str] | None = None) -> ObjectView:
    return ObjectView(kind, "ns", name, f"uid-{name}", 1, labels or {}, spec, {})


def collector(name: str = "c", **output: Any) -> ObjectView:
    return view("Collector", name, {"output": {"type": "openmeter", "url": "http://om", **output}})


def meter(name: str, **spec: Any) -> ObjectView:
    base = {"eventType": "e", "unit": "u", "source": {"allocation": {"resource": "cpu"}}}
    return view("Meter", name, {**base, **spec}, labels={"plan": "compute"})


def pipeline(name: str, **spec: Any) -> ObjectView:
    return view("Pipeline", name, {"collectorRef": "c", **spec})


def test_bound_meters_reach_the_collector_with_their_pipeline_processors() -> None:
    result = resolve_namespace(
        [collector()],
        [pipeline("p", meterSelector={"matchLabels": {"plan": "compute"}}, processors=[{"drop": ["team"]}])],
        [meter("a"), meter("b")],
        {},
    )
    assert [m.name for m in result.collector_meters["c"]] == ["a", "b"]
    assert result.collector_meters["c"][0].processors[0].drop == ["team"]
    assert result.meter_collectors == {"a": ["c"], "b": ["c"]}
    assert result.collector_problems["c"] == []


def test_unknown_references_are_problems_that_name_the_fix() -> None:
    result = resolve_namespace(
        [collector()],
        [pipeline("p", meters=["ghost"]), view("Pipeline", "q", {"collectorRef": "nope", "meters": ["a"]})],
        [meter("a")],
        {},
    )
    (missing_meter,) = result.pipeline_problems["p"]
    assert missing_meter.reason == "MeterNotFound"
    assert missing_meter.message == (
        'Pipeline "p": spec.meters names Meter "ghost", which does not exist in namespace "ns"; '
        "create it or remove it from spec.meters"
    )
    (missing_collector,) = result.pipeline_problems["q"]
    assert missing_collector.reason == "CollectorNotFound"
    assert 'names Collector "nope"' in missing_collector.message


def test_a_missing_secret_degrades_the_collector() -> None:
    result = resolve_namespace(
        [collector(credentialsSecretRef={"name": "tok", "key": "k"})], [], [], {"tok": None}
    )
    (problem,) = result.collector_problems["c"]
    assert problem.reason == "SecretNotFound"
    assert 'Secret "tok", which does not exist in namespace "ns"; create it with key "k"' in problem.message
    result = resolve_namespace(
        [collector(credentialsSecretRef={"name": "tok", "key": "k"})], [], [], {"tok": frozenset({"other"})}
    )
    assert result.collector_problems["c"][0].reason == "SecretKeyNotFound"


def test_source_secrets_are_checked_and_mounted_into_the_agents() -> None:
    runai = meter(
        "r",
        source={
            "runai": {
                "url": "https://org.run.ai",
                "metric": "GPU_ALLOCATION",
                "credentialsSecretRef": {"name": "runai"},
            }
        },
    )
    prom = meter(
        "p",
        source={
            "prometheus": {
                "url": "https://prom",
                "query": "up",
                "bearerTokenSecretRef": {"name": "prom", "key": "token"},
            }
        },
    )
    basic = meter(
        "b",
        source={
            "prometheus": {"url": "https://prom", "query": "up", "basicAuthSecretRef": {"name": "basic"}}
        },
    )
    meters = [runai, prom, basic]
    assert referenced_secrets([], meters) == {"runai", "prom", "basic"}
    secrets = {
        "runai": frozenset({"clientId", "clientSecret"}),
        "prom": frozenset({"token"}),
        "basic": frozenset({"username", "password"}),
    }
    result = resolve_namespace([collector()], [pipeline("p", meters=["r", "p", "b"])], meters, secrets)
    assert result.meter_problems == {"r": [], "p": [], "b": []}
    assert sorted(result.collector_secret_names["c"]) == ["basic", "prom", "runai"]
    assert {m.name: m.credentials_dir for m in result.collector_meters["c"]} == {
        "r": "/etc/kubemeter/secrets/runai",
        "p": "/etc/kubemeter/secrets/prom",
        "b": "/etc/kubemeter/secrets/basic",
    }

    secrets |= {"runai": frozenset({"appId", "appSecret"}), "basic": frozenset({"username"})}
    result = resolve_namespace([collector()], [pipeline("p", meters=["r", "p", "b"])], meters, secrets)
    assert result.meter_problems["r"] == []  # the older application key names still work
    (problem,) = result.meter_problems["b"]
    assert problem.reason == "SecretKeyNotFound"
    assert problem.message == (
        'Meter "b": Secret "basic" needs key(s) password and username (it has: username); add them'
    )
    assert [m.name for m in result.collector_meters["c"]] == ["r", "p"]


def test_a_cel_expression_with_an_unknown_name_leaves_its_meter_out() -> None:
    broken = meter("bad", subject={"expression": "pods.metadata.name"})
    result = resolve_namespace([collector()], [pipeline("p", meters=["a", "bad"])], [meter("a"), broken], {})
    assert [m.name for m in result.collector_meters["c"]] == ["a"]
    (problem,) = result.meter_problems["bad"]
    assert problem.message == (
        "Meter \"bad\": spec.subject.expression uses unknown name 'pods'; "
        "it can use only pod, namespace, node"
    )
    assert result.collector_problems["c"][0].reason == "InvalidBinding"


def test_a_processor_that_does_not_compile_is_reported() -> None:
    result = resolve_namespace(
        [collector()],
        [pipeline("p", meters=["a"], processors=[{"filter": "event.data.value >"}])],
        [meter("a")],
        {},
    )
    (problem,) = result.pipeline_problems["p"]
    assert problem.reason == "InvalidExpression"
    assert problem.message.startswith('Pipeline "p": spec.processors[0].filter does not compile')


def test_a_meter_bound_twice_to_one_collector_runs_once() -> None:
    result = resolve_namespace(
        [collector()], [pipeline("p", meters=["a"]), pipeline("q", meters=["a"])], [meter("a")], {}
    )
    assert len(result.collector_meters["c"]) == 1
    assert result.pipeline_problems["q"][0].reason == "MeterBoundTwice"


def test_unchanged_situation_yields_an_identical_status() -> None:
    first = collector_status(
        {}, 1, [], 1, 2, {"desired": 3, "ready": 3}, {"desired": 1, "ready": 1}, None, NOW
    )
    again = collector_status(
        first, 1, [], 1, 2, {"desired": 3, "ready": 3}, {"desired": 1, "ready": 1}, None, LATER
    )
    assert again == first
    assert not status_changed(first, again)
    ready = {c["type"]: c for c in first["conditions"]}["Ready"]
    assert ready == {
        "type": "Ready",
        "status": "True",
        "reason": "Ready",
        "message": "3 agents and 1 gateways ready",
        "lastTransitionTime": "2024-05-01T12:00:00Z",
        "observedGeneration": 1,
    }


def test_a_source_fault_an_agent_reports_degrades_the_collector_but_keeps_it_ready() -> None:
    from kubemeter.api.rendered import AgentFaultReport, GatewayStatusReport

    counts = ({"desired": 2, "ready": 2}, {"desired": 2, "ready": 2})
    nvml = {"ml/gpu-energy": "nvml unavailable: no driver"}
    # Two replicas: gpu-1's agent posted its fault to one and, later, its clear to the other.
    gateways = [
        GatewayStatusReport(
            agent_reports=[
                AgentFaultReport(node="gpu-0", sent_at=100, source_faults=nvml),
                AgentFaultReport(node="gpu-1", sent_at=100, source_faults=nvml),
            ],
            agent_reports_complete=True,
        ),
        GatewayStatusReport(
            agent_reports=[
                AgentFaultReport(node="cpu-0", sent_at=90),
                AgentFaultReport(node="gpu-2", sent_at=101, source_faults=nvml),
            ],
            agent_reports_complete=True,
        ),
    ]
    faulted = collector_status({}, 1, [], 2, 2, *counts, gateways, NOW)
    assert faulted["sourceFaults"] == [
        {"meter": "ml/gpu-energy", "node": "gpu-0", "reason": "nvml unavailable: no driver"},
        {"meter": "ml/gpu-energy", "node": "gpu-1", "reason": "nvml unavailable: no driver"},
        {"meter": "ml/gpu-energy", "node": "gpu-2", "reason": "nvml unavailable: no driver"},
    ]
    conditions = {c["type"]: c for c in faulted["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert conditions["Degraded"]["status"] == "True" and conditions["Degraded"]["reason"] == "SourceFault"
    assert 'Meter "ml/gpu-energy" on node gpu-0: nvml unavailable' in conditions["Degraded"]["message"]
    # The newer report of a node wins, whichever replica holds it.
    gateways[1].agent_reports.append(AgentFaultReport(node="gpu-1", sent_at=102))
    partly = collector_status(faulted, 1, [], 2, 2, *counts, gateways, LATER)
    assert [f["node"] for f in partly["sourceFaults"]] == ["gpu-0", "gpu-2"]
    # While the gateways may not know every fault, the last known faults stay: a replica did not
    # answer, or one started too recently to have heard from every faulted agent.
    cleared_reports = [GatewayStatusReport(agent_reports_complete=True) for _ in range(2)]
    assert (
        collector_status(faulted, 1, [], 2, 2, *counts, None, LATER)["sourceFaults"]
        == faulted["sourceFaults"]
    )
    assert (
        collector_status(faulted, 1, [], 2, 2, *counts, cleared_reports[:1], LATER)["sourceFaults"]
        == (faulted["sourceFaults"])
    )
    young = [cleared_reports[0], GatewayStatusReport(agent_reports_complete=False)]
    assert (
        collector_status(faulted, 1, [], 2, 2, *counts, young, LATER)["sourceFaults"]
        == faulted["sourceFaults"]
    )
    cleared = collector_status(faulted, 1, [], 2, 2, *counts, cleared_reports, LATER)
    assert cleared["sourceFaults"] == []
    assert [e.reason for e in transition_events(faulted, cleared)] == ["Recovered"]


def test_a_gateway_that_paused_delivery_degrades_the_collector_with_its_reason() -> None:
    from kubemeter.api.rendered import GatewayStatusReport

    counts = ({"desired": 1, "ready": 1}, {"desired": 1, "ready": 1})
    reason = "Broker: Topic authorization failed: grant it WRITE (and DESCRIBE) on the topic"
    paused = collector_status(
        {}, 1, [], 1, 2, *counts, [GatewayStatusReport(paused_reason=reason, buffered_events=5)], NOW
    )
    degraded = {c["type"]: c for c in paused["conditions"]}["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "DeliveryPaused")
    assert reason in degraded["message"]
    resumed = collector_status(paused, 1, [], 1, 2, *counts, [GatewayStatusReport()], LATER)
    assert {c["type"]: c for c in resumed["conditions"]}["Degraded"]["status"] == "False"


def test_a_new_problem_posts_one_warning_and_its_fix_posts_a_recovery() -> None:
    from kubemeter_operator.resolve import Problem

    healthy = meter_status({}, 1, [], "allocation/cpu", ["c"], NOW)
    broken = meter_status(
        healthy, 2, [Problem("InvalidExpression", "fix it")], "allocation/cpu", ["c"], LATER
    )
    assert [(e.type, e.reason, e.message) for e in transition_events(healthy, broken)] == [
        ("Warning", "InvalidExpression", "fix it")
    ]
    assert transition_events(broken, broken) == []
    fixed = meter_status(broken, 3, [], "allocation/cpu", ["c"], LATER)
    assert [e.reason for e in transition_events(broken, fixed)] == ["Recovered"]


def test_a_dra_device_selector_that_names_the_pod_is_reported_with_the_names_it_may_use() -> None:
    good = meter("good", source={"dra": {"selector": "device.attributes['gpu.nvidia.com'].type == 'mig'"}})
    bad = meter("bad", source={"dra": {"selector": "pod.metadata.name == 'x'"}})
    broken = meter("broken", source={"idle": {"devices": {"selector": "device.driver =="}}})
    result = resolve_namespace(
        [collector()], [pipeline("p", meters=["good", "bad", "broken"])], [good, bad, broken], {}
    )
    assert result.meter_problems.get("good", []) == []
    (problem,) = result.meter_problems["bad"]
    assert problem.message == (
        "Meter \"bad\": spec.source.dra.selector uses unknown name 'pod'; it can use only device"
    )
    (problem,) = result.meter_problems["broken"]
    assert problem.message.startswith('Meter "broken": spec.source.idle.devices.selector does not compile')


def test_a_meter_naming_a_collectors_secret_is_refused_and_nothing_is_mounted() -> None:
    # Issue #14: a Meter's agents send its Secret as Bearer to the Meter's URL; the billing API key
    # and the ingest token (named or generated) must never be one.
    billing = view(
        "Collector",
        "c",
        {
            "output": {
                "type": "openmeter",
                "url": "http://om",
                "credentialsSecretRef": {"name": "om", "key": "k"},
            },
            "gateway": {"ingestTokenSecretRef": {"name": "ingest", "key": "token"}},
        },
    )
    other = collector("d")  # its token is generated: Secret d-ingest-token

    def stealing(name: str, secret: str, where: str) -> ObjectView:
        reference = {"name": secret, "key": "k"} if where == "bearerTokenSecretRef" else {"name": secret}
        source = {"prometheus": {"url": "https://attacker.example", "query": "up", where: reference}}
        if where == "credentialsSecretRef":
            source = {
                "runai": {"url": "https://attacker.example", "metric": "GPU_ALLOCATION", where: reference}
            }
        return meter(name, source=source)

    meters = [
        stealing("billing-key", "om", "bearerTokenSecretRef"),
        stealing("named-token", "ingest", "basicAuthSecretRef"),
        stealing("generated-token", "d-ingest-token", "credentialsSecretRef"),
        stealing("own", "prom", "bearerTokenSecretRef"),
    ]
    every_key = frozenset({"k", "token", "username", "password", "clientId", "clientSecret"})
    secrets = {name: every_key for name in ("om", "ingest", "d-ingest-token", "prom")}
    names = [m.name for m in meters]
    result = resolve_namespace(
        [billing, other],
        [pipeline("p", meters=names), view("Pipeline", "q", {"collectorRef": "d", "meters": names})],
        meters,
        secrets,
    )
    for name, secret, holder in (
        ("billing-key", "om", 'Collector "c"\'s billing API key'),
        ("named-token", "ingest", 'Collector "c"\'s ingest token'),
        ("generated-token", "d-ingest-token", 'Collector "d"\'s ingest token'),
    ):
        (problem,) = result.meter_problems[name]
        assert problem.reason == "ForbiddenSecret"
        assert f'names Secret "{secret}", which holds {holder}' in problem.message
        assert "name a Secret of its own" in problem.message
    assert result.meter_problems["own"] == []
    assert result.collector_secret_names == {"c": ["prom"], "d": ["prom"]}, (
        "only the Meter's own Secret is mounted"
    )
    assert [m.name for m in result.collector_meters["c"]] == ["own"]


def test_a_meter_naming_a_kafka_collectors_credentials_is_refused_and_nothing_is_mounted() -> None:
    # The SASL password and the client certificate's private key are the Kafka output's billing key.
    kafka = view(
        "Collector",
        "c",
        {
            "output": {
                "type": "kafka",
                "kafka": {
                    "bootstrapServers": ["kafka:9093"],
                    "topic": "usage",
                    "tls": {
                        "caSecretRef": {"name": "kafka-ca", "key": "ca.crt"},
                        "clientCertificateSecretRef": {"name": "kafka-client"},
                    },
                    "sasl": {"secretRef": {"name": "kafka-sasl"}},
                },
            }
        },
    )
    source = {"url": "https://attacker.example", "query": "up"}
    meters = [
        meter("password", source={"prometheus": {**source, "basicAuthSecretRef": {"name": "kafka-sasl"}}}),
        meter(
            "private-key",
            source={
                "prometheus": {**source, "bearerTokenSecretRef": {"name": "kafka-client", "key": "tls.key"}}
            },
        ),
        meter(
            "ca",
            source={"prometheus": {**source, "bearerTokenSecretRef": {"name": "kafka-ca", "key": "ca.crt"}}},
        ),
    ]
    every_key = frozenset({"username", "password", "tls.crt", "tls.key", "ca.crt", "token"})
    secrets = {name: every_key for name in ("kafka-sasl", "kafka-client", "kafka-ca", "c-ingest-token")}
    result = resolve_namespace([kafka], [pipeline("p", meters=[m.name for m in meters])], meters, secrets)
    for name, secret, holder in (
        ("password", "kafka-sasl", "Kafka SASL credentials"),
        ("private-key", "kafka-client", "Kafka client certificate"),
        ("ca", "kafka-ca", "Kafka CA bundle"),
    ):
        (problem,) = result.meter_problems[name]
        assert problem.reason == "ForbiddenSecret"
        assert f'names Secret "{secret}", which holds Collector "c"\'s {holder}' in problem.message
    assert result.collector_secret_names == {"c": []}
    assert result.collector_meters["c"] == []

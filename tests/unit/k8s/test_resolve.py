"""Resolve: targets, ready endpoints, named ports, conditions and conflicts."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from aviator.k8s.fields import ObjectRef
from aviator.k8s.objects import Pod, Workload, parse_pod, parse_workload
from aviator.k8s.policy import DEFAULT_PORT, PolicyEntry, parse_policy_entry
from aviator.k8s.resolve import (
    ACCEPTED,
    RESOLVED_REFS,
    Condition,
    ConditionStatus,
    PolicyResolution,
    Reason,
    ResolvedEndpoint,
    resolve,
    serving,
)
from aviator.model import EndpointAddress, WorkloadKey

from .builders import pod_doc, policy_doc, workload_doc


def run(
    policies: list[dict[str, Any]],
    workloads: list[dict[str, Any]],
    pods: list[dict[str, Any]],
) -> tuple[PolicyResolution, ...]:
    p: list[PolicyEntry] = [parse_policy_entry(d) for d in policies]
    w: list[Workload] = [parse_workload(d) for d in workloads]
    o: list[Pod] = [parse_pod(d) for d in pods]
    return resolve(p, w, o)


def one(
    policies: list[dict[str, Any]], workloads: list[dict[str, Any]], pods: list[dict[str, Any]]
) -> PolicyResolution:
    (r,) = run(policies, workloads, pods)
    return r


def status(r: PolicyResolution, type_: str) -> tuple[ConditionStatus, Reason, str]:
    c = r.condition(type_)
    assert c is not None
    return c.status, c.reason, c.message


def addrs(r: PolicyResolution) -> list[str]:
    return [str(e.address) for e in r.endpoints]


def test_ready_pods_of_the_target_become_endpoints() -> None:
    r = one(
        [policy_doc()],
        [workload_doc()],
        [
            pod_doc("web-b", "10.0.0.2", zone="z2", node="n2"),
            pod_doc("web-a", "10.0.0.1", zone="z1", node="n1"),
            pod_doc("web-c", "10.0.0.3", ready=False),
            pod_doc("web-d", "10.0.0.4", terminating=True),
            pod_doc("web-e", None, phase="Pending", ready=False),
            pod_doc("api-1", "10.0.0.9", labels={"app": "api"}),  # another workload's pod
            pod_doc("web-x", "10.0.1.1", namespace="other"),  # same labels, other namespace
        ],
    )
    assert r.serving
    assert r.key == WorkloadKey("shop", "web")
    assert r.port == 8080
    assert r.endpoints == (
        ResolvedEndpoint(EndpointAddress("10.0.0.1", 8080), 8080, "web-a", "z1", "n1"),
        ResolvedEndpoint(EndpointAddress("10.0.0.2", 8080), 8080, "web-b", "z2", "n2"),
    )
    assert r.pods == 5
    assert r.not_ready == ("web-c", "web-d", "web-e")
    assert r.without_port == ()
    assert status(r, ACCEPTED) == (ConditionStatus.TRUE, Reason.ACCEPTED, "accepted")
    assert status(r, RESOLVED_REFS) == (
        ConditionStatus.TRUE,
        Reason.RESOLVED_REFS,
        "Deployment shop/web selects 5 pod(s): 2 endpoint(s), 3 not ready",
    )


def test_match_expressions_select_pods() -> None:
    w = workload_doc(expressions=[{"key": "track", "operator": "NotIn", "values": ["canary"]}])
    r = one(
        [policy_doc()],
        [w],
        [
            pod_doc("web-1", "10.0.0.1", labels={"app": "web"}),
            pod_doc("web-2", "10.0.0.2", labels={"app": "web", "track": "stable"}),
            pod_doc("web-3", "10.0.0.3", labels={"app": "web", "track": "canary"}),
        ],
    )
    assert addrs(r) == ["10.0.0.1:8080", "10.0.0.2:8080"]


def test_default_port_is_the_templates_first_tcp_port() -> None:
    ports = [
        {"name": "dns", "containerPort": 53, "protocol": "UDP"},
        {"name": "grpc", "containerPort": 9000},
        {"containerPort": 9100},
    ]
    r = one(
        [policy_doc()], [workload_doc(ports=ports)], [pod_doc("web-1", "10.0.0.1", ports=ports)]
    )
    assert r.port == 9000
    assert addrs(r) == ["10.0.0.1:9000"]


def test_default_port_without_any_declared_port_is_8080() -> None:
    r = one([policy_doc()], [workload_doc(ports=[])], [pod_doc("web-1", "10.0.0.1", ports=[])])
    assert r.port == 8080
    assert addrs(r) == ["10.0.0.1:8080"]


def test_numeric_port_needs_no_declaration() -> None:
    r = one(
        [policy_doc(port=7000, probe={"port": 7001})],
        [workload_doc()],
        [pod_doc("web-1", "10.0.0.1")],
    )
    assert r.endpoints[0].address == EndpointAddress("10.0.0.1", 7000)
    assert r.endpoints[0].probe_address == EndpointAddress("10.0.0.1", 7001)


def test_named_ports_resolve_per_pod() -> None:
    # Mid-rollout: the new pods serve "http" on 8081; each endpoint uses its own pod's number.
    old = [{"name": "http", "containerPort": 8080}, {"name": "probe", "containerPort": 9000}]
    new = [{"name": "http", "containerPort": 8081}, {"name": "probe", "containerPort": 9001}]
    r = one(
        [policy_doc(port="http", probe={"port": "probe"})],
        [workload_doc(ports=new)],
        [
            pod_doc("web-old", "10.0.0.1", ports=old),
            pod_doc("web-new", "10.0.0.2", ports=new),
            pod_doc("web-bare", "10.0.0.3", ports=[{"name": "http", "containerPort": 8080}]),
        ],
    )
    assert r.port == "http"
    assert [(str(e.address), e.probe_port) for e in r.endpoints] == [
        ("10.0.0.1:8080", 9000),
        ("10.0.0.2:8081", 9001),
    ]
    assert r.without_port == ("web-bare",)
    assert status(r, RESOLVED_REFS)[2] == (
        "Deployment shop/web selects 3 pod(s): 2 endpoint(s), 1 without the port"
    )


def test_the_workload_traffic_port_is_a_number_resolved_in_one_place() -> None:
    # A number stays; a name takes the first endpoint's number; nothing resolved: the default.
    numeric = one([policy_doc(port=7000)], [workload_doc()], [pod_doc("web-1", "10.0.0.1")])
    assert numeric.traffic_port == 7000
    ports = [{"name": "http", "containerPort": 8081}]
    named = one(
        [policy_doc(port="http")],
        [workload_doc(ports=ports)],
        [pod_doc("web-2", "10.0.0.2", ports=ports), pod_doc("web-1", "10.0.0.1", ports=ports)],
    )
    assert named.traffic_port == 8081
    nobody = one([policy_doc(port="http")], [workload_doc(ports=ports)], [])
    assert (nobody.port, nobody.traffic_port) == ("http", DEFAULT_PORT)


def test_probe_port_defaults_to_the_traffic_port() -> None:
    r = one([policy_doc(port="http")], [workload_doc()], [pod_doc("web-1", "10.0.0.1")])
    assert r.endpoints[0].probe_port == 8080


def test_udp_port_with_the_name_does_not_count() -> None:
    ports = [{"name": "http", "containerPort": 8080, "protocol": "UDP"}]
    r = one(
        [policy_doc(port="http")],
        [workload_doc(ports=ports)],
        [pod_doc("web-1", "10.0.0.1", ports=ports)],
    )
    assert not r.serving
    assert r.endpoints == ()
    assert status(r, RESOLVED_REFS) == (
        ConditionStatus.FALSE,
        Reason.PORT_NOT_FOUND,
        "spec.port: no TCP container port named 'http' in the pod template of Deployment "
        "shop/web or its pods (named ports: none)",
    )


def test_unknown_probe_port_name() -> None:
    r = one([policy_doc(probe={"port": "admin"})], [workload_doc()], [pod_doc("web-1", "10.0.0.1")])
    assert status(r, RESOLVED_REFS) == (
        ConditionStatus.FALSE,
        Reason.PORT_NOT_FOUND,
        "spec.probe.port: no TCP container port named 'admin' in the pod template of "
        "Deployment shop/web or its pods (named ports: http(8080))",
    )
    assert status(r, ACCEPTED)[0] is ConditionStatus.TRUE
    assert r.pods == 1


def test_target_not_found() -> None:
    r = one([policy_doc(target="nope")], [workload_doc()], [pod_doc("web-1", "10.0.0.1")])
    assert not r.serving
    assert r.target is None
    assert status(r, RESOLVED_REFS) == (
        ConditionStatus.FALSE,
        Reason.TARGET_NOT_FOUND,
        "Deployment shop/nope not found",
    )


def test_target_in_another_namespace_is_not_found() -> None:
    r = one([policy_doc()], [workload_doc(namespace="other")], [])
    assert status(r, RESOLVED_REFS)[1] is Reason.TARGET_NOT_FOUND


def test_kind_mismatch_names_the_kind_that_exists() -> None:
    r = one([policy_doc(kind="Deployment")], [workload_doc(kind="StatefulSet")], [])
    assert status(r, RESOLVED_REFS) == (
        ConditionStatus.FALSE,
        Reason.TARGET_NOT_FOUND,
        "Deployment shop/web not found; a StatefulSet with that name exists: set "
        "spec.targetRef.kind: StatefulSet",
    )


def test_statefulset_target() -> None:
    r = one(
        [policy_doc(kind="StatefulSet")],
        [workload_doc(kind="StatefulSet")],
        [pod_doc("web-0", "10.0.0.1")],
    )
    assert r.serving
    assert r.target is not None
    assert r.target.ref == ObjectRef("StatefulSet", "shop", "web")


def test_invalid_policy_is_reported_and_serves_nothing() -> None:
    r = one(
        [policy_doc(pingInterval="1h", port=0, generation=7)],
        [workload_doc()],
        [pod_doc("web-1", "10.0.0.1")],
    )
    assert not r.serving
    assert r.policy is None
    assert r.conditions == (
        Condition(
            ACCEPTED,
            ConditionStatus.FALSE,
            Reason.INVALID,
            "2 validation errors: spec.pingInterval: 1h0m0s is out of range; allowed: 10ms to "
            "5m0s; spec.port: port number must be in 1..65535, got 0; nothing is served: "
            "there is no last valid spec to fall back on",
            7,
        ),
        Condition(
            RESOLVED_REFS,
            ConditionStatus.UNKNOWN,
            Reason.INVALID,
            "not resolved: the policy is invalid (see Accepted)",
            7,
        ),
    )


def test_observed_generation_is_the_policys_generation() -> None:
    r = one([policy_doc(generation=3)], [workload_doc()], [])
    assert {c.observed_generation for c in r.conditions} == {3}


def test_no_ready_pods_still_serves_an_empty_cluster() -> None:
    r = one([policy_doc()], [workload_doc()], [pod_doc("web-1", "10.0.0.1", ready=False)])
    assert r.serving
    assert r.endpoints == ()
    assert r.not_ready == ("web-1",)


def test_same_ip_and_port_is_one_endpoint() -> None:
    r = one(
        [policy_doc()],
        [workload_doc()],
        [pod_doc("web-b", "10.0.0.1"), pod_doc("web-a", "10.0.0.1")],
    )
    assert [e.pod for e in r.endpoints] == ["web-a"]
    assert r.pods == 2


# --- conflicts --------------------------------------------------------------------------------


def test_older_policy_wins_and_the_other_is_conflicted() -> None:
    rs = run(
        [
            policy_doc("a-new", created="2024-05-02T00:00:00Z"),
            policy_doc("z-old", created="2024-05-01T00:00:00Z"),
        ],
        [workload_doc()],
        [pod_doc("web-1", "10.0.0.1")],
    )
    new, old = rs  # sorted by reference
    assert old.ref.name == "z-old"
    assert old.serving
    assert addrs(old) == ["10.0.0.1:8080"]
    assert new.ref.name == "a-new"
    assert not new.serving
    assert new.endpoints == ()
    assert new.conflicts_with == ObjectRef("AviatorPolicy", "shop", "z-old")
    assert status(new, ACCEPTED) == (
        ConditionStatus.FALSE,
        Reason.CONFLICTED,
        "workload shop/web is already balanced by AviatorPolicy shop/z-old (targeting "
        "Deployment shop/web), which is older (created 2024-05-01T00:00:00+00:00); only one "
        "policy may target a workload name: delete or retarget one of them",
    )
    # A conflicted policy's target is still resolved, so its status says what it would get.
    assert status(new, RESOLVED_REFS)[0] is ConditionStatus.TRUE
    assert new.pods == 1
    assert serving(rs) == {WorkloadKey("shop", "web"): old}


def test_same_age_falls_back_to_name_and_no_timestamp_sorts_last() -> None:
    rs = run(
        [
            policy_doc("b", created="2024-05-01T00:00:00Z"),
            policy_doc("a"),
            policy_doc("c", created="2024-05-01T00:00:00Z"),
        ],
        [workload_doc()],
        [],
    )
    assert [r.ref.name for r in rs if r.serving] == ["b"]
    assert {r.ref.name: r.conflicts_with for r in rs} == {
        "a": ObjectRef("AviatorPolicy", "shop", "b"),
        "b": None,
        "c": ObjectRef("AviatorPolicy", "shop", "b"),
    }


def test_the_winner_does_not_depend_on_input_order() -> None:
    docs = [
        policy_doc("p1", created="2024-05-03T00:00:00Z"),
        policy_doc("p2", created="2024-05-01T00:00:00Z"),
        policy_doc("p3"),
        policy_doc("p4", created="2024-05-01T00:00:00Z"),
    ]
    winners = {
        tuple(r.ref.name for r in run(list(perm), [workload_doc()], []) if r.serving)
        for perm in itertools.permutations(docs)
    }
    assert winners == {("p2",)}


def test_a_deployment_and_a_statefulset_of_one_name_conflict() -> None:
    # Envoy clusters are named namespace/name: the two cannot both be balanced.
    rs = run(
        [
            policy_doc("for-sts", kind="StatefulSet", created="2024-05-01T00:00:00Z"),
            policy_doc("for-deploy", kind="Deployment", created="2024-05-02T00:00:00Z"),
        ],
        [workload_doc(kind="StatefulSet"), workload_doc(kind="Deployment")],
        [],
    )
    by_name = {r.ref.name: r for r in rs}
    assert by_name["for-sts"].serving
    assert status(by_name["for-deploy"], ACCEPTED)[1] is Reason.CONFLICTED


def test_invalid_policies_do_not_take_part_in_conflicts() -> None:
    rs = run(
        [
            policy_doc("old-broken", created="2024-05-01T00:00:00Z", port=0),
            policy_doc("new-good", created="2024-05-02T00:00:00Z"),
        ],
        [workload_doc()],
        [],
    )
    assert [r.ref.name for r in rs if r.serving] == ["new-good"]


def test_policies_in_other_namespaces_do_not_conflict() -> None:
    rs = run(
        [policy_doc(namespace="a"), policy_doc(namespace="b")],
        [workload_doc(namespace="a"), workload_doc(namespace="b")],
        [],
    )
    assert all(r.serving for r in rs)
    assert set(serving(rs)) == {WorkloadKey("a", "web"), WorkloadKey("b", "web")}


def test_endpoints_only_for_serving_resolutions() -> None:
    (r,) = run([policy_doc()], [workload_doc()], [pod_doc("web-1", "10.0.0.1")])
    with pytest.raises(ValueError, match="only resolved for a serving policy"):
        PolicyResolution(r.ref, (r.conditions[0],), endpoints=r.endpoints)


def test_a_selector_is_matched_only_against_pods_that_carry_its_labels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # issue 14's churn: 1,000 policies x 10,000 pods in one namespace took ~90 s to resolve
    # when every policy scanned every pod (10 M matches); the label index makes it ~N.
    calls = 0
    selects = Workload.selects

    def counting(self: Workload, pod: Pod) -> bool:
        nonlocal calls
        calls += 1
        return selects(self, pod)

    monkeypatch.setattr(Workload, "selects", counting)
    n, pods_each = 100, 10
    expressions = [{"key": "tier", "operator": "NotIn", "values": ["canary"]}]
    policies = [policy_doc(f"w{i}", target=f"w{i}") for i in range(n)]
    workloads = [workload_doc(f"w{i}", expressions=expressions if i % 2 else None)
                 for i in range(n)]  # fmt: skip
    pods = [
        pod_doc(
            f"w{i}-{j}",
            f"10.0.{i}.{j}",
            labels={"app": f"w{i}", "tier": "canary" if j == 0 else "main"},
        )
        for i in range(n)
        for j in range(pods_each)
    ]
    result = {r.ref.name: addrs(r) for r in run(policies, workloads, pods)}
    assert calls <= n * pods_each  # each pod is matched against its own workload only
    for i in range(n):
        first = 0 if i % 2 == 0 else 1  # the odd workloads exclude their canary (NotIn)
        assert result[f"w{i}"] == sorted(f"10.0.{i}.{j}:8080" for j in range(first, pods_each)), i

"""Parsing workloads and pods as the API returns them, and label selectors as the API runs them."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from aviator.k8s.fields import ObjectError, ObjectRef
from aviator.k8s.objects import (
    Labels,
    LabelSelector,
    Operator,
    Requirement,
    WorkloadKind,
    parse_pod,
    parse_workload,
)


def deployment(**spec_overrides: Any) -> dict[str, Any]:
    """A Deployment as `kubectl get -o yaml` shows it, server-set fields included."""
    doc: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "uid": "0b7c2f0e-1d2a-4a6b-9a57-0e7d0f2a3b4c",
            "resourceVersion": "123456",
            "generation": 4,
            "creationTimestamp": "2024-05-01T12:00:00Z",
            "labels": {"app": "web"},
            "annotations": {"deployment.kubernetes.io/revision": "3"},
            "managedFields": [{"manager": "kubectl", "operation": "Update"}],
        },
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"type": "RollingUpdate"},
            "template": {
                "metadata": {"labels": {"app": "web", "track": "stable"}},
                "spec": {
                    "containers": [
                        {
                            "name": "web",
                            "image": "example/web:1",
                            "ports": [
                                {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                            ],
                        },
                        {"name": "sidecar", "ports": [{"name": "admin", "containerPort": 9901}]},
                    ]
                },
            },
        },
        "status": {"replicas": 3, "readyReplicas": 3},
    }
    doc["spec"].update(spec_overrides)
    return doc


def pod(name: str = "web-1", **status_overrides: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": "Running",
        "podIP": "10.0.0.7",
        "podIPs": [{"ip": "10.0.0.7"}],
        "conditions": [
            {"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": "True"},
            {"type": "ContainersReady", "status": "True"},
        ],
    }
    status.update(status_overrides)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "labels": {"app": "web", "topology.kubernetes.io/zone": "eu-1a"},
            "creationTimestamp": "2024-05-01T12:01:00Z",
        },
        "spec": {
            "nodeName": "node-a",
            "containers": [{"name": "web", "ports": [{"name": "http", "containerPort": 8080}]}],
        },
        "status": status,
    }


def errors_of(exc: pytest.ExceptionInfo[ObjectError]) -> list[tuple[str, str]]:
    return [(e.path, e.message) for e in exc.value.errors]


# --- workloads --------------------------------------------------------------------------------


def test_deployment_parses_the_fields_aviator_uses() -> None:
    w = parse_workload(deployment())
    assert w.kind is WorkloadKind.DEPLOYMENT
    assert w.ref == ObjectRef("Deployment", "shop", "web")
    assert str(w.key) == "shop/web"
    assert w.meta.uid == "0b7c2f0e-1d2a-4a6b-9a57-0e7d0f2a3b4c"
    assert w.meta.resource_version == "123456"
    assert w.meta.generation == 4
    assert w.meta.creation_timestamp == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert w.meta.labels == {"app": "web"}
    assert w.replicas == 3
    assert w.template_labels == {"app": "web", "track": "stable"}
    assert [(p.container, p.name, p.number, p.protocol) for p in w.ports] == [
        ("web", "dns", 53, "UDP"),
        ("web", "http", 8080, "TCP"),
        ("sidecar", "admin", 9901, "TCP"),
    ]
    # The first *TCP* port is the default traffic port; named lookups skip UDP ports.
    assert w.first_port == 8080
    assert w.port_named("http") == 8080
    assert w.port_named("dns") is None
    assert w.port_named("nope") is None


def test_statefulset_and_default_namespace() -> None:
    doc = deployment()
    doc["kind"] = "StatefulSet"
    del doc["metadata"]["namespace"]
    w = parse_workload(doc)
    assert w.kind is WorkloadKind.STATEFUL_SET
    assert w.ref == ObjectRef("StatefulSet", "default", "web")


def test_yaml_timestamps_are_accepted_and_made_aware() -> None:
    doc = deployment()
    doc["metadata"]["creationTimestamp"] = datetime(2024, 5, 1, 12, 0)  # naive, as YAML gives
    assert parse_workload(doc).meta.creation_timestamp == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def test_workload_errors_are_all_reported_with_paths() -> None:
    doc = deployment(
        selector={
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "track", "operator": "in", "values": ["a"]},
                {"key": "tier", "operator": "In"},
                {"key": "zone", "operator": "Exists", "values": ["x"]},
            ],
        }
    )
    doc["spec"]["template"]["spec"]["containers"][0]["ports"][1]["containerPort"] = 70000
    doc["metadata"]["name"] = "Web_1"
    with pytest.raises(ObjectError) as exc:
        parse_workload(doc)
    assert errors_of(exc) == [
        (
            "metadata.name",
            "'Web_1' is not a DNS-1123 subdomain: lowercase letters, digits, "
            "'-' and '.', starting and ending with a letter or digit",
        ),
        (
            "spec.selector.matchExpressions[0].operator",
            'unsupported value "in"; allowed: "In", '
            '"NotIn", "Exists", "DoesNotExist" (case-sensitive)',
        ),
        (
            "spec.selector.matchExpressions[1].values",
            "must have at least one value for operator In",
        ),
        ("spec.selector.matchExpressions[2].values", "must be empty for operator Exists"),
        (
            "spec.template.spec.containers[0].ports[1].containerPort",
            "must be in 1..65535, got 70000",
        ),
    ]
    assert exc.value.ref == ObjectRef("Deployment", "shop", "Web_1")
    assert str(exc.value).startswith(
        "Deployment shop/Web_1 is invalid (5 errors):\n  metadata.name:"
    )


def test_empty_selector_is_rejected_as_the_apps_api_does() -> None:
    with pytest.raises(ObjectError) as exc:
        parse_workload(deployment(selector={}))
    assert errors_of(exc) == [
        (
            "spec.selector",
            "empty selector is invalid for a Deployment: it would select every "
            "pod of the namespace",
        ),
    ]


def test_missing_selector_and_template_mismatch() -> None:
    doc = deployment()
    del doc["spec"]["selector"]
    with pytest.raises(ObjectError) as exc:
        parse_workload(doc)
    assert errors_of(exc) == [
        (
            "spec.selector",
            "required field is missing: a label selector (matchLabels / matchExpressions)",
        ),
    ]
    with pytest.raises(ObjectError) as exc:
        parse_workload(deployment(selector={"matchLabels": {"app": "api"}}))
    assert errors_of(exc) == [
        (
            "spec.template.metadata.labels",
            "do not match spec.selector (app=api): the workload would not own the pods it creates",
        ),
    ]


def test_wrong_types_name_what_was_found() -> None:
    doc = deployment(replicas="3")
    doc["metadata"]["labels"] = {"version": 2}
    with pytest.raises(ObjectError) as exc:
        parse_workload(doc)
    assert errors_of(exc) == [
        (
            "metadata.labels.version",
            "label values must be strings, got a number (2) (quote numbers and booleans in YAML)",
        ),
        ("spec.replicas", "must be an integer, got a string ('3')"),
    ]


def test_wrong_api_version_for_a_workload() -> None:
    doc = deployment()
    doc["apiVersion"] = "extensions/v1beta1"
    with pytest.raises(ObjectError) as exc:
        parse_workload(doc)
    assert errors_of(exc) == [
        ("apiVersion", "must be \"apps/v1\" for a Deployment, got 'extensions/v1beta1'"),
    ]


# --- pods -------------------------------------------------------------------------------------


def test_pod_parses_the_fields_aviator_uses() -> None:
    p = parse_pod(pod())
    assert p.ref == ObjectRef("Pod", "shop", "web-1")
    assert p.ready
    assert p.pod_ip == "10.0.0.7"
    assert p.node_name == "node-a"
    assert p.zone == "eu-1a"
    assert p.port_named("http") == 8080


def test_legacy_zone_label_and_no_zone() -> None:
    doc = pod()
    doc["metadata"]["labels"] = {"failure-domain.beta.kubernetes.io/zone": "old-1"}
    assert parse_pod(doc).zone == "old-1"
    doc["metadata"]["labels"] = {}
    assert parse_pod(doc).zone is None


def test_pod_ip_falls_back_to_pod_ips() -> None:
    doc = pod()
    del doc["status"]["podIP"]
    doc["status"]["podIPs"] = [{"ip": "fd00::7"}, {"ip": "10.0.0.7"}]
    assert parse_pod(doc).pod_ip == "fd00::7"


@pytest.mark.parametrize(
    ("change", "ready"),
    [
        ({}, True),
        ({"phase": "Pending"}, False),
        ({"phase": "Succeeded"}, False),
        ({"conditions": [{"type": "Ready", "status": "False"}]}, False),
        ({"conditions": [{"type": "Ready", "status": "Unknown"}]}, False),
        ({"conditions": []}, False),
        ({"podIP": None, "podIPs": []}, False),
    ],
)
def test_pod_readiness(change: dict[str, Any], ready: bool) -> None:
    assert parse_pod(pod(**change)).ready is ready


def test_terminating_pod_is_not_ready() -> None:
    doc = pod()
    doc["metadata"]["deletionTimestamp"] = "2024-05-01T12:05:00Z"
    p = parse_pod(doc)
    assert p.meta.deletion_timestamp == datetime(2024, 5, 1, 12, 5, tzinfo=UTC)
    assert not p.ready


def test_pod_errors() -> None:
    doc = pod(podIP="10.0.0.300")
    del doc["metadata"]["name"]
    doc["spec"]["containers"][0]["ports"] = [{"name": "HTTP", "containerPort": "8080"}]
    with pytest.raises(ObjectError) as exc:
        parse_pod(doc)
    assert exc.value.ref == ObjectRef("Pod", "shop", "<unnamed>")
    assert errors_of(exc) == [
        ("metadata.name", "required field is missing: the object's name"),
        ("spec.containers[0].ports[0].containerPort", "must be an integer, got a string ('8080')"),
        (
            "spec.containers[0].ports[0].name",
            "port name 'HTTP' must be lowercase letters, "
            "digits and '-' (not at either end, never '--')",
        ),
        ("status.podIP", "'10.0.0.300' is not an IPv4 or IPv6 address"),
    ]


# --- selectors --------------------------------------------------------------------------------


def req(key: str, op: str, *values: str) -> Requirement:
    return Requirement(key, Operator(op), frozenset(values))


@pytest.mark.parametrize(
    ("requirement", "labels", "matches"),
    [
        (req("tier", "In", "web", "api"), {"tier": "web"}, True),
        (req("tier", "In", "web", "api"), {"tier": "db"}, False),
        (req("tier", "In", "web"), {}, False),
        (req("tier", "NotIn", "db"), {"tier": "web"}, True),
        (req("tier", "NotIn", "db"), {"tier": "db"}, False),
        # NotIn matches objects that lack the key, as in apimachinery.
        (req("tier", "NotIn", "db"), {}, True),
        (req("tier", "Exists"), {"tier": ""}, True),
        (req("tier", "Exists"), {"other": "x"}, False),
        (req("tier", "DoesNotExist"), {}, True),
        (req("tier", "DoesNotExist"), {"tier": "web"}, False),
    ],
)
def test_requirement_semantics(
    requirement: Requirement, labels: dict[str, str], matches: bool
) -> None:
    assert requirement.matches(labels) is matches


def test_selector_is_an_and_of_everything() -> None:
    sel = LabelSelector(
        Labels({"app": "web"}), (req("track", "NotIn", "canary"), req("zone", "Exists"))
    )
    assert sel.matches({"app": "web", "zone": "a"})
    assert sel.matches({"app": "web", "zone": "a", "track": "stable"})
    assert not sel.matches({"app": "web", "zone": "a", "track": "canary"})
    assert not sel.matches({"app": "web"})
    assert not sel.matches({"app": "api", "zone": "a"})
    assert str(sel) == "app=web,track notin (canary),zone"


def test_empty_selector_matches_everything() -> None:
    assert LabelSelector().empty
    assert LabelSelector().matches({})
    assert LabelSelector().matches({"anything": "x"})


def test_requirement_invariants() -> None:
    with pytest.raises(ValueError, match="needs at least one value"):
        Requirement("k", Operator.IN)
    with pytest.raises(ValueError, match="takes no values"):
        Requirement("k", Operator.DOES_NOT_EXIST, frozenset({"v"}))


def test_labels_are_immutable_hashable_and_equal_to_dicts() -> None:
    raw = {"a": "1"}
    labels = Labels(raw)
    raw["a"] = "2"  # a copy was taken
    assert labels == {"a": "1"}
    assert hash(labels) == hash(Labels({"a": "1"}))
    with pytest.raises(AttributeError):
        labels._items = {}  # type: ignore[misc]
    w = parse_workload(deployment())
    assert hash(w) == hash(parse_workload(copy.deepcopy(deployment())))

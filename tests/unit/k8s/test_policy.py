"""AviatorPolicy: defaults, and validation messages (every error, exact paths and words)."""

from __future__ import annotations

from typing import Any

import pytest

from aviator.k8s.duration import Duration
from aviator.k8s.fields import FieldError, ObjectRef
from aviator.k8s.objects import WorkloadKind
from aviator.k8s.policy import (
    DEFAULT_PROBE_PATH,
    AviatorPolicy,
    InvalidPolicy,
    PolicyError,
    parse_policy,
    parse_policy_entry,
)
from aviator.probing.weigher import WeigherKnobs

SPEC_KNOWN = (
    "known fields: annotatePods, latencyThreshold, pingInterval, port, probe, publishService, "
    "targetRef, weigher"
)
STRICT = (
    "not in the AviatorPolicy schema (strict validation, as kubectl apply --validate=strict "
    "reports it)"
)


def policy(spec: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "aviator.io/v1alpha1",
        "kind": "AviatorPolicy",
        "metadata": {"name": "web", "namespace": "shop", "generation": 2},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "latencyThreshold": "100ms",
            "pingInterval": "5s",
        },
    }
    if spec is not None:
        doc["spec"] = spec
    doc.update(top)
    return doc


def errors(doc: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(PolicyError) as exc:
        parse_policy(doc)
    assert exc.value.ref == ObjectRef("AviatorPolicy", "shop", "web")
    return [(e.path, e.message) for e in exc.value.errors]


def with_spec(**changes: Any) -> dict[str, Any]:
    doc = policy()
    for k, v in changes.items():
        if v is None:
            del doc["spec"][k]
        else:
            doc["spec"][k] = v
    return doc


def test_minimal_policy_gets_every_default() -> None:
    p = parse_policy(policy())
    assert p.ref == ObjectRef("AviatorPolicy", "shop", "web")
    assert p.target == ObjectRef("Deployment", "shop", "web")
    assert str(p.key) == "shop/web"
    assert p.target_ref.kind is WorkloadKind.DEPLOYMENT
    assert p.target_ref.api_version == "apps/v1"
    assert p.latency_threshold == Duration.of(milliseconds=100)
    assert p.ping_interval == Duration.of(seconds=5)
    assert p.port is None  # resolved against the workload's template later
    assert p.probe.path == DEFAULT_PROBE_PATH == "/aviator/probe"
    assert p.probe.port is None  # the traffic port
    assert p.probe.timeout == Duration.of(seconds=1)  # min(1s, 5s)
    assert p.weigher == WeigherKnobs()
    assert p.meta.generation == 2


def test_default_timeout_is_capped_at_the_ping_interval() -> None:
    p = parse_policy(with_spec(pingInterval="250ms"))
    assert p.probe.timeout == Duration.of(milliseconds=250)


def test_target_api_version_defaults_to_apps_v1() -> None:
    doc = policy()
    del doc["spec"]["targetRef"]["apiVersion"]
    assert parse_policy(doc).target_ref.api_version == "apps/v1"


def test_full_policy() -> None:
    p = parse_policy(
        with_spec(
            targetRef={"kind": "StatefulSet", "name": "db"},
            latencyThreshold="1m",
            pingInterval="1m30s",
            port="http",
            probe={"path": "/healthz?deep=1", "port": 9090, "timeout": "2.5s"},
            weigher={"maxWeightRatio": 10, "degradeHot": True},
        )
    )
    assert p.target == ObjectRef("StatefulSet", "shop", "db")
    assert p.port == "http"
    assert (p.probe.path, p.probe.port, p.probe.timeout) == (
        "/healthz?deep=1",
        9090,
        Duration.of(seconds=2.5),
    )
    assert p.weigher.max_weight_ratio == 10.0
    assert p.weigher.degrade_hot is True
    assert p.ping_interval == Duration.of(seconds=90)


def test_spec_dict_round_trips() -> None:
    p = parse_policy(
        with_spec(
            port=8443,
            probe={"port": "admin", "timeout": "7500us"},
            pingInterval="10ms",
            latencyThreshold="1.5ms",
        )
    )
    again = parse_policy(policy(p.spec_dict()))
    assert again == p
    assert p.spec_dict()["probe"] == {"path": "/aviator/probe", "timeout": "7.5ms", "port": "admin"}


def test_everything_wrong_at_once_is_reported_at_once() -> None:
    doc = policy(
        {
            "targetRef": {"apiVersion": "apps/v1beta1", "kind": "ReplicaSet", "namespace": "x"},
            "latencyThreshold": 100,
            "pingInterval": "-1s",
            "port": "8080",
            "probe": {"path": "healthz", "timeout": "0"},
            "weigher": {"hotQuantile": 2, "smoothing": 0, "turbo": True},
            "retries": 3,
        },
        extra="x",
    )
    assert errors(doc) == [
        (
            "extra",
            f"unknown field: {STRICT}; known fields: apiVersion, kind, metadata, spec, status",
        ),
        ("spec.retries", f"unknown field: {STRICT}; {SPEC_KNOWN}"),
        (
            "spec.targetRef.namespace",
            f"unknown field (a policy targets a workload in its own "
            f"namespace): {STRICT}; known fields: apiVersion, kind, name",
        ),
        ("spec.targetRef.apiVersion", "unsupported value 'apps/v1beta1'; allowed: \"apps/v1\""),
        (
            "spec.targetRef.kind",
            'unsupported value \'ReplicaSet\'; allowed: "Deployment", "StatefulSet"',
        ),
        ("spec.targetRef.name", "required field is missing: the workload's name"),
        (
            "spec.latencyThreshold",
            'must be a duration string such as "500ms" or "1m30s", got a number (100)',
        ),
        ("spec.pingInterval", "'-1s' is negative; durations must be positive"),
        (
            "spec.port",
            "'8080' is a string: write a port number without quotes, or a container port name",
        ),
        (
            "spec.probe.path",
            "'healthz' must start with '/' and hold only printable ASCII "
            "without spaces (percent-encode the rest)",
        ),
        ("spec.probe.timeout", "'0' is zero; durations must be positive"),
        ("spec.weigher.hotQuantile", "must be a finite number in (0, 1], got 2.0"),
        ("spec.weigher.smoothing", "must be a finite number in (0, 1], got 0.0"),
        (
            "spec.weigher.turbo",
            "unknown field; allowed fields: degradeHot, hotQuantile, "
            "hysteresis, latencyExponent, maxWeightRatio, minChange, minHotRif, smoothing, "
            "standOut",
        ),
    ]


def test_missing_required_fields() -> None:
    assert errors(policy({})) == [
        (
            "spec.targetRef",
            "required field is missing: the workload to balance: {apiVersion: "
            "apps/v1, kind: Deployment|StatefulSet, name}",
        ),
        (
            "spec.latencyThreshold",
            'required field is missing: a duration such as "100ms": '
            'endpoints slower than this are "hot"',
        ),
        (
            "spec.pingInterval",
            'required field is missing: a duration such as "1s": how often each pod is probed',
        ),
    ]
    doc = policy()
    del doc["spec"]
    assert errors(doc) == [
        ("spec", "required field is missing: targetRef, latencyThreshold and pingInterval"),
    ]


def test_kind_is_case_sensitive_with_a_hint() -> None:
    doc = with_spec(targetRef={"kind": "deployment", "name": "web"})
    assert errors(doc) == [
        (
            "spec.targetRef.kind",
            "unsupported value 'deployment' (kinds are case-sensitive); "
            'allowed: "Deployment", "StatefulSet"',
        ),
    ]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"pingInterval": "5ms"},
            [("spec.pingInterval", "5ms is out of range; allowed: 10ms to 5m0s")],
        ),
        (
            {"pingInterval": "6m"},
            [("spec.pingInterval", "6m0s is out of range; allowed: 10ms to 5m0s")],
        ),
        (
            {"latencyThreshold": "999us"},
            [("spec.latencyThreshold", "999µs is out of range; allowed: 1ms to 1m0s")],
        ),
        (
            {"latencyThreshold": "1m0.001s"},
            [("spec.latencyThreshold", "1m0.001s is out of range; allowed: 1ms to 1m0s")],
        ),
        (
            {"latencyThreshold": "5"},
            [
                (
                    "spec.latencyThreshold",
                    "'5' has no unit: write numbers "
                    'with units (ns, us, ms, s, m, h), e.g. "500ms", "5s", "1m30s"',
                )
            ],
        ),
        (
            {"pingInterval": "1s", "probe": {"timeout": "1.5s"}},
            [
                (
                    "spec.probe.timeout",
                    "1.5s is longer than spec.pingInterval (1s); a probe must end "
                    "before the next one starts",
                )
            ],
        ),
        (
            {"probe": {"timeout": "500us"}},
            [("spec.probe.timeout", "500µs is too short; allowed: 1ms up to spec.pingInterval")],
        ),
        (
            {"pingInterval": "1" + "0" * 70 + "s"},
            [("spec.pingInterval", "must be at most 64 characters, got 72")],
        ),
    ],
)
def test_duration_bounds(changes: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    assert errors(with_spec(**changes)) == expected


def test_bounds_are_inclusive() -> None:
    p = parse_policy(with_spec(pingInterval="5m", latencyThreshold="1ms", probe={"timeout": "5m"}))
    assert p.probe.timeout == p.ping_interval
    parse_policy(with_spec(pingInterval="10ms", latencyThreshold="1m", probe={"timeout": "1ms"}))


@pytest.mark.parametrize(
    ("port", "message"),
    [
        (0, "port number must be in 1..65535, got 0"),
        (65536, "port number must be in 1..65535, got 65536"),
        (True, "must be a port number 1-65535 or a container port name, got a boolean (true)"),
        (8080.0, "must be a port number 1-65535 or a container port name, got a number (8080.0)"),
        (
            "HTTP",
            "port name 'HTTP' must be lowercase letters, digits and '-' (not at either end, "
            "never '--')",
        ),
        ("a-very-long-port-name", "port name 'a-very-long-port-name' must be 1-15 characters"),
    ],
)
def test_bad_ports(port: object, message: str) -> None:
    assert errors(with_spec(port=port)) == [("spec.port", message)]
    assert errors(with_spec(probe={"port": port})) == [("spec.probe.port", message)]


def test_good_ports() -> None:
    assert parse_policy(with_spec(port=1)).port == 1
    assert parse_policy(with_spec(port=65535)).port == 65535
    assert parse_policy(with_spec(port="http-alt")).port == "http-alt"


def test_top_level_api_version_and_kind() -> None:
    doc = policy(apiVersion="aviator.io/v1", kind="AviatorPolicies")
    assert errors(doc) == [
        ("apiVersion", "unsupported value 'aviator.io/v1'; allowed: \"aviator.io/v1alpha1\""),
        ("kind", "must be \"AviatorPolicy\", got 'AviatorPolicies'"),
    ]


def test_status_is_allowed_and_ignored() -> None:
    doc = policy(status={"conditions": [{"type": "Accepted", "status": "True"}]})
    assert parse_policy(doc) == parse_policy(policy())


def test_policy_error_message_lists_every_error() -> None:
    with pytest.raises(PolicyError) as exc:
        parse_policy(with_spec(pingInterval="1h", port=0))
    assert str(exc.value) == (
        "AviatorPolicy shop/web is invalid (2 errors):\n"
        "  spec.pingInterval: 1h0m0s is out of range; allowed: 10ms to 5m0s\n"
        "  spec.port: port number must be in 1..65535, got 0"
    )
    assert isinstance(exc.value, ValueError)


def test_named_invalid_policy_is_kept_as_invalid() -> None:
    entry = parse_policy_entry(with_spec(pingInterval="1h"))
    assert isinstance(entry, InvalidPolicy)
    assert entry.ref == ObjectRef("AviatorPolicy", "shop", "web")
    assert entry.meta.generation == 2
    assert entry.errors == (
        FieldError("spec.pingInterval", "1h0m0s is out of range; allowed: 10ms to 5m0s"),
    )
    assert isinstance(parse_policy_entry(policy()), AviatorPolicy)


def test_unnamed_policy_cannot_be_kept() -> None:
    doc = policy()
    doc["metadata"] = {"namespace": "shop"}
    with pytest.raises(PolicyError) as exc:
        parse_policy_entry(doc)
    assert exc.value.ref == ObjectRef("AviatorPolicy", "shop", "<unnamed>")
    assert [(e.path, e.message) for e in exc.value.errors] == [
        ("metadata.name", "required field is missing: the object's name"),
    ]


def test_construction_checks_the_invariants() -> None:
    p = parse_policy(policy())
    with pytest.raises(PolicyError) as exc:
        AviatorPolicy(
            meta=p.meta,
            target_ref=p.target_ref,
            latency_threshold=p.latency_threshold,
            ping_interval=Duration.of(seconds=1),
            probe=type(p.probe)(timeout=Duration.of(seconds=2)),
        )
    assert [e.path for e in exc.value.errors] == ["spec.probe.timeout"]

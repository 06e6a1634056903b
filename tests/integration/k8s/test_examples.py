"""The example manifests load without problems and resolve to the three example pods."""

from __future__ import annotations

from pathlib import Path

from aviator.k8s.fields import ObjectRef
from aviator.k8s.resolve import ACCEPTED, RESOLVED_REFS, ConditionStatus, resolve_state
from aviator.source.directory import load_directory

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "web"


def test_examples_resolve() -> None:
    state = load_directory(EXAMPLES)
    assert state.problems == ()
    assert [p.ref for p in state.policies] == [ObjectRef("AviatorPolicy", "shop", "web")]
    assert [w.ref for w in state.workloads] == [ObjectRef("Deployment", "shop", "web")]
    assert len(state.pods) == 3
    (r,) = resolve_state(state)
    assert r.serving
    for type_ in (ACCEPTED, RESOLVED_REFS):
        c = r.condition(type_)
        assert c is not None
        assert c.status is ConditionStatus.TRUE
    assert r.port == "http"
    assert [(str(e.address), e.probe_port, e.zone, e.node) for e in r.endpoints] == [
        ("127.0.0.11:8080", 8080, "zone-a", "node-1"),
        ("127.0.0.12:8080", 8080, "zone-b", "node-2"),
        ("127.0.0.13:8080", 8080, "zone-c", "node-3"),
    ]
    assert r.policy is not None
    assert r.policy.ping_interval.seconds == 1.0
    assert r.policy.latency_threshold.seconds == 0.1
    assert r.policy.weigher.max_weight_ratio == 20.0

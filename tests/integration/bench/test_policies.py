"""The compared policies and their sidecar bootstraps (pure parts, plus Envoy's own check)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format

from aviator.bench.policies import (
    OUTLIER_DETECTION,
    POLICIES,
    WORKLOAD,
    Policy,
    PolicySource,
    parse_policies,
    sidecar_bootstrap,
    static_cluster,
    workload_host,
)
from aviator.envoy.bootstrap import SIDECAR_LISTENER, XDS_CLUSTER, render_bootstrap
from aviator.envoy.process import validate
from aviator.model import EndpointAddress
from aviator.xds.resources import build_cluster

ENDPOINTS = [EndpointAddress("127.0.0.1", 18080), EndpointAddress("127.0.0.1", 18081)]


def _lb_name(bootstrap: dict[str, Any]) -> str:
    cluster = bootstrap["static_resources"]["clusters"][-1]
    name: str = cluster["load_balancing_policy"]["policies"][0]["typed_extension_config"]["name"]
    return name


def test_parse_policies_keeps_the_order_and_names_mistakes() -> None:
    assert [p.name for p in parse_policies("cswrr, rr")] == ["cswrr", "rr"]
    assert [p.name for p in parse_policies("rr,lr,cswrr,aviator")] == list(POLICIES)
    with pytest.raises(ValueError, match="unknown policy wrr; known: rr, lr, cswrr, aviator"):
        parse_policies("rr,wrr")
    with pytest.raises(ValueError, match="policy listed twice: lr"):
        parse_policies("lr,rr,lr")
    with pytest.raises(ValueError, match="no policy given"):
        parse_policies(" , ")


def test_a_policy_has_a_balancer_exactly_when_it_is_static() -> None:
    with pytest.raises(ValueError, match="static policy needs an lb_policy"):
        Policy("x", "x", PolicySource.STATIC)
    with pytest.raises(ValueError, match="control-plane policy must not have one"):
        Policy("x", "x", PolicySource.CONTROL_PLANE, {"name": "y"})
    assert [p.name for p in POLICIES.values() if p.needs_control_plane] == ["aviator"]


def test_static_cluster_mirrors_the_control_planes_cluster() -> None:
    # Same outlier detection and connect timeout as Aviator's CDS cluster: the balancer is
    # the only difference between the policies.
    served = json_format.MessageToDict(build_cluster(WORKLOAD), preserving_proto_field_name=True)
    mine = static_cluster(POLICIES["lr"], ENDPOINTS)
    assert mine["name"] == served["name"] == "bench/bench"
    assert mine["connect_timeout"] == served["connect_timeout"]
    expected = {k: (v if isinstance(v, str) else int(v)) for k, v in OUTLIER_DETECTION.items()}
    assert mine["outlier_detection"] == expected
    assert served["outlier_detection"] == expected
    assert "circuit_breakers" not in mine
    assert "circuit_breakers" not in served
    hosts = mine["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [h["endpoint"]["address"]["socket_address"]["port_value"] for h in hosts] == [
        18080,
        18081,
    ]


def test_static_sidecar_keeps_the_listener_and_drops_ads() -> None:
    static = sidecar_bootstrap(
        POLICIES["cswrr"], node_id="s0", listen_port=15001, endpoints=ENDPOINTS
    )
    reference = render_bootstrap(
        xds_host="127.0.0.1",
        xds_port=1,
        node_id="s0",
        mode="sidecar",
        listen_port=15001,
        admin_port=0,
        cluster="bench",
        workloads=[WORKLOAD],
    )
    assert "dynamic_resources" not in static
    assert [c["name"] for c in static["static_resources"]["clusters"]] == ["bench/bench"]
    assert static["static_resources"]["listeners"] == reference["static_resources"]["listeners"]
    assert static["static_resources"]["listeners"][0]["name"] == SIDECAR_LISTENER
    assert _lb_name(static) == "envoy.load_balancing_policies.client_side_weighted_round_robin"
    assert workload_host() == "bench.bench"


def test_aviator_sidecar_is_the_plain_ads_sidecar() -> None:
    with pytest.raises(ValueError, match="needs the control plane's xDS address"):
        sidecar_bootstrap(POLICIES["aviator"], node_id="s0", listen_port=15001)
    with pytest.raises(ValueError, match="gets its cluster from the control plane"):
        static_cluster(POLICIES["aviator"], ENDPOINTS)
    cfg = sidecar_bootstrap(
        POLICIES["aviator"], node_id="s0", listen_port=15001, xds=("127.0.0.1", 18000)
    )
    clusters = cfg["static_resources"]["clusters"]
    assert [c["name"] for c in clusters] == [XDS_CLUSTER]
    assert cfg["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
    assert cfg["node"]["metadata"]["aviator.io/mode"] == "sidecar"


@pytest.mark.envoy
@pytest.mark.parametrize("name", list(POLICIES))
async def test_envoy_accepts_every_sidecar_bootstrap(name: str) -> None:
    cfg = sidecar_bootstrap(
        POLICIES[name],
        node_id=f"bench-{name}",
        listen_port=15001,
        endpoints=ENDPOINTS,
        xds=("127.0.0.1", 18000),
    )
    warnings = await validate(cfg)
    assert not [w for w in warnings if "deprecated" in w.lower()]

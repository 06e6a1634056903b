from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

# Registers the typed_config messages the bootstraps use, so ParseDict can resolve them.
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.resource_monitors.downstream_connections.v3 import (  # noqa: F401
    downstream_connections_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

from aviator.envoy import bootstrap as b
from aviator.envoy.bootstrap import bootstrap_yaml, duration, render_bootstrap, workload_domains
from aviator.model import WorkloadKey

APP = WorkloadKey("shop", "cart")
API = WorkloadKey("shop", "api")


def gateway(**kw: Any) -> dict[str, Any]:
    return render_bootstrap(xds_host="10.0.0.5", xds_port=18000, node_id="gw-1", **kw)


def sidecar(**kw: Any) -> dict[str, Any]:
    kw.setdefault("workloads", [APP, API])
    return render_bootstrap(
        xds_host="10.0.0.5", xds_port=18000, node_id="sc-1", mode="sidecar", **kw
    )


def route_config(boot: dict[str, Any]) -> dict[str, Any]:
    (listener,) = boot["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    rc: dict[str, Any] = hcm["typed_config"]["route_config"]
    return rc


def test_gateway_gets_listeners_and_clusters_over_ads_only() -> None:
    boot = gateway()
    dyn = boot["dynamic_resources"]
    assert dyn["lds_config"] == {"ads": {}, "resource_api_version": "V3"}
    assert dyn["cds_config"] == {"ads": {}, "resource_api_version": "V3"}
    assert dyn["ads_config"] == {
        "api_type": "GRPC",
        "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "aviator-xds"}}],
        "set_node_on_first_message_only": True,
    }
    assert "listeners" not in boot["static_resources"]
    assert [c["name"] for c in boot["static_resources"]["clusters"]] == ["aviator-xds"]


def test_node_and_admin() -> None:
    boot = gateway(listen_port=8080, admin_port=9000, cluster="edge")
    assert boot["node"] == {
        "id": "gw-1",
        "cluster": "edge",
        "metadata": {"aviator.io/mode": "gateway", "aviator.io/listen-port": 8080},
    }
    assert boot["admin"] == {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 9000}}
    }


def test_gateway_metadata_asks_for_a_listener_or_leaves_it_to_the_control_plane() -> None:
    assert gateway()["node"]["metadata"] == {"aviator.io/mode": "gateway"}
    assert gateway(listen_port=44639, listen_address="0:0::0")["node"]["metadata"] == {
        "aviator.io/mode": "gateway",
        "aviator.io/listen-port": 44639,
        "aviator.io/listen-address": "::",  # canonical, as the control plane names it
    }


def test_the_control_plane_reads_the_keys_the_bootstrap_writes() -> None:
    from google.protobuf import struct_pb2

    from aviator.xds import resources

    assert (b.META_MODE, b.META_LISTEN_PORT, b.META_LISTEN_ADDRESS) == (
        resources.META_MODE,
        resources.META_LISTEN_PORT,
        resources.META_LISTEN_ADDRESS,
    )
    metadata = struct_pb2.Struct()
    metadata.update(gateway(listen_port=44639, listen_address="127.0.0.1")["node"]["metadata"])
    info = resources.read_node_listener(metadata)
    assert (info.gateway, info.problems) == (True, ())
    assert resources.GatewayConfig().resolve(info.request) == resources.ListenSpec(
        "127.0.0.1", 44639
    )


def test_delta_selects_incremental_ads() -> None:
    assert gateway(delta=True)["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    assert sidecar(delta=True)["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"


@pytest.mark.parametrize(
    ("host", "kind"),
    [("10.0.0.5", "STATIC"), ("::1", "STATIC"), ("aviator.aviator-system.svc", "STRICT_DNS")],
)
def test_xds_cluster_speaks_http2_to_the_control_plane(host: str, kind: str) -> None:
    boot = render_bootstrap(xds_host=host, xds_port=18000, node_id="n")
    (xds,) = boot["static_resources"]["clusters"]
    assert xds["type"] == kind
    (group,) = xds["load_assignment"]["endpoints"]
    (lb,) = group["lb_endpoints"]
    assert lb["endpoint"]["address"]["socket_address"] == {"address": host, "port_value": 18000}
    options = xds["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"]


def test_sidecar_listener_defaults_to_loopback() -> None:
    (listener,) = sidecar()["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 10000}


def test_sidecar_gets_clusters_over_ads_and_a_static_listener() -> None:
    boot = sidecar(listen_port=15001, listen_address="0.0.0.0")
    dyn = boot["dynamic_resources"]
    assert "lds_config" not in dyn
    assert dyn["cds_config"] == {"ads": {}, "resource_api_version": "V3"}
    assert boot["node"]["metadata"] == {"aviator.io/mode": "sidecar"}
    (listener,) = boot["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 15001}
    rc = route_config(boot)
    # Its clusters arrive over CDS later: without this Envoy refuses the bootstrap.
    assert rc["validate_clusters"] is False
    assert rc["ignore_port_in_host_matching"] is True


def test_sidecar_routes_each_workload_host_to_its_cluster() -> None:
    vhosts = route_config(sidecar())["virtual_hosts"]
    by_name = {v["name"]: v for v in vhosts}
    assert by_name["shop/cart"]["domains"] == [
        "cart.shop",
        "cart.shop.svc",
        "cart.shop.svc.cluster.local",
    ]
    assert by_name["shop/cart"]["routes"] == [
        {"match": {"prefix": "/"}, "route": {"cluster": "shop/cart"}}
    ]
    assert by_name["shop/api"]["routes"][0]["route"] == {"cluster": "shop/api"}
    # The catch-all comes last so the named hosts win.
    assert vhosts[-1]["domains"] == ["*"]


def test_workload_domains_follow_the_cluster_domain() -> None:
    assert workload_domains(APP, "corp.example")[-1] == "cart.shop.svc.corp.example"


def test_sidecar_header_route_only_accepts_namespace_slash_name() -> None:
    header_route, fallback = route_config(sidecar())["virtual_hosts"][-1]["routes"]
    (matcher,) = header_route["match"]["headers"]
    assert matcher["name"] == b.CLUSTER_HEADER
    assert header_route["route"] == {"cluster_header": b.CLUSTER_HEADER}
    assert header_route["request_headers_to_remove"] == [b.CLUSTER_HEADER]
    regex = re.compile(matcher["string_match"]["safe_regex"]["regex"])
    for good in ("shop/cart", "a/b", "ns-1/web.v2", WorkloadKey("x", "y").cluster_name):
        assert regex.match(good), good
    for bad in ("aviator-xds", "shop/", "/cart", "shop/cart/x", "Shop/cart", "shop/-cart", ""):
        assert not regex.match(bad), bad
    assert fallback["direct_response"]["status"] == 404


def test_sidecar_without_workloads_still_routes_by_header() -> None:
    vhosts = route_config(sidecar(workloads=[]))["virtual_hosts"]
    assert [v["name"] for v in vhosts] == ["by-header"]


def test_initial_fetch_timeout_applies_to_every_ads_source() -> None:
    dyn = gateway(initial_fetch_timeout=0.5)["dynamic_resources"]
    assert dyn["lds_config"]["initial_fetch_timeout"] == "0.5s"
    assert dyn["cds_config"]["initial_fetch_timeout"] == "0.5s"
    assert "initial_fetch_timeout" not in gateway()["dynamic_resources"]["cds_config"]


def test_connection_cap() -> None:
    (monitor,) = gateway(max_downstream_connections=123)["overload_manager"]["resource_monitors"]
    assert monitor["typed_config"]["max_active_downstream_connections"] == 123


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (15, "15s"), (0.25, "0.25s"), (1e-5, "0.00001s")]
)
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


@pytest.mark.parametrize(
    "variant",
    [
        lambda: gateway(),
        lambda: gateway(delta=True, initial_fetch_timeout=2),
        lambda: sidecar(),
        lambda: sidecar(workloads=[]),
    ],
)
def test_every_variant_is_a_valid_bootstrap_message(variant: Any) -> None:
    # Strict parse: an unknown or misspelt field name raises ParseError.
    json_format.ParseDict(variant(), bootstrap_pb2.Bootstrap())


def test_yaml_round_trips_without_anchors() -> None:
    boot = sidecar()
    text = bootstrap_yaml(boot)
    assert yaml.safe_load(text) == boot
    assert "&id" not in text
    assert "*id" not in text
    assert text.startswith("node:")


def test_render_is_deterministic() -> None:
    assert bootstrap_yaml(sidecar()) == bootstrap_yaml(sidecar())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"xds_port": 0}, "xds_port must be in 1..65535, got 0"),
        ({"xds_port": 70000}, "xds_port must be in 1..65535, got 70000"),
        ({"listen_port": 0}, "listen_port must be in 1..65535"),
        ({"listen_address": "localhost"}, "listen_address must be an IP address"),
        ({"listen_address": "", "mode": "sidecar"}, "listen_address must be an IP address"),
        ({"admin_port": -1}, "admin_port must be in 0..65535"),
        ({"node_id": ""}, "node_id must not be empty"),
        ({"xds_host": ""}, "xds_host must not be empty"),
        ({"cluster": ""}, "cluster must not be empty"),
        ({"mode": "mesh"}, "mode must be 'gateway' or 'sidecar'"),
        ({"workloads": [APP]}, "workloads are for sidecar mode"),
        ({"initial_fetch_timeout": -1}, "initial_fetch_timeout must be >= 0"),
        ({"max_downstream_connections": 0}, "max_downstream_connections must be >= 1"),
    ],
)
def test_bad_arguments_are_rejected_with_the_value(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"xds_host": "127.0.0.1", "xds_port": 18000, "node_id": "n"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        render_bootstrap(**args)


def test_a_workload_listed_twice_is_rejected() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        sidecar(workloads=[APP, API, APP])


def test_admin_port_zero_lets_envoy_pick() -> None:
    assert gateway(admin_port=0)["admin"]["address"]["socket_address"]["port_value"] == 0

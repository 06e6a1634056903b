"""The pure builders: what each Envoy resource says, and that it is deterministic."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2, health_check_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from hypothesis import given
from hypothesis import strategies as st

from aviator.model import (
    MAX_WEIGHT,
    EndpointAddress,
    Health,
    WeightedEndpoint,
    WeightedWorkload,
    WorkloadKey,
)
from aviator.xds import resources as r

KEY = WorkloadKey("shop", "api")


def _workload(*endpoints: WeightedEndpoint, port: int = 8080) -> WeightedWorkload:
    return WeightedWorkload(KEY, port, tuple(endpoints))


def _ep(
    ip: str, weight: int, health: Health = Health.HEALTHY, port: int = 8080
) -> WeightedEndpoint:
    return WeightedEndpoint(EndpointAddress(ip, port), weight, health)


def test_cluster_is_eds_over_ads_v3_with_least_request() -> None:
    cluster = r.build_cluster(KEY)
    assert cluster.name == "shop/api"
    assert cluster.type == cluster_pb2.Cluster.EDS
    eds = cluster.eds_cluster_config.eds_config
    assert eds.HasField("ads")
    assert eds.resource_api_version == config_source_pb2.V3
    # Least request first; round robin for clients without it (gRPC proxyless).
    policies = [p.typed_extension_config for p in cluster.load_balancing_policy.policies]
    assert [p.name for p in policies] == [r.LEAST_REQUEST_POLICY, r.ROUND_ROBIN_POLICY]
    assert policies[0].typed_config.Is(least_request_pb2.LeastRequest.DESCRIPTOR)
    assert policies[1].typed_config.Is(round_robin_pb2.RoundRobin.DESCRIPTOR)
    assert cluster.connect_timeout.seconds > 0


def test_cluster_outlier_detection_is_a_bounded_backstop() -> None:
    od = r.build_cluster(KEY).outlier_detection
    assert od.consecutive_5xx.value == r.CONSECUTIVE_5XX > 0
    assert od.base_ejection_time.seconds > 0
    assert 0 < od.max_ejection_percent.value < 100  # never ejects the whole cluster
    assert od.HasField("enforcing_success_rate")
    assert od.enforcing_success_rate.value == 0


def test_load_assignment_carries_weights_and_health() -> None:
    cla = r.build_load_assignment(
        _workload(
            _ep("10.0.0.1", 7),
            _ep("10.0.0.2", 1, Health.DEGRADED),
            _ep("10.0.0.3", MAX_WEIGHT, Health.UNHEALTHY),
        )
    )
    assert cla.cluster_name == "shop/api"
    (locality,) = cla.endpoints
    # gRPC's client needs the locality field present and a locality weight.
    assert locality.HasField("locality")
    assert locality.load_balancing_weight.value == 1
    got = [
        (
            e.endpoint.address.socket_address.address,
            e.endpoint.address.socket_address.port_value,
            e.load_balancing_weight.value,
            e.health_status,
        )
        for e in locality.lb_endpoints
    ]
    assert got == [
        ("10.0.0.1", 8080, 7, health_check_pb2.HEALTHY),
        ("10.0.0.2", 8080, 1, health_check_pb2.DEGRADED),
        ("10.0.0.3", 8080, MAX_WEIGHT, health_check_pb2.UNHEALTHY),
    ]


def _by_fields(workload: WeightedWorkload) -> bytes:
    """The ClusterLoadAssignment built field by field (what LoadAssignmentBuilder replaced)."""
    from envoy.config.core.v3 import address_pb2, base_pb2
    from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
    from google.protobuf import wrappers_pb2

    ordered = sorted(workload.endpoints, key=lambda e: (e.address.ip, e.address.port))
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=workload.key.cluster_name)
    if ordered:
        cla.endpoints.append(
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=address_pb2.Address(
                                socket_address=address_pb2.SocketAddress(
                                    address=e.address.ip, port_value=e.address.port
                                )
                            )
                        ),
                        health_status=r._HEALTH[e.health],
                        load_balancing_weight=wrappers_pb2.UInt32Value(value=e.weight),
                    )
                    for e in ordered
                ],
                locality=base_pb2.Locality(),
                load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
            )
        )
    data: bytes = cla.SerializeToString(deterministic=True)
    return data


_endpoints = st.lists(
    st.tuples(
        st.integers(1, 40),  # the address's last octet: few, so builds share endpoints
        st.integers(1, MAX_WEIGHT),
        st.sampled_from(list(Health)),
    ),
    max_size=30,
    unique_by=lambda t: t[0],
)


@given(st.lists(_endpoints, min_size=1, max_size=6))
def test_a_builder_kept_across_changes_builds_what_one_built_fresh_builds(
    builds: list[list[tuple[int, int, Health]]],
) -> None:
    """Each endpoint's encoding is reused from the last build: the bytes never differ from a
    build from scratch, nor from the message built field by field."""
    builder = r.LoadAssignmentBuilder()
    for endpoints in builds:
        workload = _workload(*(_ep(f"10.0.0.{i}", w, h) for i, w, h in endpoints))
        kept = builder.build(workload).SerializeToString(deterministic=True)
        assert kept == r.build_load_assignment(workload).SerializeToString(deterministic=True)
        assert kept == _by_fields(workload)


def test_load_assignment_without_endpoints_is_empty_not_missing() -> None:
    cla = r.build_load_assignment(_workload())
    assert cla.cluster_name == "shop/api"
    assert len(cla.endpoints) == 0


@given(
    st.lists(
        st.tuples(st.integers(1, 254), st.integers(1, MAX_WEIGHT), st.sampled_from(list(Health))),
        max_size=20,
        unique_by=lambda t: t[0],
    ),
    st.randoms(use_true_random=False),
)
def test_load_assignment_bytes_do_not_depend_on_endpoint_order(
    specs: list[tuple[int, int, Health]], rnd: object
) -> None:
    endpoints = [_ep(f"10.1.0.{i}", w, h) for i, w, h in specs]
    shuffled = list(endpoints)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    a = r.build_load_assignment(_workload(*endpoints)).SerializeToString(deterministic=True)
    b = r.build_load_assignment(_workload(*shuffled)).SerializeToString(deterministic=True)
    assert a == b
    cla = r.build_load_assignment(_workload(*endpoints))
    weights = [e.load_balancing_weight.value for loc in cla.endpoints for e in loc.lb_endpoints]
    assert all(w >= 1 for w in weights)
    assert sorted(weights) == sorted(w for _, w, _ in specs)


def test_listener_uses_rds_over_ads_and_the_router() -> None:
    gateway = r.GatewayConfig(route_name="gw-routes", address="127.0.0.1", port=10080)
    listener = r.build_listener(gateway)
    assert listener.name == "aviator-gateway-127.0.0.1-10080" == gateway.listener_name
    assert listener.address.socket_address.address == "127.0.0.1"
    assert listener.address.socket_address.port_value == 10080
    (chain,) = listener.filter_chains
    (network_filter,) = chain.filters
    assert network_filter.name == r.HCM_FILTER
    hcm = hcm_pb2.HttpConnectionManager()
    assert network_filter.typed_config.Unpack(hcm)
    assert hcm.rds.route_config_name == "gw-routes"
    assert hcm.rds.config_source.HasField("ads")
    assert hcm.rds.config_source.resource_api_version == config_source_pb2.V3
    assert [f.name for f in hcm.http_filters] == [r.ROUTER_FILTER]
    assert r.references(r.LISTENER_TYPE, listener) == {"gw-routes"}


def test_gateway_defaults() -> None:
    gateway = r.GatewayConfig()
    assert (gateway.address, gateway.port) == ("0.0.0.0", 10000)


def test_route_domains_cover_every_host_form_on_any_port() -> None:
    gateway = r.GatewayConfig(port=10000)
    other = WeightedWorkload(WorkloadKey("shop", "cart"), 9090, ())
    routes = r.build_route_configuration(gateway, [other, _workload(port=8080)])
    assert routes.name == gateway.route_name
    assert [v.name for v in routes.virtual_hosts] == ["shop/api", "shop/cart"]  # sorted
    api = routes.virtual_hosts[0]
    assert list(api.domains) == ["api.shop", "api.shop.svc", "api.shop.svc.cluster.local"]
    # One configuration for gateways on every port: Envoy matches the name, not the port.
    assert routes.ignore_port_in_host_matching
    (route,) = api.routes
    assert route.match.prefix == "/"
    assert route.route.cluster == "shop/api"
    # Envoy refuses a route configuration in which two virtual hosts share a domain.
    all_domains = [d for v in routes.virtual_hosts for d in v.domains]
    assert len(all_domains) == len(set(all_domains))
    assert r.references(r.ROUTE_TYPE, routes) == {"shop/api", "shop/cart"}


def test_route_domains_follow_the_cluster_domain() -> None:
    assert r.host_domains(KEY, "corp.local")[-1] == "api.shop.svc.corp.local"


def test_api_listener_for_grpc_clients() -> None:
    w = _workload(port=50051)
    names = r.grpc_listener_names(w)
    assert names == ("api.shop", "api.shop:50051")
    listener = r.build_api_listener(names[1])
    assert listener.HasField("api_listener")
    assert not listener.filter_chains
    assert r.references(r.LISTENER_TYPE, listener) == {r.GRPC_ROUTE_NAME}
    routes = r.build_grpc_route_configuration([w])
    assert list(routes.virtual_hosts[0].domains) == list(names)


def test_references_of_cluster_and_endpoints() -> None:
    cluster = r.build_cluster(KEY)
    assert r.references(r.CLUSTER_TYPE, cluster) == {"shop/api"}
    cluster.eds_cluster_config.service_name = "other"
    assert r.references(r.CLUSTER_TYPE, cluster) == {"other"}
    static = cluster_pb2.Cluster(name="static", type=cluster_pb2.Cluster.STATIC)
    assert r.references(r.CLUSTER_TYPE, static) == frozenset()
    assert r.references(r.ENDPOINT_TYPE, r.build_load_assignment(_workload())) == frozenset()


def test_resource_names() -> None:
    assert r.resource_name(r.ENDPOINT_TYPE, r.build_load_assignment(_workload())) == "shop/api"
    assert r.resource_name(r.CLUSTER_TYPE, r.build_cluster(KEY)) == "shop/api"

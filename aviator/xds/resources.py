"""Pure builders: weighted workloads → Envoy v3 resources, plus the xDS type URLs.

Nothing here performs I/O, reads a clock or imports gRPC. Every builder is deterministic: the
same input gives byte-identical (deterministically serialised) output, whatever the order of the
endpoints in the input, so content hashes make stable versions.

Resource naming:
- Cluster and ClusterLoadAssignment: ``WorkloadKey.cluster_name`` (``namespace/name``).
- Gateway mode: one RouteConfiguration (``GatewayConfig.route_name``) shared by every gateway,
  and one Listener per address and port some gateway asks for (:class:`ListenSpec`), named
  ``aviator-gateway-<address>-<port>``: a gateway receives only its own (Envoy binds every
  listener it holds). The name is a function of where it binds, so gateways asking for the same
  address and port share one listener resource, and the name says where it binds (in
  /debug/proxies and Envoy's config dump). A gateway told to move gets a new listener and the
  old one's removal in one LDS response; Envoy 1.40 accepts that, and replaced a listener of
  another name on the same address without a failed request (measured while upgrading from
  the single ``aviator-gateway`` listener).
- gRPC proxyless clients: one API listener per workload named ``name.namespace`` and
  ``name.namespace:port`` (the target of ``xds:///name.namespace[:port]``), sharing one
  RouteConfiguration (:data:`GRPC_ROUTE_NAME`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    health_check_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from aviator.model import Health, WeightedEndpoint, WeightedWorkload, WorkloadKey

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

#: The four types Aviator serves, in make-before-break order for additions: a Cluster before
#: the endpoints that fill it, a Listener before the routes it uses (removals go in reverse).
TYPE_ORDER: tuple[str, ...] = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)

#: Short names for logs and metric labels.
TYPE_SHORT: dict[str, str] = {
    CLUSTER_TYPE: "cds",
    ENDPOINT_TYPE: "eds",
    LISTENER_TYPE: "lds",
    ROUTE_TYPE: "rds",
}

#: Types whose SotW responses carry the full state (absence means removal); the other two are
#: answered by name and absence means nothing (xDS protocol, "Resource types").
FULL_STATE_TYPES = frozenset({CLUSTER_TYPE, LISTENER_TYPE})

HCM_FILTER = "envoy.filters.network.http_connection_manager"
ROUTER_FILTER = "envoy.filters.http.router"
HCM_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)

GRPC_ROUTE_NAME = "aviator-grpc"

LEAST_REQUEST_POLICY = "envoy.load_balancing_policies.least_request"
ROUND_ROBIN_POLICY = "envoy.load_balancing_policies.round_robin"

# Outlier detection is only a backstop for pods that fail fast (connection refused, 5xx in a
# row): Aviator's weights handle slowness. Success-rate ejection is switched off because it
# acts on the same signal as the weigher without its hysteresis.
CONSECUTIVE_5XX = 5
OUTLIER_INTERVAL_S = 5
BASE_EJECTION_TIME_S = 15
MAX_EJECTION_TIME_S = 120
# Never eject more than half of a cluster; with Envoy's default 50% panic threshold the rest
# keeps serving. (Envoy still ejects one host of a tiny cluster; panic routing covers that.)
MAX_EJECTION_PERCENT = 50
CONNECT_TIMEOUT_S = 1

_HEALTH = {
    Health.HEALTHY: health_check_pb2.HEALTHY,
    Health.DEGRADED: health_check_pb2.DEGRADED,
    Health.UNHEALTHY: health_check_pb2.UNHEALTHY,
}


GATEWAY_LISTENER_PREFIX = "aviator-gateway"

# Node metadata a gateway's bootstrap carries (``aviator bootstrap``; the same keys are defined
# in ``aviator.envoy.bootstrap``, which this layer may not import: a test holds them equal).
META_MODE = "aviator.io/mode"
META_LISTEN_PORT = "aviator.io/listen-port"
META_LISTEN_ADDRESS = "aviator.io/listen-address"


def _ip(text: str, what: str) -> str:
    """``text`` as an IP address in its canonical form; ValueError naming ``what`` otherwise
    (Envoy rejects a listener whose address is not an IP)."""
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        raise ValueError(f"{what} must be an IP address, got {text!r}") from None


def _listen_port(port: int, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"{what} must be in 1..65535, got {port!r}")
    return port


@dataclass(frozen=True, slots=True, order=True)
class ListenSpec:
    """Where one gateway listener binds: an IP address (canonical form) and a port."""

    address: str
    port: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", _ip(self.address, "a listener address"))
        _listen_port(self.port, "a listener port")

    @property
    def listener_name(self) -> str:
        """``aviator-gateway-0.0.0.0-10000`` (``[::]`` for IPv6): one name per place a
        listener binds, shared by every gateway asking for it."""
        return f"{GATEWAY_LISTENER_PREFIX}-{self._host()}-{self.port}"

    def _host(self) -> str:
        return f"[{self.address}]" if ":" in self.address else self.address

    def __str__(self) -> str:
        return f"{self._host()}:{self.port}"


@dataclass(frozen=True, slots=True)
class ListenRequest:
    """What a node's metadata asks for; a field left None takes the control plane's default
    (``aviator run --gateway-address``, ``--gateway-port``)."""

    address: str | None = None
    port: int | None = None


@dataclass(frozen=True, slots=True)
class NodeListener:
    """A node's metadata as the control plane reads it (:func:`read_node_listener`).

    ``gateway`` is False for a sidecar (``aviator.io/mode: sidecar``): it gets no gateway
    listener. ``problems`` name each field that was ignored, its value and what is allowed; a
    node with a bad listen field gets the default listener.
    """

    gateway: bool = True
    request: ListenRequest = ListenRequest()
    problems: tuple[str, ...] = ()


def _describe(value: struct_pb2.Value) -> str:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return f"the string {value.string_value!r}"
    if kind == "number_value":
        return f"{value.number_value:g}"
    if kind == "bool_value":
        return f"the boolean {str(value.bool_value).lower()}"
    return {"null_value": "null", "struct_value": "a map", "list_value": "a list"}.get(
        kind or "", "nothing"
    )


def read_node_listener(metadata: struct_pb2.Struct) -> NodeListener:
    """Read ``aviator.io/mode``, ``aviator.io/listen-port`` and ``aviator.io/listen-address``
    from a node's metadata. Never raises: a bad field is reported and ignored."""
    fields = metadata.fields
    problems: list[str] = []
    gateway = True
    if META_MODE in fields:
        mode = fields[META_MODE]
        if mode.WhichOneof("kind") == "string_value" and mode.string_value in (
            "gateway",
            "sidecar",
        ):
            gateway = mode.string_value == "gateway"
        else:
            problems.append(
                f"{META_MODE} must be 'gateway' or 'sidecar', got {_describe(mode)}: "
                "treated as a gateway"
            )
    port: int | None = None
    address: str | None = None
    bad_listen = False
    if META_LISTEN_PORT in fields:
        value = fields[META_LISTEN_PORT]
        number = value.number_value if value.WhichOneof("kind") == "number_value" else None
        if number is not None and number.is_integer() and 0 < number < 65536:
            port = int(number)
        else:
            bad_listen = True
            problems.append(
                f"{META_LISTEN_PORT} must be a port number in 1..65535, got {_describe(value)}"
            )
    if META_LISTEN_ADDRESS in fields:
        value = fields[META_LISTEN_ADDRESS]
        text = value.string_value if value.WhichOneof("kind") == "string_value" else ""
        try:
            address = _ip(text, META_LISTEN_ADDRESS)
        except ValueError:
            bad_listen = True
            problems.append(
                f"{META_LISTEN_ADDRESS} must be an IP address such as 0.0.0.0, 127.0.0.1 or ::, "
                f"got {_describe(value)}"
            )
    if bad_listen and gateway:
        # Half a request (a good address with a bad port) could bind where nobody expects:
        # a node whose listen fields are wrong gets the default listener, and says so.
        problems.append("this node gets the default gateway listener")
        port = address = None
    return NodeListener(gateway, ListenRequest(address, port), tuple(problems))


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Gateway mode: the shared RouteConfiguration and the default listener.

    ``address`` and ``port`` are the default :class:`ListenSpec`, for gateways whose metadata
    names none (a gateway listens on every interface unless told otherwise).
    """

    route_name: str = "aviator-gateway"
    address: str = "0.0.0.0"
    port: int = 10000
    cluster_domain: str = "cluster.local"
    stat_prefix: str = "aviator_gateway"

    def __post_init__(self) -> None:
        _listen_port(self.port, "gateway port")
        object.__setattr__(self, "address", _ip(self.address, "gateway address"))
        if not self.route_name:
            raise ValueError("the gateway route name must not be empty")

    @property
    def default(self) -> ListenSpec:
        return ListenSpec(self.address, self.port)

    @property
    def listener_name(self) -> str:
        """The name of the default listener."""
        return self.default.listener_name

    def resolve(self, request: ListenRequest) -> ListenSpec:
        """The listener for a node's request: its address and port, or the defaults."""
        return ListenSpec(
            request.address if request.address is not None else self.address,
            request.port if request.port is not None else self.port,
        )


def _ads_config_source() -> config_source_pb2.ConfigSource:
    # resource_api_version V3 on every ConfigSource: left out, Envoy warns and falls back.
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def pack(message: Message) -> any_pb2.Any:
    """Pack into an Any with deterministic serialisation (stable bytes → stable versions)."""
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed


def _lb_policy(name: str, config: Message) -> cluster_pb2.LoadBalancingPolicy.Policy:
    return cluster_pb2.LoadBalancingPolicy.Policy(
        typed_extension_config=extension_pb2.TypedExtensionConfig(
            name=name, typed_config=pack(config)
        )
    )


def build_cluster(key: WorkloadKey) -> cluster_pb2.Cluster:
    """An EDS-over-ADS cluster with least-request balancing and outlier detection."""
    return cluster_pb2.Cluster(
        name=key.cluster_name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads_config_source()),
        connect_timeout=duration_pb2.Duration(seconds=CONNECT_TIMEOUT_S),
        # Least request combines Aviator's weights (slow loop) with Envoy's own per-request
        # in-flight counts (fast loop). Given as the typed policy list rather than the legacy
        # lb_policy enum: each client takes the first policy it supports, so gRPC's proxyless
        # client (which rejects LEAST_REQUEST in the enum) falls back to round robin.
        load_balancing_policy=cluster_pb2.LoadBalancingPolicy(
            policies=[
                _lb_policy(LEAST_REQUEST_POLICY, least_request_pb2.LeastRequest()),
                _lb_policy(ROUND_ROBIN_POLICY, round_robin_pb2.RoundRobin()),
            ]
        ),
        outlier_detection=outlier_detection_pb2.OutlierDetection(
            consecutive_5xx=wrappers_pb2.UInt32Value(value=CONSECUTIVE_5XX),
            interval=duration_pb2.Duration(seconds=OUTLIER_INTERVAL_S),
            base_ejection_time=duration_pb2.Duration(seconds=BASE_EJECTION_TIME_S),
            max_ejection_time=duration_pb2.Duration(seconds=MAX_EJECTION_TIME_S),
            max_ejection_percent=wrappers_pb2.UInt32Value(value=MAX_EJECTION_PERCENT),
            enforcing_success_rate=wrappers_pb2.UInt32Value(value=0),
        ),
    )


def _encode_endpoint(e: WeightedEndpoint) -> bytes:
    """One endpoint as the bytes of a ``LocalityLbEndpoints`` holding only it."""
    lb_endpoint = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(
                    address=e.address.ip, port_value=e.address.port
                )
            )
        ),
        health_status=_HEALTH[e.health],
        # WeightedEndpoint guarantees 1..MAX_WEIGHT; Envoy rejects 0.
        load_balancing_weight=wrappers_pb2.UInt32Value(value=e.weight),
    )
    data: bytes = endpoint_components_pb2.LocalityLbEndpoints(
        lb_endpoints=[lb_endpoint]
    ).SerializeToString(deterministic=True)
    return data


def _address_order(e: WeightedEndpoint) -> tuple[str, int]:
    return (e.address.ip, e.address.port)


class LoadAssignmentBuilder:
    """Builds one workload's ClusterLoadAssignment again and again, re-encoding only the
    endpoints whose weight or health moved since the last build.

    Building 10,000 ``LbEndpoint`` messages from Python took 55-170 ms per weight change (issue
    9, item 6); each endpoint's encoding is kept instead (as the bytes of a
    ``LocalityLbEndpoints`` holding only it), and the locality is parsed from their
    concatenation: protobuf defines concatenated messages as merged, and a repeated field's
    merge appends, so the message is the one built field by field. Only the last build's
    endpoints are kept. Not thread-safe.
    """

    __slots__ = ("_encoded",)

    def __init__(self) -> None:
        self._encoded: dict[WeightedEndpoint, bytes] = {}

    def build(self, workload: WeightedWorkload) -> endpoint_pb2.ClusterLoadAssignment:
        """The workload's endpoints with their weights (always >= 1) and health, sorted by
        address so the output does not depend on input order."""
        old = self._encoded
        encoded: dict[WeightedEndpoint, bytes] = {}
        parts = []
        for e in sorted(workload.endpoints, key=_address_order):
            data = old.get(e)
            if data is None:
                data = _encode_endpoint(e)
            encoded[e] = data
            parts.append(data)
        cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=workload.key.cluster_name)
        if parts:
            locality = cla.endpoints.add(
                # gRPC's xDS client rejects a locality without the (empty) locality field and
                # drops one without a weight; Envoy ignores locality weights unless
                # locality-weighted balancing is on.
                locality=base_pb2.Locality(),
                load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
            )
            locality.MergeFromString(b"".join(parts))
        self._encoded = encoded
        return cla


def build_load_assignment(workload: WeightedWorkload) -> endpoint_pb2.ClusterLoadAssignment:
    """The workload's endpoints with their weights (always >= 1) and health, sorted by
    address (:class:`LoadAssignmentBuilder`, built once)."""
    return LoadAssignmentBuilder().build(workload)


def _http_connection_manager(stat_prefix: str, route_name: str) -> hcm_pb2.HttpConnectionManager:
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads_config_source(), route_config_name=route_name),
        http_filters=[
            hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=pack(router_pb2.Router()))
        ],
    )


def build_listener(gateway: GatewayConfig, spec: ListenSpec | None = None) -> listener_pb2.Listener:
    """A gateway listener (``spec``, by default the gateway's default one): one HTTP connection
    manager taking the shared routes over RDS (ADS)."""
    spec = spec if spec is not None else gateway.default
    hcm = _http_connection_manager(gateway.stat_prefix, gateway.route_name)
    return listener_pb2.Listener(
        name=spec.listener_name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=spec.address, port_value=spec.port)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[listener_components_pb2.Filter(name=HCM_FILTER, typed_config=pack(hcm))]
            )
        ],
    )


def build_api_listener(name: str, route_name: str = GRPC_ROUTE_NAME) -> listener_pb2.Listener:
    """An API listener for gRPC's proxyless xDS client (target ``xds:///<name>``)."""
    hcm = _http_connection_manager(name, route_name)
    return listener_pb2.Listener(
        name=name, api_listener=api_listener_pb2.ApiListener(api_listener=pack(hcm))
    )


def grpc_listener_names(workload: WeightedWorkload) -> tuple[str, str]:
    """The ``xds:///`` targets a gRPC client can use for a workload: without and with port."""
    base = f"{workload.key.name}.{workload.key.namespace}"
    return base, f"{base}:{workload.port}"


def host_domains(key: WorkloadKey, cluster_domain: str = "cluster.local") -> list[str]:
    """Every name a client may send in ``Host`` for a workload (the port is not matched: see
    :func:`build_route_configuration`)."""
    return [
        f"{key.name}.{key.namespace}",
        f"{key.name}.{key.namespace}.svc",
        f"{key.name}.{key.namespace}.svc.{cluster_domain}",
    ]


def _virtual_host(key: WorkloadKey, domains: Sequence[str]) -> route_components_pb2.VirtualHost:
    return route_components_pb2.VirtualHost(
        name=key.cluster_name,
        domains=list(domains),
        routes=[
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix="/"),
                route=route_components_pb2.RouteAction(cluster=key.cluster_name),
            )
        ],
    )


def build_route_configuration(
    gateway: GatewayConfig, workloads: Iterable[WeightedWorkload]
) -> route_pb2.RouteConfiguration:
    """Routes ``Host: <name>.<namespace>[.svc[.<cluster domain>]][:port]`` to the workload.

    Any port: the configuration is shared by gateways on different ports, and a client behind
    a Service or load balancer sends the port it dialled, which need not be the listener's.
    ``ignore_port_in_host_matching`` matches the name only and leaves the Host header as the
    client sent it.
    """
    return route_pb2.RouteConfiguration(
        name=gateway.route_name,
        ignore_port_in_host_matching=True,
        virtual_hosts=[
            _virtual_host(w.key, host_domains(w.key, gateway.cluster_domain))
            for w in sorted(workloads, key=lambda w: w.key)
        ],
    )


def build_grpc_route_configuration(
    workloads: Iterable[WeightedWorkload], name: str = GRPC_ROUTE_NAME
) -> route_pb2.RouteConfiguration:
    """Routes for gRPC proxyless clients: the authority is the ``xds:///`` target."""
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            _virtual_host(w.key, grpc_listener_names(w))
            for w in sorted(workloads, key=lambda w: w.key)
        ],
    )


def resource_name(type_url: str, message: Message) -> str:
    """The xDS name of a resource (the CLA is named by its ``cluster_name``)."""
    if type_url == ENDPOINT_TYPE:
        assert isinstance(message, endpoint_pb2.ClusterLoadAssignment)
        return str(message.cluster_name)
    name = getattr(message, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"{type(message).__name__} has no name field")
    return name


def _hcm_route_names(hcm_any: any_pb2.Any) -> set[str]:
    if hcm_any.type_url != HCM_TYPE:
        return set()
    hcm = hcm_pb2.HttpConnectionManager()
    hcm_any.Unpack(hcm)
    return {hcm.rds.route_config_name} if hcm.HasField("rds") else set()


def references(type_url: str, message: Message) -> frozenset[str]:
    """Names of the resources this one depends on.

    Cluster → the EDS name it subscribes to; RouteConfiguration → the clusters its routes
    use; Listener → the RDS route configurations of its HTTP connection managers;
    ClusterLoadAssignment → nothing.
    """
    refs: set[str] = set()
    if type_url == CLUSTER_TYPE:
        assert isinstance(message, cluster_pb2.Cluster)
        if message.type == cluster_pb2.Cluster.EDS:
            refs.add(message.eds_cluster_config.service_name or message.name)
    elif type_url == ROUTE_TYPE:
        assert isinstance(message, route_pb2.RouteConfiguration)
        for vhost in message.virtual_hosts:
            for route in vhost.routes:
                if not route.HasField("route"):
                    continue
                if route.route.cluster:
                    refs.add(route.route.cluster)
                refs.update(c.name for c in route.route.weighted_clusters.clusters)
    elif type_url == LISTENER_TYPE:
        assert isinstance(message, listener_pb2.Listener)
        chains = list(message.filter_chains)
        if message.HasField("default_filter_chain"):
            chains.append(message.default_filter_chain)
        for chain in chains:
            for network_filter in chain.filters:
                refs |= _hcm_route_names(network_filter.typed_config)
        if message.HasField("api_listener"):
            refs |= _hcm_route_names(message.api_listener.api_listener)
    return frozenset(refs)

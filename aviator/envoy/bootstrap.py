"""Envoy bootstraps for Aviator's two data-plane shapes (pure: no I/O, no clock).

*Gateway*: the bootstrap holds only the admin endpoint and the ``aviator-xds`` cluster that
reaches the control plane; listeners, routes, clusters and endpoints all arrive over ADS
(LDS → RDS, CDS → EDS). The node metadata says where the gateway's listener should bind
(``aviator.io/listen-port``, ``aviator.io/listen-address``); what it leaves out the control
plane fills in (``aviator run --gateway-port``, default 10000, and ``--gateway-address``,
default 0.0.0.0: every interface).

*Sidecar*: clusters and endpoints arrive over ADS (CDS → EDS); the listener and its routes are
static, because a sidecar's job (send this pod's outbound calls to the right workload) does not
change with the control plane's view. The static route configuration

- has one virtual host per ``workloads`` entry, matching ``<name>.<namespace>``,
  ``<name>.<namespace>.svc`` and ``<name>.<namespace>.svc.<cluster domain>`` (any port:
  ``ignore_port_in_host_matching``), routed to the cluster ``<namespace>/<name>``;
- routes any other request that carries ``x-aviator-cluster: <namespace>/<name>`` to that
  cluster (``cluster_header``), so workloads not listed at bootstrap time are reachable too; the
  header must have the ``namespace/name`` shape, so it can never select ``aviator-xds``, and it
  is removed before the request goes upstream;
- answers 404 otherwise.

It sets ``validate_clusters: false`` because its clusters arrive later over CDS; without it
Envoy refuses to start (see XDS-CHECKLIST.md).

Every ConfigSource says ``resource_api_version: V3`` and the ADS config says
``transport_api_version: V3``: left out, Envoy falls back to a deprecated value and warns.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from aviator.model import WorkloadKey

Mode = Literal["gateway", "sidecar"]

XDS_CLUSTER = "aviator-xds"
"""Name of the static cluster that reaches the control plane's ADS port."""

SIDECAR_LISTENER = "aviator-sidecar"
SIDECAR_ROUTE_CONFIG = "aviator-sidecar"
CLUSTER_HEADER = "x-aviator-cluster"
"""Request header naming the ``namespace/name`` cluster a sidecar should send a request to."""

# Kubernetes names: a namespace is a DNS-1123 label, a Deployment/StatefulSet name a DNS-1123
# subdomain. Requiring the slash keeps the header from naming the static aviator-xds cluster.
_CLUSTER_HEADER_REGEX = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"

# Read by the control plane (``aviator.xds.resources``, which holds the same keys: a test
# checks they agree).
META_MODE = "aviator.io/mode"
META_LISTEN_PORT = "aviator.io/listen-port"
META_LISTEN_ADDRESS = "aviator.io/listen-address"

SIDECAR_PORT = 10000
SIDECAR_ADDRESS = "127.0.0.1"  # a sidecar serves its own pod

_HCM_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_DOWNSTREAM_CONNECTIONS_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
)


def _check_port(what: str, port: int, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{what} must be in {low}..65535, got {port}")


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def workload_domains(key: WorkloadKey, cluster_domain: str = "cluster.local") -> list[str]:
    """The Host names that reach ``key`` inside a Kubernetes cluster (ports are ignored)."""
    base = f"{key.name}.{key.namespace}"
    return [base, f"{base}.svc", f"{base}.svc.{cluster_domain}"]


def duration(seconds: float) -> str:
    """A protobuf Duration in its JSON form ("0.25s", "15s"): nanosecond precision, no exponent."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def _ads_source(initial_fetch_timeout: float | None) -> dict[str, Any]:
    # A fresh dict each time: YAML would print a shared one as an anchor and an alias.
    source: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
    if initial_fetch_timeout is not None:
        source["initial_fetch_timeout"] = duration(initial_fetch_timeout)
    return source


@dataclass(frozen=True, slots=True)
class XdsTls:
    """How Envoy reaches the control plane over TLS: the CA that signed the server's
    certificate, and for mutual TLS the proxy's own certificate and key (files Envoy reads;
    paths as Envoy sees them). ``server_name`` is sent as SNI and, when given, must be a
    subject alternative name of the server's certificate (DNS name or IP); without it the
    chain alone is checked."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if not self.ca_file:
            raise ValueError("the xDS TLS CA file must not be empty")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")

    def transport_socket(self) -> dict[str, Any]:
        validation: dict[str, Any] = {"trusted_ca": {"filename": self.ca_file}}
        if self.server_name:
            kind = "IP_ADDRESS" if _is_ip(self.server_name) else "DNS"
            validation["match_typed_subject_alt_names"] = [
                {"san_type": kind, "matcher": {"exact": self.server_name}}
            ]
        common: dict[str, Any] = {
            "alpn_protocols": ["h2"],  # gRPC: HTTP/2 over TLS
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
            "validation_context": validation,
        }
        if self.cert_file is not None and self.key_file is not None:
            common["tls_certificates"] = [
                {
                    "certificate_chain": {"filename": self.cert_file},
                    "private_key": {"filename": self.key_file},
                }
            ]
        context: dict[str, Any] = {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "UpstreamTlsContext",
            "common_tls_context": common,
        }
        if self.server_name:
            context["sni"] = self.server_name
        return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def _xds_cluster(host: str, port: int, tls: XdsTls | None = None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": XDS_CLUSTER,
        # An IP needs no resolver; a name (a Kubernetes Service) is re-resolved so a moved
        # control plane is found again.
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}]}
            ],
        },
        # gRPC needs HTTP/2 upstream. Keepalive pings notice a control plane that vanished
        # without closing the connection, so Envoy reconnects instead of waiting forever.
        "typed_extension_protocol_options": {
            _HTTP_PROTOCOL_OPTIONS: {
                "@type": f"type.googleapis.com/{_HTTP_PROTOCOL_OPTIONS}",
                "explicit_http_config": {
                    "http2_protocol_options": {
                        "connection_keepalive": {"interval": "30s", "timeout": "5s"},
                    },
                },
            },
        },
    }
    if tls is not None:
        cluster["transport_socket"] = tls.transport_socket()
    return cluster


def _sidecar_listener(
    address: str, port: int, workloads: Sequence[WorkloadKey], cluster_domain: str
) -> dict[str, Any]:
    virtual_hosts: list[dict[str, Any]] = [
        {
            "name": key.cluster_name,
            "domains": workload_domains(key, cluster_domain),
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": key.cluster_name}}],
        }
        for key in workloads
    ]
    virtual_hosts.append(
        {
            "name": "by-header",
            "domains": ["*"],
            "routes": [
                {
                    "match": {
                        "prefix": "/",
                        "headers": [
                            {
                                "name": CLUSTER_HEADER,
                                "string_match": {"safe_regex": {"regex": _CLUSTER_HEADER_REGEX}},
                            }
                        ],
                    },
                    "route": {"cluster_header": CLUSTER_HEADER},
                    "request_headers_to_remove": [CLUSTER_HEADER],
                },
                {
                    "match": {"prefix": "/"},
                    "direct_response": {
                        "status": 404,
                        "body": {
                            "inline_string": (
                                "aviator sidecar: no route: use Host <name>.<namespace> of a "
                                f"listed workload or the header {CLUSTER_HEADER}: "
                                "<namespace>/<name>\n"
                            )
                        },
                    },
                },
            ],
        }
    )
    hcm = {
        "@type": _HCM_TYPE,
        "stat_prefix": "aviator_sidecar",
        "codec_type": "AUTO",
        "route_config": {
            "name": SIDECAR_ROUTE_CONFIG,
            # The clusters arrive over CDS after the listener exists.
            "validate_clusters": False,
            # Clients send "Host: app.ns:8080"; match on the name only, but keep the port in
            # the header the upstream sees (strip_any_host_port would remove it).
            "ignore_port_in_host_matching": True,
            "virtual_hosts": virtual_hosts,
        },
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER_TYPE}}
        ],
    }
    return {
        "name": SIDECAR_LISTENER,
        "address": _socket_address(address, port),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def render_bootstrap(
    *,
    xds_host: str,
    xds_port: int,
    node_id: str,
    mode: Mode = "gateway",
    listen_port: int | None = None,
    listen_address: str | None = None,
    admin_port: int = 9901,
    admin_address: str = "127.0.0.1",
    cluster: str = "aviator",
    workloads: Sequence[WorkloadKey] = (),
    cluster_domain: str = "cluster.local",
    delta: bool = False,
    max_downstream_connections: int = 50_000,
    initial_fetch_timeout: float | None = None,
    xds_tls: XdsTls | None = None,
) -> dict[str, Any]:
    """Build an Envoy v3 bootstrap as plain data (JSON/YAML-ready).

    ``node_id`` and ``cluster`` become ``node.id`` / ``node.cluster``; the node metadata carries
    ``aviator.io/mode``. For a gateway, ``listen_port`` and ``listen_address`` go into the
    metadata (``aviator.io/listen-port``, ``aviator.io/listen-address``): where the listener the
    control plane sends over LDS binds; left None, the control plane's defaults apply
    (``--gateway-port``, ``--gateway-address``: 10000 on 0.0.0.0 unless told). For a sidecar
    they place its static listener (default 127.0.0.1:10000). ``admin_port`` 0 lets
    Envoy pick a port (read it back with ``--admin-address-path``). ``workloads`` is for sidecars
    only. ``delta`` selects incremental ADS (``DELTA_GRPC``) instead of state-of-the-world.
    ``max_downstream_connections`` caps accepted connections across all listeners (Envoy's
    overload manager; without a cap Envoy warns at start that there is none).
    ``initial_fetch_timeout`` (seconds) bounds how long Envoy waits for the first CDS/LDS answer
    before it starts serving with what it has; None keeps Envoy's default (15 s), 0 waits
    forever. ``xds_tls``: reach the control plane over TLS (mutual TLS with a client
    certificate), matching ``aviator run --xds-tls-*``.

    The ADS stream sends the node on its first message only (``set_node_on_first_message_only``):
    the server must remember it per stream.

    Raises ``ValueError`` with the offending value for a bad port, empty id, unknown mode,
    workloads in gateway mode, or the same workload twice.
    """
    if mode not in ("gateway", "sidecar"):
        raise ValueError(f"mode must be 'gateway' or 'sidecar', got {mode!r}")
    if not xds_host:
        raise ValueError("xds_host must not be empty")
    if not node_id:
        raise ValueError("node_id must not be empty")
    if not cluster:
        raise ValueError("cluster must not be empty")
    _check_port("xds_port", xds_port)
    if listen_port is not None:
        _check_port("listen_port", listen_port)
    if listen_address is not None:
        if not _is_ip(listen_address):  # Envoy binds listeners to IP addresses only
            raise ValueError(
                f"listen_address must be an IP address such as 0.0.0.0, 127.0.0.1 or ::, "
                f"got {listen_address!r}"
            )
        listen_address = ipaddress.ip_address(listen_address).compressed
    _check_port("admin_port", admin_port, allow_zero=True)
    if initial_fetch_timeout is not None and not 0 <= initial_fetch_timeout < 315_576_000_000:
        raise ValueError(f"initial_fetch_timeout must be >= 0, got {initial_fetch_timeout}")
    if max_downstream_connections < 1:
        raise ValueError(
            f"max_downstream_connections must be >= 1, got {max_downstream_connections}"
        )
    if mode == "gateway" and workloads:
        raise ValueError("workloads are for sidecar mode; a gateway gets its routes over ADS")
    if len(set(workloads)) != len(workloads):
        raise ValueError(f"a workload is listed twice: {[str(w) for w in workloads]}")

    dynamic: dict[str, Any] = {
        "ads_config": {
            "api_type": "DELTA_GRPC" if delta else "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
            "set_node_on_first_message_only": True,
        },
        "cds_config": _ads_source(initial_fetch_timeout),
    }
    metadata: dict[str, Any] = {META_MODE: mode}
    static: dict[str, Any] = {"clusters": [_xds_cluster(xds_host, xds_port, xds_tls)]}
    if mode == "gateway":
        dynamic["lds_config"] = _ads_source(initial_fetch_timeout)
        if listen_port is not None:
            metadata[META_LISTEN_PORT] = listen_port
        if listen_address is not None:
            metadata[META_LISTEN_ADDRESS] = listen_address
    else:
        static["listeners"] = [
            _sidecar_listener(
                listen_address if listen_address is not None else SIDECAR_ADDRESS,
                listen_port if listen_port is not None else SIDECAR_PORT,
                workloads,
                cluster_domain,
            )
        ]
    return {
        "node": {"id": node_id, "cluster": cluster, "metadata": metadata},
        "admin": {"address": _socket_address(admin_address, admin_port)},
        "dynamic_resources": dynamic,
        "static_resources": static,
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _DOWNSTREAM_CONNECTIONS_TYPE,
                        "max_active_downstream_connections": max_downstream_connections,
                    },
                }
            ]
        },
    }


class _EnvoyYamlDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting ``y``/``n`` (any case) as well.

    PyYAML writes those strings bare, but Envoy's YAML parser reads bare ``y``/``n`` as
    booleans: a node id ``n`` became ``"id": false`` and Envoy refused the bootstrap.
    """


_EnvoyYamlDumper.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN")
)


def bootstrap_yaml(bootstrap: Mapping[str, Any]) -> str:
    """YAML text of a bootstrap, keys in the order they were built (readable, diffable).

    Every string stays a string for Envoy's parser too (see :class:`_EnvoyYamlDumper`).
    """
    return yaml.dump(
        dict(bootstrap), Dumper=_EnvoyYamlDumper, sort_keys=False, default_flow_style=False
    )

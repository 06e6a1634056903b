"""The balancing policies the latency benchmark compares, as data, and their sidecar bootstraps.

Pure: no I/O, no clock. Every policy runs on the *same* sidecar data plane: the listener and
routes are exactly those of :func:`aviator.envoy.bootstrap.render_bootstrap` in sidecar mode
(Host ``bench.bench`` → cluster ``bench/bench``). The Envoy-native policies replace the ADS
part of that bootstrap with one static cluster that mirrors the cluster Aviator's control plane
serves (connect timeout, outlier detection, Envoy's default circuit breakers and route
timeout), so that the only difference between two policies is how the endpoint is chosen.

- ``rr``: round robin (the floor).
- ``lr``: least request, power of two choices on the proxy's own in-flight counts (Envoy
  Gateway's default).
- ``cswrr``: client-side weighted round robin fed by the backends' ORCA
  ``endpoint-load-metrics`` response header (weight = qps / utilisation, utilisation =
  ``application_utilization`` = RIF / capacity). Envoy's defaults (10 s blackout, 1 s update)
  are lowered for a fair fight in runs of tens of seconds.
- ``aviator``: the cluster and its weighted endpoints come from ``aviator run`` over ADS.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from aviator.envoy.bootstrap import XDS_CLUSTER, duration, render_bootstrap
from aviator.model import EndpointAddress, WorkloadKey

__all__ = [
    "CSWRR_BLACKOUT_S",
    "CSWRR_UPDATE_S",
    "POLICIES",
    "WORKLOAD",
    "Policy",
    "PolicySource",
    "parse_policies",
    "sidecar_bootstrap",
    "static_cluster",
    "workload_host",
]

WORKLOAD: Final = WorkloadKey("bench", "bench")
"""The one workload every policy balances: cluster ``bench/bench``, Host ``bench.bench``."""

# CSWRR: Envoy's defaults are a 10 s blackout and a 1 s weight update, which would leave a
# 20-30 s run mostly unweighted. 1 s / 0.25 s gives it fresh weights within the warm-up, close
# to what Aviator's probing gets (the minimum update period Envoy accepts is 100 ms).
CSWRR_BLACKOUT_S: Final = 1.0
CSWRR_UPDATE_S: Final = 0.25
# Stop using a host's weight if it has not reported for this long (Envoy's default is 3 min):
# a host that CSWRR starved of traffic gets the mean weight again and is re-measured.
CSWRR_EXPIRATION_S: Final = 10.0

# Mirrors aviator.xds.resources.build_cluster (kept as literal data here so the benchmark's
# static clusters do not depend on protobuf builders; a unit test checks they agree).
CONNECT_TIMEOUT_S: Final = 1
OUTLIER_DETECTION: Final[Mapping[str, Any]] = {
    "consecutive_5xx": 5,
    "interval": "5s",
    "base_ejection_time": "15s",
    "max_ejection_time": "120s",
    "max_ejection_percent": 50,
    "enforcing_success_rate": 0,
}

_LB = "type.googleapis.com/envoy.extensions.load_balancing_policies"


class PolicySource(enum.StrEnum):
    """Where a policy's cluster comes from."""

    STATIC = "static"  # a static cluster in the sidecar's bootstrap
    CONTROL_PLANE = "control_plane"  # CDS/EDS over ADS from `aviator run`


@dataclass(frozen=True, slots=True)
class Policy:
    """One contender. ``lb_policy`` is the ``typed_extension_config`` of the cluster's
    ``load_balancing_policy`` (static policies only).

    Invariant: a static policy has an ``lb_policy``; a control-plane policy has none.
    """

    name: str
    label: str
    source: PolicySource
    lb_policy: Mapping[str, Any] | None = field(default=None, compare=False)
    description: str = ""

    def __post_init__(self) -> None:
        if (self.source is PolicySource.STATIC) != (self.lb_policy is not None):
            raise ValueError(
                f"policy {self.name}: a static policy needs an lb_policy, "
                "a control-plane policy must not have one"
            )

    @property
    def needs_control_plane(self) -> bool:
        return self.source is PolicySource.CONTROL_PLANE


POLICIES: Final[Mapping[str, Policy]] = {
    p.name: p
    for p in (
        Policy(
            "rr",
            "round robin",
            PolicySource.STATIC,
            {
                "name": "envoy.load_balancing_policies.round_robin",
                "typed_config": {"@type": f"{_LB}.round_robin.v3.RoundRobin"},
            },
            "Envoy round robin",
        ),
        Policy(
            "lr",
            "least request",
            PolicySource.STATIC,
            {
                "name": "envoy.load_balancing_policies.least_request",
                # Defaults: choice_count 2, active_request_bias 1.0 (Envoy Gateway's default).
                "typed_config": {"@type": f"{_LB}.least_request.v3.LeastRequest"},
            },
            "Envoy least request (P2C on the proxy's own in-flight counts)",
        ),
        Policy(
            "cswrr",
            "client-side WRR (ORCA)",
            PolicySource.STATIC,
            {
                "name": "envoy.load_balancing_policies.client_side_weighted_round_robin",
                "typed_config": {
                    "@type": (
                        f"{_LB}.client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin"
                    ),
                    "blackout_period": duration(CSWRR_BLACKOUT_S),
                    "weight_update_period": duration(CSWRR_UPDATE_S),
                    "weight_expiration_period": duration(CSWRR_EXPIRATION_S),
                },
            },
            "Envoy client-side weighted round robin, weights from the ORCA response header",
        ),
        Policy(
            "aviator",
            "Aviator",
            PolicySource.CONTROL_PLANE,
            None,
            "least request with Aviator's EDS weights (aviator run over ADS)",
        ),
    )
}


def parse_policies(text: str) -> tuple[Policy, ...]:
    """``"rr,lr,cswrr,aviator"`` → policies in that order. Raises ValueError naming the
    unknown or repeated entries and the known ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("no policy given; known: " + ", ".join(POLICIES))
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {', '.join(unknown)}; known: {', '.join(POLICIES)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"policy listed twice: {', '.join(repeated)}")
    return tuple(POLICIES[n] for n in names)


def workload_host() -> str:
    """The Host header that routes a request to the benchmark's workload on a sidecar."""
    return f"{WORKLOAD.name}.{WORKLOAD.namespace}"


def static_cluster(policy: Policy, endpoints: Sequence[EndpointAddress]) -> dict[str, Any]:
    """The static cluster of a native policy: the workload's endpoints, equal weights."""
    if policy.lb_policy is None:
        raise ValueError(f"policy {policy.name} gets its cluster from the control plane")
    if not endpoints:
        raise ValueError("a cluster needs at least one endpoint")
    return {
        "name": WORKLOAD.cluster_name,
        "type": "STATIC",
        "connect_timeout": f"{CONNECT_TIMEOUT_S}s",
        "load_balancing_policy": {"policies": [{"typed_extension_config": dict(policy.lb_policy)}]},
        "outlier_detection": dict(OUTLIER_DETECTION),
        "load_assignment": {
            "cluster_name": WORKLOAD.cluster_name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": e.ip, "port_value": e.port}
                                }
                            }
                        }
                        for e in endpoints
                    ]
                }
            ],
        },
    }


def sidecar_bootstrap(
    policy: Policy,
    *,
    node_id: str,
    listen_port: int,
    endpoints: Sequence[EndpointAddress] = (),
    xds: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """The bootstrap of one benchmark sidecar (admin port 0: Envoy picks one).

    Control-plane policy: ``render_bootstrap(mode="sidecar")`` against ``xds`` (host, port).
    Static policy: the same bootstrap with its ADS part replaced by :func:`static_cluster`
    over ``endpoints``. Raises ValueError when the needed argument is missing.
    """
    if policy.needs_control_plane:
        if xds is None:
            raise ValueError(f"policy {policy.name} needs the control plane's xDS address")
        return render_bootstrap(
            xds_host=xds[0],
            xds_port=xds[1],
            node_id=node_id,
            mode="sidecar",
            listen_port=listen_port,
            admin_port=0,
            cluster="bench",
            workloads=[WORKLOAD],
        )
    # The xDS address is irrelevant (the ADS part is removed below); any valid one will do.
    bootstrap = render_bootstrap(
        xds_host="127.0.0.1",
        xds_port=1,
        node_id=node_id,
        mode="sidecar",
        listen_port=listen_port,
        admin_port=0,
        cluster="bench",
        workloads=[WORKLOAD],
    )
    del bootstrap["dynamic_resources"]
    static = bootstrap["static_resources"]
    static["clusters"] = [c for c in static["clusters"] if c["name"] != XDS_CLUSTER] + [
        static_cluster(policy, endpoints)
    ]
    return bootstrap

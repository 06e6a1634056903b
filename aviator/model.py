"""Value types shared by every layer: what a workload is, what its endpoints weigh.

These are frozen values with validation at construction; they import nothing from gRPC,
Kubernetes or HTTP libraries.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass


class Health(enum.StrEnum):
    """Endpoint health as Aviator publishes it in EDS."""

    HEALTHY = "HEALTHY"
    DEGRADED = "DEGRADED"  # hot: Envoy uses it only when not enough healthy hosts remain
    UNHEALTHY = "UNHEALTHY"


MAX_WEIGHT = 1000  # upper bound of every weight Aviator publishes (Envoy allows up to 2^32-1)


@dataclass(frozen=True, slots=True, order=True)
class WorkloadKey:
    """A Deployment or StatefulSet targeted by a policy, named as Kubernetes names it."""

    namespace: str
    name: str

    def __post_init__(self) -> None:
        if not self.namespace or not self.name:
            raise ValueError(f"workload key needs a namespace and a name, got {self!r}")

    @property
    def cluster_name(self) -> str:
        """The Envoy cluster (and EDS resource) name of this workload."""
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return self.cluster_name


@dataclass(frozen=True, slots=True, order=True)
class EndpointAddress:
    """One pod's address for traffic: IP and port."""

    ip: str
    port: int

    def __post_init__(self) -> None:
        ipaddress.ip_address(self.ip)  # raises ValueError with the bad text
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class WeightedEndpoint:
    """An endpoint with the weight and health Aviator wants Envoy to use."""

    address: EndpointAddress
    weight: int = 1
    health: Health = Health.HEALTHY

    def __post_init__(self) -> None:
        # Envoy rejects load_balancing_weight 0: every published weight is in 1..MAX_WEIGHT.
        if not 1 <= self.weight <= MAX_WEIGHT:
            raise ValueError(f"weight must be in 1..{MAX_WEIGHT}, got {self.weight}")


@dataclass(frozen=True, slots=True)
class WeightedWorkload:
    """A workload's endpoints as one Envoy cluster should hold them."""

    key: WorkloadKey
    port: int
    endpoints: tuple[WeightedEndpoint, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        seen = {e.address for e in self.endpoints}
        if len(seen) != len(self.endpoints):
            raise ValueError(f"{self.key}: duplicate endpoint addresses")


def parse_host_port(text: str, *, any_port: bool = False) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 as ``[ADDR]:PORT``) into a host and a port in 1..65535
    (0..65535 with ``any_port``: a listen address where 0 lets the OS pick).

    Raises ``ValueError`` naming the text when it has no port, a bad port or an empty host.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"expected [IPv6]:PORT, got {text!r}") from None
    elif ":" in host:
        raise ValueError(f"an IPv6 address needs brackets, as in [::1]:18000, got {text!r}")
    port = int(port_text)
    lowest = 0 if any_port else 1
    if not lowest <= port < 65536:
        raise ValueError(f"port must be in {lowest}..65535, got {text!r}")
    return host, port

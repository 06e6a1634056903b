"""Value types shared by every layer: what a workload is, what its endpoints weigh, and the
weigher's per-policy tuning (:class:`WeigherKnobs`, carried by the policy model).

These are frozen values with validation at construction; they import nothing from gRPC,
Kubernetes or HTTP libraries.
"""

from __future__ import annotations

import enum
import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar


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
        # IPv6 in brackets ([::1]:8080), as URLs, Envoy's admin and parse_host_port write it.
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}"


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


# Prequal's Q_RIF: 2^-0.25 ≈ 0.84 (NSDI 2024, §4; 0.6 to 0.9 all work).
DEFAULT_HOT_QUANTILE = 2.0**-0.25


class KnobError(ValueError):
    """A ``spec.weigher`` field has a bad value; ``field`` is its camelCase name."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        where = f"spec.weigher.{field}" if field else "spec.weigher"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class WeigherKnobs:
    """Per-policy tuning of the weigher. Every field has a safe default.

    Invariants (checked at construction, :class:`KnobError` otherwise):
    ``0 < hot_quantile <= 1``; ``1 <= max_weight_ratio <= MAX_WEIGHT``; ``0 <= min_change < 1``;
    ``0 <= hysteresis < 1``; ``0 < smoothing <= 1``; ``0 <= latency_exponent <= 4``;
    ``min_hot_rif >= 0``; ``1 <= stand_out <= 100``; every float is finite.
    """

    #: An endpoint is hot when its RIF is above this quantile of the policy's fleet RIFs.
    hot_quantile: float = DEFAULT_HOT_QUANTILE
    #: Largest published weight divided by smallest is at most this (anti-herding bound).
    max_weight_ratio: float = 20.0
    #: A new set of weights is pushed only if some endpoint's share of traffic moves by more
    #: than this fraction of its current share (or health/membership changes).
    min_change: float = 0.15
    #: Hot endpoints are published DEGRADED (Envoy uses them only when healthy ones run short)
    #: instead of HEALTHY at the weight floor. Off by default: the floor is the gentler signal.
    degrade_hot: bool = False
    #: A hot endpoint turns cold only once its RIF and latency fall this fraction below the
    #: thresholds that made it hot, so probe noise does not flap its state.
    hysteresis: float = 0.1
    #: Each push moves a cold endpoint's weight this fraction of the way from its published
    #: weight to its target (1 = no smoothing). Hot endpoints drop to the floor at once.
    smoothing: float = 0.5
    #: Cold weights are proportional to latency ** -latency_exponent (1 = inverse latency).
    latency_exponent: float = 1.0
    #: An endpoint with RIF at or below this is never hot by RIF: at a RIF of 0 or 1 the
    #: fleet quantile is noise, not load.
    min_hot_rif: float = 1.0
    #: How far an endpoint must stand out from the fleet's median to be told apart from it:
    #: hot by RIF only above stand_out * (median RIF + 1) - 1, hot by latency only above
    #: stand_out * the median latency (and latencyThreshold), and a cold endpoint's weight
    #: falls with latency only beyond stand_out * the cold median. Within it the endpoints
    #: are the same to the weigher: equal weights, and Envoy's least request balances them.
    stand_out: float = 1.5

    # camelCase name in spec.weigher → attribute name.
    SPEC_FIELDS: ClassVar[Mapping[str, str]] = {
        "hotQuantile": "hot_quantile",
        "maxWeightRatio": "max_weight_ratio",
        "minChange": "min_change",
        "degradeHot": "degrade_hot",
        "hysteresis": "hysteresis",
        "smoothing": "smoothing",
        "latencyExponent": "latency_exponent",
        "minHotRif": "min_hot_rif",
        "standOut": "stand_out",
    }

    def __post_init__(self) -> None:
        self._check("hotQuantile", self.hot_quantile, 0.0, 1.0, low_open=True)
        self._check("maxWeightRatio", self.max_weight_ratio, 1.0, float(MAX_WEIGHT))
        self._check("minChange", self.min_change, 0.0, 1.0, high_open=True)
        self._check("hysteresis", self.hysteresis, 0.0, 1.0, high_open=True)
        self._check("smoothing", self.smoothing, 0.0, 1.0, low_open=True)
        self._check("latencyExponent", self.latency_exponent, 0.0, 4.0)
        self._check("minHotRif", self.min_hot_rif, 0.0, math.inf)
        self._check("standOut", self.stand_out, 1.0, 100.0)
        if not isinstance(self.degrade_hot, bool):
            raise KnobError("degradeHot", f"must be a boolean, got {self.degrade_hot!r}")

    @staticmethod
    def _check(
        name: str,
        value: object,
        low: float,
        high: float,
        *,
        low_open: bool = False,
        high_open: bool = False,
    ) -> None:
        lo = "(" if low_open else "["
        hi = ")" if high_open or math.isinf(high) else "]"
        allowed = f"a finite number in {lo}{low:g}, {high:g}{hi}"
        # bool is an int subclass: reject it explicitly, `true` is not a ratio.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise KnobError(name, f"must be {allowed}, got {value!r}")
        v = float(value)
        if not math.isfinite(v):
            raise KnobError(name, f"must be {allowed}, got {value!r}")
        if v < low or (low_open and v == low) or v > high or (high_open and v == high):
            raise KnobError(name, f"must be {allowed}, got {value!r}")

    @classmethod
    def from_spec(cls, spec: Mapping[str, object] | None) -> WeigherKnobs:
        """Parse the *contents* of a policy's ``spec.weigher`` (camelCase keys).

        ``None`` or ``{}`` gives the defaults. Unknown keys and bad values raise
        :class:`KnobError` naming the field and what is allowed. Integers are accepted
        where numbers are expected; strings are not (no silent coercion).
        """
        if spec is None:
            return cls()
        if not isinstance(spec, Mapping):
            raise KnobError("", f"must be a mapping, got {type(spec).__name__}")
        kwargs: dict[str, Any] = {}
        for key, value in spec.items():
            attr = cls.SPEC_FIELDS.get(key) if isinstance(key, str) else None
            if attr is None:
                allowed = ", ".join(sorted(cls.SPEC_FIELDS))
                raise KnobError(str(key), f"unknown field; allowed fields: {allowed}")
            if attr != "degrade_hot" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            kwargs[attr] = value
        return cls(**kwargs)

    def to_spec(self) -> dict[str, object]:
        """The camelCase form ``from_spec`` accepts (round-trips exactly)."""
        by_attr = {attr: key for key, attr in self.SPEC_FIELDS.items()}
        return {by_attr[f.name]: getattr(self, f.name) for f in fields(self)}

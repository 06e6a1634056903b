"""Prometheus metrics of the ADS server.

Every metric lives in the registry given to :class:`XdsMetrics` (by default a fresh private
one), never in prometheus_client's global registry: two servers in one process (tests) must
not collide. The application passes its own registry and exposes it on ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class XdsMetrics:
    """Counters labelled by ``type`` (cds/eds/lds/rds) and ``kind`` (sotw/delta)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = ("type", "kind")
        self.pushes = Counter(
            "aviator_xds_pushes", "xDS responses sent to proxies", labels, registry=self.registry
        )
        self.resources_sent = Counter(
            "aviator_xds_resources_sent",
            "Resources carried by xDS responses",
            labels,
            registry=self.registry,
        )
        self.acks = Counter(
            "aviator_xds_acks", "xDS responses accepted by proxies", labels, registry=self.registry
        )
        self.nacks = Counter(
            "aviator_xds_nacks", "xDS responses rejected by proxies", labels, registry=self.registry
        )
        self.suppressed = Counter(
            "aviator_xds_nacked_resends_suppressed",
            "Pushes withheld because the proxy already rejected that exact version",
            labels,
            registry=self.registry,
        )
        self.connected = Gauge(
            "aviator_xds_connected_proxies",
            "ADS streams currently open",
            ("kind",),
            registry=self.registry,
        )
        self.refused = Counter(
            "aviator_xds_streams_refused",
            "ADS streams ended by the server: garbage, a limit exceeded, or a proxy that "
            "stopped reading (code: the gRPC status sent)",
            ("kind", "code"),
            registry=self.registry,
        )

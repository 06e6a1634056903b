"""Prometheus metrics of the ADS server.

Every metric lives in the registry given to :class:`XdsMetrics` (by default a fresh private
one), never in prometheus_client's global registry: two servers in one process (tests) must
not collide. The application passes its own registry and exposes it on ``/metrics``.

Labels are bounded: ``type`` (cds/eds/lds/rds), ``kind`` (sotw/delta) and a gRPC status
``code``; never a node id, a resource name or an address (docs/metrics.md lists every metric).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from aviator.xds.resources import TYPE_ORDER, TYPE_SHORT

# From a millisecond (an in-process push) to a minute (a proxy that takes its time to ACK).
XDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class _Versioned(Protocol):
    @property
    def version(self) -> str: ...


class _Source(Protocol):
    """The part of :class:`~aviator.xds.cache.Cache` that :class:`ChangeTimes` reads (no
    import of the cache: it would be a cycle through the stream's metrics)."""

    def watch_all(self, watcher: ChangeTimes, type_url: str) -> None: ...

    def changed_names(self, type_url: str) -> frozenset[str] | None: ...

    def resources(self, type_url: str) -> Mapping[str, _Versioned]: ...


class ChangeTimes:
    """When each resource's current version was published: a wildcard watcher of the cache.

    Bounded by the cache's size (a removed name is forgotten). The time of a name is that of
    the publish that gave it its current version, on the ADS server's clock (the streams'), so
    ``now - published_at(...)`` is how long that change took to reach a proxy.
    """

    def __init__(self, cache: _Source, clock: Callable[[], float]) -> None:
        self._cache = cache
        self._clock = clock
        self._at: dict[str, dict[str, tuple[str, float]]] = {t: {} for t in TYPE_ORDER}
        for type_url in TYPE_ORDER:
            cache.watch_all(self, type_url)

    def resources_changed(self, type_url: str) -> None:
        """Cache callback, once per publish and type that changed something."""
        now = self._clock()
        times = self._at.setdefault(type_url, {})
        current = self._cache.resources(type_url)
        names = self._cache.changed_names(type_url)
        if names is None:  # the first publish: everything is new
            names = frozenset(current) | frozenset(times)
        for name in names:
            entry = current.get(name)
            if entry is None:
                times.pop(name, None)
            elif (known := times.get(name)) is None or known[0] != entry.version:
                times[name] = (entry.version, now)

    def first_change(
        self,
        type_url: str,
        entries: Mapping[str, _Versioned],
        held: Mapping[str, _Versioned],
        since: float,
    ) -> float | None:
        """The earliest publish time, at or after ``since``, of an entry of ``entries`` that
        is not what ``held`` already has: the oldest change a response carries. None when it
        carries no change published since then (a proxy's initial fetch of old state)."""
        times = self._at.get(type_url)
        if not times:
            return None
        first: float | None = None
        for name, entry in entries.items():
            known = times.get(name)
            if known is None or known[0] != entry.version or known[1] < since:
                continue
            if (h := held.get(name)) is not None and h.version == entry.version:
                continue
            if first is None or known[1] < first:
                first = known[1]
        return first


class XdsMetrics:
    """Counters labelled by ``type`` (cds/eds/lds/rds) and ``kind`` (sotw/delta), the
    connected proxies, and the push and convergence histograms (by ``type``).

    ``cache``: follow its publishes (:class:`ChangeTimes`), for the push and convergence
    histograms; without it they stay empty. ``clock`` must be the streams' clock.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        cache: _Source | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.changes = ChangeTimes(cache, clock) if cache is not None else None
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
        self.push_delay = Histogram(
            "aviator_xds_push_delay_seconds",
            "From the publish of a change to the response carrying it being sent on a stream "
            "(the oldest change the response carries)",
            ("type",),
            buckets=XDS_BUCKETS,
            registry=self.registry,
        )
        self.convergence = Histogram(
            "aviator_xds_convergence_seconds",
            "From the publish of a change to the proxy's ACK of the response carrying it "
            "(the oldest change the response carries)",
            ("type",),
            buckets=XDS_BUCKETS,
            registry=self.registry,
        )

    def sent(
        self,
        type_url: str,
        entries: Mapping[str, _Versioned],
        held: Mapping[str, _Versioned],
        *,
        since: float,
        now: float,
    ) -> None:
        """A response carrying ``entries`` was sent to a proxy holding ``held``, on a stream
        opened at ``since``: observe the push delay of the oldest change it carries."""
        self._observe(self.push_delay, type_url, entries, held, since, now)

    def acked(
        self,
        type_url: str,
        entries: Mapping[str, _Versioned],
        held: Mapping[str, _Versioned],
        *,
        since: float,
        now: float,
    ) -> None:
        """The proxy ACKed a response carrying ``entries`` (``held``: what it held before)."""
        self._observe(self.convergence, type_url, entries, held, since, now)

    def _observe(
        self,
        histogram: Histogram,
        type_url: str,
        entries: Mapping[str, _Versioned],
        held: Mapping[str, _Versioned],
        since: float,
        now: float,
    ) -> None:
        if self.changes is None or not entries:
            return
        first = self.changes.first_change(type_url, entries, held, since)
        if first is not None:
            histogram.labels(type=TYPE_SHORT.get(type_url, "other")).observe(max(0.0, now - first))

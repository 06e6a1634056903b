"""Snapshots: a frozen, self-checking set of Envoy resources, serialised once.

A :class:`Snapshot` maps each type URL to its resources by name. Every resource is held as a
:class:`ResourceEntry`: the message, its deterministic bytes packed once into an ``Any``, a
version that is the hash of those bytes, and the names it references. Serialising happens
here, once per snapshot; the cache then reuses the entry object of an unchanged resource, so
one ``Any`` per resource version is shared by every stream.

:meth:`Snapshot.check` verifies references before a snapshot is published (the cache calls
it): a failed check raises :class:`SnapshotError` and the caller keeps the old snapshot.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from aviator.model import WeightedWorkload, WorkloadKey
from aviator.xds import resources as r

_EMPTY: Mapping[str, ResourceEntry] = MappingProxyType({})


class SnapshotError(ValueError):
    """A snapshot is inconsistent; ``problems`` lists every broken reference found."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("inconsistent snapshot: " + "; ".join(self.problems))


def content_version(
    type_url: str, items: Iterable[tuple[str, str]], removed: Iterable[str] = ()
) -> str:
    """A version naming exactly a set of (name, resource version) pairs (and removed names).

    Deterministic across restarts and replicas: the same content always gets the same version,
    and different content a different one (64-bit BLAKE2b), so a restarted server never
    reuses a version for other content (Contour #5482).
    """
    return _version(type_url, (_token(n, v) for n, v in sorted(items)), removed)


def entries_version(
    type_url: str, ordered: Iterable[ResourceEntry], removed: Iterable[str] = ()
) -> str:
    """:func:`content_version` of entries already sorted by name, from their precomputed
    tokens: the same value for one join instead of two encodes per entry (a response of
    1,000 CLAs to each of 1,000 streams hashed a million pairs, ``aviator bench xds``)."""
    return _version(type_url, (e.token for e in ordered), removed)


def _token(name: str, version: str) -> bytes:
    return b"\x00+" + name.encode() + b"\x00" + version.encode()


def _version(type_url: str, tokens: Iterable[bytes], removed: Iterable[str]) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(type_url.encode())
    h.update(b"".join(tokens))
    for name in sorted(removed):
        h.update(b"\x00-" + name.encode())
    return h.hexdigest()


def resource_version(data: bytes) -> str:
    """Per-resource version: the hash of its deterministic serialisation."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True, eq=False)
class ResourceEntry:
    """One resource at one version, serialised once.

    ``any`` and ``delta_resource`` are built once and must never be mutated: they are shared
    by every stream that sends this version.
    """

    type_url: str
    name: str
    version: str
    message: Message
    any: any_pb2.Any
    delta_resource: discovery_pb2.Resource
    refs: frozenset[str]
    token: bytes = field(init=False, repr=False)  # this entry's part of a content version
    # Endpoints given load_balancing_weight 0 (Envoy rejects them), counted once per version
    # rather than at every publish (10,000 endpoints took ~8 ms to check each time).
    zero_weights: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "token", _token(self.name, self.version))
        zero = 0
        if isinstance(self.message, endpoint_pb2.ClusterLoadAssignment):
            zero = sum(
                1
                for locality in self.message.endpoints
                for lb_endpoint in locality.lb_endpoints
                if lb_endpoint.HasField("load_balancing_weight")
                and lb_endpoint.load_balancing_weight.value == 0
            )
        object.__setattr__(self, "zero_weights", zero)

    @classmethod
    def from_message(cls, type_url: str, message: Message) -> ResourceEntry:
        expected = type_url.removeprefix("type.googleapis.com/")
        if message.DESCRIPTOR.full_name != expected:
            raise TypeError(f"{message.DESCRIPTOR.full_name} is not a {expected}")
        name = r.resource_name(type_url, message)
        if not name:
            raise ValueError(f"{expected} without a name")
        data = message.SerializeToString(deterministic=True)
        version = resource_version(data)
        packed = any_pb2.Any(type_url=type_url, value=data)
        return cls(
            type_url=type_url,
            name=name,
            version=version,
            message=message,
            any=packed,
            delta_resource=discovery_pb2.Resource(name=name, version=version, resource=packed),
            refs=r.references(type_url, message),
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every resource Aviator wants the proxies to hold, by type URL then name."""

    resources: Mapping[str, Mapping[str, ResourceEntry]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    @classmethod
    def from_entries(cls, entries: Iterable[ResourceEntry]) -> Snapshot:
        by_type: dict[str, dict[str, ResourceEntry]] = {}
        for entry in entries:
            names = by_type.setdefault(entry.type_url, {})
            if entry.name in names:
                short = r.TYPE_SHORT.get(entry.type_url, entry.type_url)
                raise SnapshotError([f"duplicate {short} resource {entry.name!r}"])
            names[entry.name] = entry
        return cls(MappingProxyType({t: MappingProxyType(n) for t, n in by_type.items()}))

    @classmethod
    def from_messages(
        cls,
        *,
        clusters: Iterable[Message] = (),
        endpoints: Iterable[Message] = (),
        listeners: Iterable[Message] = (),
        routes: Iterable[Message] = (),
    ) -> Snapshot:
        """A snapshot from raw protos (any content: tests use it to publish bad resources)."""
        typed = (
            (r.CLUSTER_TYPE, clusters),
            (r.ENDPOINT_TYPE, endpoints),
            (r.LISTENER_TYPE, listeners),
            (r.ROUTE_TYPE, routes),
        )
        return cls.from_entries(
            ResourceEntry.from_message(type_url, m) for type_url, ms in typed for m in ms
        )

    def of_type(self, type_url: str) -> Mapping[str, ResourceEntry]:
        return self.resources.get(type_url, _EMPTY)

    def type_version(self, type_url: str) -> str:
        """The version of all resources of one type (what a wildcard SotW stream is sent)."""
        return content_version(
            type_url, ((n, e.version) for n, e in self.of_type(type_url).items())
        )

    def problems(self) -> list[str]:
        """Every broken reference; empty when the snapshot is consistent."""
        clusters = self.of_type(r.CLUSTER_TYPE)
        endpoints = self.of_type(r.ENDPOINT_TYPE)
        routes = self.of_type(r.ROUTE_TYPE)
        problems: list[str] = []
        eds_names: set[str] = set()
        for name, cluster in sorted(clusters.items()):
            for eds_name in sorted(cluster.refs):
                eds_names.add(eds_name)
                if eds_name not in endpoints:
                    # Without its CLA the cluster warms until initial_fetch_timeout.
                    problems.append(
                        f"cluster {name!r} uses EDS name {eds_name!r} with no endpoints"
                    )
        for name, cla in sorted(endpoints.items()):
            if name not in eds_names:
                problems.append(f"endpoints {name!r} belong to no EDS cluster")
            problems.extend(
                [f"endpoints {name!r} carry load_balancing_weight 0"] * cla.zero_weights
            )
        for name, route in sorted(routes.items()):
            problems.extend(
                f"route configuration {name!r} routes to unknown cluster {c!r}"
                for c in sorted(route.refs - clusters.keys())
            )
        for name, listener in sorted(self.of_type(r.LISTENER_TYPE).items()):
            problems.extend(
                f"listener {name!r} uses unknown route configuration {rds!r}"
                for rds in sorted(listener.refs - routes.keys())
            )
        return problems

    def check(self) -> None:
        """Raise :class:`SnapshotError` unless every reference resolves inside the snapshot:
        each EDS cluster has its CLA and each CLA its cluster, every route's cluster exists,
        every listener's RDS name exists, and no endpoint weighs 0."""
        problems = self.problems()
        if problems:
            raise SnapshotError(problems)


def build_snapshot(
    workloads: Iterable[WeightedWorkload],
    *,
    gateway: r.GatewayConfig | None = None,
    listeners: Iterable[r.ListenSpec] = (),
    grpc_api_listeners: bool = False,
) -> Snapshot:
    """One Cluster and one ClusterLoadAssignment per workload; in gateway mode the shared
    RouteConfiguration and one Listener per distinct :class:`~aviator.xds.resources.ListenSpec`
    of ``listeners`` plus the gateway's default one; optionally API listeners for gRPC
    proxyless clients.

    Builds everything from scratch; a producer that publishes again and again should keep a
    :class:`SnapshotBuilder`, which rebuilds only what changed.
    """
    return SnapshotBuilder().build(
        workloads, gateway=gateway, listeners=listeners, grpc_api_listeners=grpc_api_listeners
    )


class SnapshotBuilder:
    """:func:`build_snapshot` that remembers its previous build.

    A workload equal to the one it was given last time keeps its entries: its Cluster and CLA
    are neither rebuilt nor serialised again, so a weight change to one workload costs one CLA
    whatever the size of the fleet (measured with ``aviator bench xds``: a full rebuild of
    1,000 workloads took about 100 ms of CPU per change). The output is identical to
    :func:`build_snapshot`'s. Only the entries of the last build are kept (memory follows the
    fleet), and a build that raises leaves them as they were. Not thread-safe.
    """

    def __init__(self) -> None:
        self._clusters: dict[WorkloadKey, ResourceEntry] = {}
        self._clas: dict[WorkloadKey, tuple[WeightedWorkload, ResourceEntry]] = {}
        self._cla_builders: dict[WorkloadKey, r.LoadAssignmentBuilder] = {}
        # Listeners and routes, by everything they are built from.
        self._others: dict[tuple[object, ...], ResourceEntry] = {}

    def build(
        self,
        workloads: Iterable[WeightedWorkload],
        *,
        gateway: r.GatewayConfig | None = None,
        listeners: Iterable[r.ListenSpec] = (),
        grpc_api_listeners: bool = False,
    ) -> Snapshot:
        workloads = list(workloads)
        keys = [w.key for w in workloads]
        if len(set(keys)) != len(keys):
            raise SnapshotError(
                [f"workload {k} appears twice" for k in sorted(set(keys)) if keys.count(k) > 1]
            )
        clusters: dict[WorkloadKey, ResourceEntry] = {}
        clas: dict[WorkloadKey, tuple[WeightedWorkload, ResourceEntry]] = {}
        for w in workloads:
            cluster = self._clusters.get(w.key)
            if cluster is None:
                cluster = ResourceEntry.from_message(r.CLUSTER_TYPE, r.build_cluster(w.key))
            clusters[w.key] = cluster
            previous = self._clas.get(w.key)
            if previous is not None and (previous[0] is w or previous[0] == w):
                clas[w.key] = previous
            else:
                builder = self._cla_builders.get(w.key) or r.LoadAssignmentBuilder()
                cla = ResourceEntry.from_message(r.ENDPOINT_TYPE, builder.build(w))
                self._cla_builders[w.key] = builder
                clas[w.key] = (w, cla)
        # A list, not a dict: a name built twice must still fail as a duplicate.
        others: list[tuple[tuple[object, ...], ResourceEntry]] = []

        def other(key: tuple[object, ...], type_url: str, build: Callable[[], Message]) -> None:
            entry = self._others.get(key)
            if entry is None:
                entry = ResourceEntry.from_message(type_url, build())
            others.append((key, entry))

        # Routes depend on the workloads' keys and ports only, not on their endpoints (nor on
        # the gateway listeners: every gateway shares one route configuration).
        shape = tuple(sorted((w.key, w.port) for w in workloads))
        if gateway is not None:
            gw = gateway
            # The default listener (for nodes that name no address or port) and every one
            # some gateway asked for: each node receives only its own (the ADS streams).
            for spec in sorted({gw.default, *listeners}):
                other(
                    ("listener", gw, spec),
                    r.LISTENER_TYPE,
                    functools.partial(r.build_listener, gw, spec),
                )
            other(
                ("route", gw, shape),
                r.ROUTE_TYPE,
                lambda: r.build_route_configuration(gw, workloads),
            )
        if grpc_api_listeners:
            for w in workloads:
                for name in r.grpc_listener_names(w):
                    other(
                        ("api-listener", name),
                        r.LISTENER_TYPE,
                        functools.partial(r.build_api_listener, name),
                    )
            other(
                ("grpc-route", shape),
                r.ROUTE_TYPE,
                lambda: r.build_grpc_route_configuration(workloads),
            )
        by_type: dict[str, list[ResourceEntry]] = {t: [] for t in r.TYPE_ORDER}
        for _, entry in others:
            by_type[entry.type_url].append(entry)
        snapshot = Snapshot.from_entries(
            [
                *clusters.values(),
                *(cla for _, cla in clas.values()),
                *by_type[r.LISTENER_TYPE],
                *by_type[r.ROUTE_TYPE],
            ]
        )
        self._clusters, self._clas, self._others = clusters, clas, dict(others)
        if len(self._cla_builders) > len(clas):  # a builder's cache is only a cache
            self._cla_builders = {k: b for k, b in self._cla_builders.items() if k in clas}
        return snapshot

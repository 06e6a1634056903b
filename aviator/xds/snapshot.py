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

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from aviator.model import WeightedWorkload
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
    h = hashlib.blake2b(digest_size=8)
    h.update(type_url.encode())
    for name, version in sorted(items):
        h.update(b"\x00+" + name.encode() + b"\x00" + version.encode())
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
            assert isinstance(cla.message, endpoint_pb2.ClusterLoadAssignment)
            for locality in cla.message.endpoints:
                for lb_endpoint in locality.lb_endpoints:
                    if (
                        lb_endpoint.HasField("load_balancing_weight")
                        and lb_endpoint.load_balancing_weight.value == 0
                    ):
                        problems.append(f"endpoints {name!r} carry load_balancing_weight 0")
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
    grpc_api_listeners: bool = False,
) -> Snapshot:
    """One Cluster and one ClusterLoadAssignment per workload; in gateway mode a Listener and
    its RouteConfiguration; optionally API listeners for gRPC proxyless clients."""
    workloads = list(workloads)
    keys = [w.key for w in workloads]
    if len(set(keys)) != len(keys):
        raise SnapshotError(
            [f"workload {k} appears twice" for k in sorted(set(keys)) if keys.count(k) > 1]
        )
    clusters = [r.build_cluster(w.key) for w in workloads]
    endpoints = [r.build_load_assignment(w) for w in workloads]
    listeners: list[Message] = []
    routes: list[Message] = []
    if gateway is not None:
        listeners.append(r.build_listener(gateway))
        routes.append(r.build_route_configuration(gateway, workloads))
    if grpc_api_listeners:
        listeners.extend(
            r.build_api_listener(name) for w in workloads for name in r.grpc_listener_names(w)
        )
        routes.append(r.build_grpc_route_configuration(workloads))
    return Snapshot.from_messages(
        clusters=clusters, endpoints=endpoints, listeners=listeners, routes=routes
    )

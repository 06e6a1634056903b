"""This replica's ACK counts, read off its own ADS streams: the operator's ``acks_changed``
input (no Kubernetes client, no I/O: the control plane polls it every second).

:class:`XdsAcks` joins the two halves: the published ClusterLoadAssignments (each version's
address set, into :class:`~aviator.operator.acks.EndpointVersions`) and, for every live
stream, what its proxy holds of each EDS name it subscribes to
(:meth:`~aviator.xds.protocol.ProtocolStream.subscribed`, ``held_version``, ``rejection``),
counted by :func:`~aviator.operator.acks.cluster_acks`.

A poll where neither the cache published nor any stream handled a request since the last one
answers None at once (what a proxy holds changes only on a request): at 1,000 streams of 1,000
clusters a full count is a million holdings, and steady state costs one pass over the streams.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence, Set
from typing import Any

from envoy.config.endpoint.v3 import endpoint_pb2

from aviator.operator.acks import ClusterAcks, EndpointVersions, ProxyHolding, cluster_acks
from aviator.xds.protocol import ProtocolStream
from aviator.xds.resources import ENDPOINT_TYPE
from aviator.xds.snapshot import ResourceEntry

__all__ = ["XdsAcks", "cla_addresses"]


def cla_addresses(message: Any) -> frozenset[str]:
    """The ``ip:port`` of every endpoint of a ClusterLoadAssignment (its membership: weights
    and health left out, so a reweigh is not a new set)."""
    if not isinstance(message, endpoint_pb2.ClusterLoadAssignment):
        return frozenset()
    return frozenset(
        f"{sa.address}:{sa.port_value}"
        for locality in message.endpoints
        for lb in locality.lb_endpoints
        if (sa := lb.endpoint.address.socket_address).address
    )


class XdsAcks:
    """Counts, per cluster, the proxies on this replica's streams that hold its current
    endpoints (see the module docstring). Single-threaded: the control plane's loop."""

    def __init__(self, *, keep: int = 64) -> None:
        self.versions = EndpointVersions(keep=keep)
        self._members: dict[str, str] = {}  # cluster -> the CLA version last observed
        self._signature: tuple[object, ...] | None = None
        self.current: dict[str, ClusterAcks] = {}  # the counts of the last poll that counted
        self.polls = 0  # polls that counted (for tests and the debug view)

    def poll(
        self,
        clas: Mapping[str, ResourceEntry],
        publishes: int,
        streams: Sequence[ProtocolStream[Any, Any]],
    ) -> dict[str, ClusterAcks] | None:
        """The counts now, or None when nothing can have changed since the last poll.

        ``clas``: the cache's ClusterLoadAssignments (what is served); ``publishes``: the
        cache's publish count; ``streams``: the live ADS streams.
        """
        signature = (publishes, tuple((s.stream_id, s.requests_handled) for s in streams))
        if signature == self._signature:
            return None
        self._signature = signature
        for name, entry in clas.items():
            if self._members.get(name) != entry.version:
                self._members[name] = entry.version
                self.versions.observe(name, entry.version, cla_addresses(entry.message))
        if len(self._members) != len(clas):
            self._members = {n: v for n, v in self._members.items() if n in clas}
            self.versions.retain(clas)
        self.current = cluster_acks(self._holdings(clas.keys(), streams), self.versions)
        self.polls += 1
        return self.current

    @staticmethod
    def _holdings(
        served: Set[str], streams: Sequence[ProtocolStream[Any, Any]]
    ) -> Iterator[ProxyHolding]:
        for stream in streams:
            node = stream.node_id or f"stream {stream.stream_id}"
            for name in stream.subscribed(ENDPOINT_TYPE, served):
                yield ProxyHolding(
                    node_id=node,
                    cluster=name,
                    version=stream.held_version(ENDPOINT_TYPE, name),
                    rejection=stream.rejection(ENDPOINT_TYPE, name),
                )
